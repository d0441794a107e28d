"""`imitate init-student`: a student cut from its teacher, keeping K evenly spaced decoder layers.

The student keeps the teacher's embeddings, final norm and LM head, the decoder layers at indices
`round(i * (N - 1) / (K - 1))` for i = 0..K-1 (the first and the last always among them), and the teacher's tokenizer
and chat template; it is saved as safetensors with `imitate_student.json` naming where it came from. A student made
this way shares the teacher's tokenizer, so white-box KD and SCKD (`imitate train --teacher`) apply at once, and it
starts from the teacher's knowledge instead of from noise (it still writes poorly until trained: every kept layer now
reads another layer's output).

Supported architectures: the decoder stacks whose layers are independent modules under `model.model.layers`, each
knowing only its own index (`self_attn.layer_idx`, for the KV cache): SUPPORTED below. Others are refused before any
weights load.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.errors import ImitateError, UsageError
from imitate.locks import locks_outputs
from imitate.options import Checked, opt

# transformers model_type -> what it is; cut the same way: model.model.layers + per-layer layer_types
SUPPORTED = {
    "llama": "Llama family (Llama 2/3, SmolLM, TinyLlama, ...)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
}
MARKER = "imitate_student.json"  # written beside the weights: the teacher, the kept layers


@dataclass(frozen=True)
class InitStudentConfig(Checked):
    teacher: str = opt(help="The model to cut: hf:DIR, hf:FILE.gguf, hf:pkg:DIST (the GGUF an installed package "
                       "ships) or a hub id.", example="hf:./teacher", flag="--from", aliases=("--teacher",))
    layers: int = opt(help="Decoder layers the student keeps, evenly spaced, the first and the last included (at "
                      "most the teacher's).", example="8", ge=2)
    out: Path = opt(help="Output model directory (safetensors, tokenizer, chat template).", example="students/cut8",
                    path=True)
    trust_remote_code: bool = opt(False, "Run model code from the teacher's repository.",
                                  example="--trust-remote-code", flag="--trust-remote-code/--no-trust-remote-code")


def kept_layers(n: int, k: int) -> list[int]:
    """K evenly spaced indices out of N, the first (0) and the last (N - 1) included."""
    if not 2 <= k <= n:
        raise UsageError(f"--layers {k}: the teacher has {n} decoder layers; keep between 2 and {n}",
                         hint="the first and the last layer are always kept, so K >= 2")
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def cut(model: Any, keep: list[int]) -> Any:
    """Keep only the decoder layers `keep` of a loaded causal LM (in place); renumber them and the config."""
    import torch

    config = model.config
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for j, layer in enumerate(model.model.layers):
        for mod in (layer, getattr(layer, "self_attn", None)):
            if mod is not None and hasattr(mod, "layer_idx"):
                mod.layer_idx = j  # the KV cache is indexed by it
    old_n = config.num_hidden_layers
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):  # sliding vs full attention, per layer (Qwen2/3, Mistral)
        config.layer_types = [config.layer_types[i] for i in keep]
    if isinstance(getattr(config, "max_window_layers", None), int):  # Qwen: layers below this one slide
        config.max_window_layers = sum(1 for i in keep if i < min(config.max_window_layers, old_n))
    return model


def _teacher_config(ref: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ImitateError(f"cannot read the model config of {ref}: {str(exc).splitlines()[0]}",
                           hint="--from takes a model directory, a .gguf file or a hub id") from None


@locks_outputs("init-student")
def run(cfg: InitStudentConfig) -> dict:
    """Cut and save the student; returns the summary (`--json`)."""
    from imitate import gguf_models
    from imitate.models import load_weights, local_dir, model_refs

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UsageError(f"--out {out} exists and is not a student made by imitate init-student",
                         hint="pick a new --out directory (an init-student output is replaced)")
    ref = local_dir(cfg.teacher)  # a GGUF file is converted (once) here; a missing directory fails here
    base, adapter, tok_dir = model_refs(ref)
    conf = _teacher_config(base, cfg.trust_remote_code)
    kind = getattr(conf, "model_type", None)
    if kind not in SUPPORTED:
        raise UsageError(
            f"init-student: the teacher {cfg.teacher} is a {kind!r} model; cutting layers is supported for "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items()),
            hint="start from another student (any model sharing the teacher's tokenizer works with --teacher KD), "
            "or cut this one by hand with transformers",
        )
    keep = kept_layers(conf.num_hidden_layers, cfg.layers)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=cfg.trust_remote_code)
    if not tokenizer.chat_template:
        raise ImitateError(f"{tok_dir}: the teacher's tokenizer has no chat template",
                           hint="the student formats records with it: use a chat (instruct) teacher")
    dtype = str(getattr(conf, "dtype", None) or "float32").removeprefix("torch.")
    model = load_weights(ref, device="cpu", dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "float32",
                         trust_remote_code=cfg.trust_remote_code)
    n_teacher = sum(p.numel() for p in model.parameters())
    cut(model, keep)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    origin = {
        "teacher": cfg.teacher,
        "teacher_ref": base if adapter is None else adapter,
        "architecture": kind,
        "teacher_layers": conf.num_hidden_layers,
        "kept_layers": keep,
        "teacher_params": n_teacher,
        "params": sum(p.numel() for p in model.parameters()),
        "gguf": gguf_models.source_of(base),
    }
    (out / MARKER).write_text(json.dumps(origin, indent=2), encoding="utf-8")
    print(f"init-student: kept layers {keep} of {conf.num_hidden_layers} ({origin['params'] / 1e6:.1f}M of "
          f"{n_teacher / 1e6:.1f}M parameters) -> {out}", file=sys.stderr, flush=True)
    return {"stage": "init-student", "out": str(out), **origin}


def origin_of(student: str | Path) -> dict | None:
    """The imitate_student.json of a student directory (its teacher and kept layers), else None."""
    f = Path(student) / MARKER
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
