"""Hostile input never shows a traceback: records and prompts with deep nesting, huge lines, NUL bytes, invalid UTF-8
and wrong types; TOML configs with wrong types; templates that loop or render gigabytes. Each gives `Error: FILE:LINE:
what` and exit != 0 (or a counted skip with --on-bad-line skip). Fuzz tests (hypothesis) over the record reader and the
config loader: any input gives a record, an ImitateError or a skip, never another exception."""

from __future__ import annotations

import json
import math
import re
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from imitate import jsonl
from imitate.clean.scan import _parse
from imitate.cli import app, stage_config
from imitate.collect.journal import finished_ids
from imitate.collect.stage import read_rows
from imitate.collect.templates import from_string
from imitate.errors import ImitateError, InputError
from imitate.pipeline import STAGES, load_pipeline, load_stage
from imitate.records import read_records

GOOD = json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]})
DEEP = ("[" * 100_000 + "]" * 100_000).encode()
BAD_LINES = {
    "deep nesting": (DEEP, "nested too deeply"),
    "deep nesting inside a record": (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "NUL bytes": (b'{"messages": \x00[]}', "not valid JSON"),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid UTF-8"),
    "wrong type: messages": (b'{"messages": "hello"}', "field 'messages' must be"),
    "wrong type: role": (b'{"messages": [{"role": 5, "content": "x"}]}', "messages[0].role"),
    "wrong type: content": (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    "not an object": (b"[1, 2, 3]", "expected a JSON object"),
    "huge line": (b'{"messages": "' + b"x" * (3 * 2**20) + b'"}', "line is 3.0 MB, longer than the 1.0 MB limit"),
}


def _file(tmp_path: Path, bad: bytes) -> Path:
    p = tmp_path / "records.jsonl"
    p.write_bytes((GOOD + "\n").encode() + bad + b"\n" + (GOOD + "\n").encode())
    return p


@pytest.fixture(autouse=True)
def small_line_limit(monkeypatch):
    monkeypatch.setenv(jsonl.ENV_MAX, "1")  # 1 MB, so "a huge line" needs 3 MB, not 200


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_clean_names_the_bad_line_or_skips_it(tmp_path, case):
    bad, why = BAD_LINES[case]
    path = _file(tmp_path, bad)
    res = CliRunner().invoke(app, ["clean", str(path), "--out", str(tmp_path / "c.jsonl")])
    assert res.exit_code == 1, res.output
    assert f"Error: {path}:2: " in res.output and why in res.output, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    res = CliRunner().invoke(app, ["clean", str(path), "--out", str(tmp_path / "c.jsonl"), "--on-bad-line", "skip",
                                   "--json", "--no-exact-dedup", "--no-near-dedup"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):res.output.rindex("}") + 1])
    assert summary["bad_lines"] == 1 and summary["in"] == 2 and summary["out"] == 2
    assert (tmp_path / "c.jsonl").read_text().splitlines() == [GOOD, GOOD]


@pytest.mark.parametrize("case", ["deep nesting", "invalid UTF-8", "huge line", "wrong type: content"])
def test_train_names_the_bad_line(tmp_path, tiny_model_dir, case):
    bad, why = BAD_LINES[case]
    path = _file(tmp_path, bad)
    res = CliRunner().invoke(app, ["train", "--data", str(path), "--student", str(tiny_model_dir), "--out",
                                   str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert f"Error: {path}:2: " in res.output and why in res.output, res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("case", ["deep nesting", "invalid UTF-8", "huge line", "NUL bytes"])
def test_collect_prompts_name_the_bad_line_before_any_request(tmp_path, case):
    bad, why = BAD_LINES[case]
    for suffix in (".jsonl", ".txt"):
        prompts = tmp_path / f"p{suffix}"
        prompts.write_bytes(b'{"prompt": "a"}\n' + bad + b"\n")
        res = CliRunner().invoke(app, ["collect", "--teacher", "openai:m", "--prompts", str(prompts), "--out",
                                       str(tmp_path / "o.jsonl"), "--dry-run"])
        if suffix == ".txt" and case in ("deep nesting", "NUL bytes"):  # text prompts: any text is a prompt
            assert res.exit_code == 0, res.output
            continue
        assert res.exit_code == 1, res.output
        assert f"Error: {prompts}:2: " in res.output, res.output
        assert "Traceback" not in res.output


def test_a_huge_line_is_never_held_whole():
    """A 40 MB line under a 1 MB limit: reported with its size; memory peaks at a few times the limit, not the line."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "big.jsonl"
        with p.open("wb") as fh:
            fh.write(b'{"a": 1}\n{"messages": "')
            for _ in range(40):
                fh.write(b"x" * 2**20)
            fh.write(b'"}\n{"b": 2}\n')
        tracemalloc.start()
        got = list(jsonl.lines(p))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert [n for n, _ in got] == [1, 2, 3]
    assert isinstance(got[1][1], jsonl.TooLong) and got[1][1].size == 40 * 2**20 + len(b'{"messages": ""}')
    assert got[2][1] == b'{"b": 2}\n'
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MB while skipping a 40 MB line"


def test_the_journal_names_a_hostile_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a"}\n' + DEEP + b"\n")
    with pytest.raises(InputError, match=r"out.jsonl:2: not a record \(not valid JSON \(nested too deeply\)"):
        finished_ids(out)


@pytest.mark.parametrize("template", [
    '{{ "x" * 10**10 }}',
    '{{ "x"|center(10**10) }}',
    '{{ "{:>1000000000}".format(1) }}',
    '{{ "%1000000000d" % 1 }}',
    '{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}',  # 10^10 iterations
    '{% for i in range(99999) %}{{ "y" * 99 }}{% endfor %}',  # ~10 MB of output
    '{{ lipsum(10**7) }}',
    '{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}',
])
def test_runaway_templates_are_stopped(template):
    with pytest.raises(InputError, match=r"^rows.jsonl:7: template '<string>' failed: "):
        from_string(template).render({"q": 1}, "rows.jsonl:7")


def test_capped_templates_still_render_ordinary_prompts():
    t = from_string('{% for i in range(3) %}{{ i }}{% endfor %} {{ "ab" * 2 }} {{ "{:>4}".format(q) }} '
                    '{{ "%03d" % q }} {{ "z"|center(5) }}|')
    assert t.render({"q": 7}) == [{"role": "user", "content": '012 abab    7 007   z  |'}]


# --- fuzz: the record reader ------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["user", "assistant", "system", "tool", "robot", 5, None])
turns = st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=30), json_values)})
record_like = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(turns, max_size=4), json_values)},
    optional={"id": json_values, "context": st.lists(turns, max_size=2), "source": json_values},
)


def _mutate(data: st.DataObject, raw: bytes) -> bytes:
    how = data.draw(st.sampled_from(["keep", "cut", "insert", "deep", "bytes"]))
    if how == "cut" and raw:
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if how == "insert":
        at = data.draw(st.integers(0, len(raw)))
        return raw[:at] + data.draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    if how == "deep":
        n = data.draw(st.sampled_from([10, 900, 5_000, 60_000]))
        return b'{"messages": ' + b"[" * n + b"]" * n + b"}"
    if how == "bytes":
        return data.draw(st.binary(max_size=60)).replace(b"\n", b" ")
    return raw


def _lines(data: st.DataObject) -> bytes:
    out = []
    for _ in range(data.draw(st.integers(1, 5))):
        value = data.draw(st.one_of(record_like, json_values))
        out.append(_mutate(data, json.dumps(value).encode()).replace(b"\n", b" "))
    return b"\n".join(out) + data.draw(st.sampled_from([b"\n", b"", b"\r\n"]))


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.data())
def test_fuzz_record_reader(data):
    raw = _lines(data)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.jsonl"
        path.write_bytes(raw)
        for on_bad_line in ("error", "skip"):
            bad: list = []
            try:
                got = list(read_records(path, on_bad_line=on_bad_line, bad=bad))
            except InputError as exc:
                assert on_bad_line == "error" and re.match(rf"{re.escape(str(path))}:\d+: ", exc.message)
                continue
            assert all(isinstance(x.data, dict) for x in got)
            n = len([ln for ln in raw.split(b"\n") if ln.strip()])
            assert len(got) + len(bad) == n
        for line in raw.split(b"\n"):  # clean's parser: a record or a reason
            rec, why = _parse(line)
            assert (rec is None) != (why is None)
        try:
            finished_ids(path)
        except InputError:
            pass
        try:
            read_rows(path)
        except InputError:
            pass


# --- fuzz: the config loader ------------------------------------------------------------------------------------------

toml_scalars = (st.integers(-(2**63), 2**63 - 1) | st.booleans() | st.floats(allow_infinity=True)
                | st.text(max_size=12) | st.sampled_from(["openai:m", "hf:./x", "a" * 300, "../..", "-1"]))
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["assistant", "user", "a", "x-y"]), inner, max_size=2),
                           max_leaves=8)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"


@FUZZ
@given(st.data())
def test_fuzz_config_loader(data):
    stage = data.draw(st.sampled_from(list(STAGES)))
    _, cls = load_stage(stage)
    names = [f.replace("_", "-") for f in cls.__dataclass_fields__] + ["nonsense", "out.x"]
    keys = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=5, unique=True))
    body = "\n".join(f"{json.dumps(k)} = {_toml(data.draw(toml_values))}" for k in keys)
    text = data.draw(st.sampled_from([f"[{stage}]\n{body}\n", f"{stage} = 3\n", f"[{stage}.{stage}]\n{body}\n"]))
    raw = _mutate(data, text.encode()) if data.draw(st.booleans()) else text.encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.toml"
        path.write_bytes(raw)
        for load in (lambda: stage_config(cls, path, stage, {}), lambda: load_pipeline(path)):
            try:
                load()
            except ImitateError:
                pass
