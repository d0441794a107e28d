"""The README stays true: every `imitate COMMAND --flag` it shows exists, and its first lines are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imitate.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMANDS = ("collect", "clean", "train", "eval", "run")


def _command_lines() -> list[tuple[str, str]]:
    """(command, line) for every imitate invocation inside the README's code blocks (continuations joined)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
    blocks += re.findall(r"\n    (imitate .*?(?:\n        .*)*)\n", README)  # indented examples
    out = []
    for block in blocks:
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            m = re.search(r"(?:^|\s|-m )imitate (collect|clean|train|eval|run)\b(.*)", line)
            if m:
                out.append((m.group(1), m.group(2)))
    return out


def _help(command: str) -> str:
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


def test_readme_shows_every_command():
    shown = {c for c, _ in _command_lines()}
    assert shown == set(COMMANDS), f"README lacks examples for {set(COMMANDS) - shown}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_in_the_readme_exists(command):
    helptext = _help(command)
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", helptext))
    missing = []
    for cmd, rest in _command_lines():
        if cmd != command:
            continue
        rest = rest.split("#")[0]
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if flag not in known:
                missing.append(flag)
    assert not missing, f"README shows `imitate {command}` flags that do not exist: {sorted(set(missing))}"


def test_first_commands_match_ci():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    install, tests = first_block[0], first_block[1]
    assert "pip install torch==2.13.0" in install and 'pip install -e ".[test]"' in install
    assert install.rstrip().endswith("imitate run examples/demo.toml")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -e ".[test]"' in ci
    assert tests.strip() == "python -m pytest -q" and "python -m pytest -q" in ci


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_with_an_example(command):
    import typer

    sub = typer.main.get_command(app).commands[command]
    bare = []
    for p in sub.params:
        if p.name == "help":
            continue
        text = getattr(p, "help", None) or ""
        if not ("e.g." in text or "xample" in text or any(o in text for o in p.opts)):
            bare.append(p.opts[0] if p.opts else p.name)
    assert not bare, f"imitate {command}: options without an example in their help: {bare}"
