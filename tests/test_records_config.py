"""The record helpers and config layering every stage relies on."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imitate import records
from imitate.config import build, path_field, resolve_paths
from imitate.errors import ConfigError, InputError


def test_request_id_is_stable_and_sensitive():
    msgs = [{"role": "user", "content": "hi"}]
    a = records.request_id("openai:m", msgs, {"temperature": 0}, 0)
    assert a == records.request_id("openai:m", [dict(m) for m in msgs], {"temperature": 0}, 0)
    assert a != records.request_id("openai:m", msgs, {"temperature": 0}, 1)
    assert a != records.request_id("openai:m2", msgs, {"temperature": 0}, 0)
    assert a != records.request_id("openai:m", msgs, {"temperature": 0.1}, 0)


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "a"}]}\n\n{oops\n')
    with pytest.raises(InputError, match=r"in\.jsonl:3: not valid JSON"):
        list(records.read_records(p))
    bad: list = []
    got = list(records.read_records(p, on_bad_line="skip", bad=bad))
    assert len(got) == 1 and bad[0][1] == 3


def test_bad_role_and_missing_assistant(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"messages": [{"role": "robot", "content": "a"}]}\n')
    with pytest.raises(InputError, match=r"in\.jsonl:1: messages\[0\]\.role"):
        list(records.read_records(p))
    p.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    with pytest.raises(InputError, match="no assistant turn"):
        list(records.read_records(p, need_assistant=True))


def test_repair_torn_tail(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    assert records.repair_torn_tail(p) == len(b'{"c":')
    assert p.read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert records.repair_torn_tail(p) == 0
    p.write_bytes(b'{"c":')
    records.repair_torn_tail(p)
    assert p.read_bytes() == b""


def test_assistant_and_prompt_split():
    r = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert records.assistant_text(r) == "a"
    assert records.prompt_messages(r) == [{"role": "user", "content": "q"}]


@dataclass(frozen=True)
class _Cfg:
    out: Path = path_field()  # required in practice, checked by the stage
    inputs: list[Path] = path_field([])
    max_tokens: int = 16
    temperature: float = 0.0
    name: str | None = None
    tags: list[str] = field(default_factory=list)


def test_build_layers_and_coercion(tmp_path):
    cfg = build(_Cfg, {"max-tokens": 32, "temperature": 1}, {"max_tokens": None, "name": "x"})
    assert cfg.max_tokens == 32 and cfg.temperature == 1.0 and isinstance(cfg.temperature, float) and cfg.name == "x"
    data = resolve_paths(_Cfg, {"out": "o.jsonl", "inputs": ["a.jsonl", "/abs/b.jsonl"]}, tmp_path)
    assert data["out"] == tmp_path / "o.jsonl" and data["inputs"] == [tmp_path / "a.jsonl", Path("/abs/b.jsonl")]


def test_build_errors():
    with pytest.raises(ConfigError, match="unknown key 'max_token'") as ei:
        build(_Cfg, {"max_token": 3})
    assert "max-tokens" in ei.value.hint
    with pytest.raises(ConfigError, match="^--max-tokens must be an integer"):  # flags alone: named as the flag
        build(_Cfg, {"max_tokens": "many"})
    with pytest.raises(ConfigError, match=r"f.toml \[s\]: 'max-tokens' must be an integer"):  # a file: its key
        build(_Cfg, {"max_tokens": "many"}, where="f.toml [s]")


@pytest.mark.parametrize("command", [None, "collect", "clean", "train", "eval", "run"])
def test_help_is_light_and_documented(command):
    """`imitate [COMMAND] --help` works, shows examples, and never imports torch or transformers."""
    args = ["--help"] if command is None else [command, "--help"]
    code = (
        "import sys; from typer.testing import CliRunner; from imitate.cli import app; "
        f"r = CliRunner().invoke(app, {args!r}); print(r.output); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'transformers', 'openai', 'anthropic', 'datasets') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    if command is not None:
        assert "xample" in out.stdout, f"{command} --help shows no example"


def test_version():
    from typer.testing import CliRunner

    from imitate import __version__
    from imitate.cli import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"imitate {__version__}"
