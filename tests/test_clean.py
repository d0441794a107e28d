"""`imitate clean` end to end: a collect-format file in, CLEAN / REMOVED / report out, through run() and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imitate.clean.stage import CleanConfig, run
from imitate.cli import app
from imitate.errors import InputError
from imitate.records import dumps, request_id

VOCAB = [f"tok{i}" for i in range(4000)]


def record(prompt: str, answer: str | None, n: int = 0, **extra) -> dict:
    """A record as `imitate collect` writes it."""
    messages = [{"role": "user", "content": prompt}]
    params = {"temperature": 0.7, "max_tokens": 512}
    r = {
        "id": request_id("openai:gpt-4o-mini", messages, params, n),
        "teacher": "openai:gpt-4o-mini",
        "messages": messages + ([{"role": "assistant", "content": answer}] if answer is not None else []),
        "params": params,
        "sample": n,
        "finish_reason": "stop",
        "usage": {"input_tokens": 12, "output_tokens": len((answer or "").split())},
        "source": {"question": prompt},
        "created": "2026-11-23T16:20:00Z",
    }
    r.update(extra)
    return r


def make_corpus(rnd: random.Random) -> tuple[list[dict], dict[str, str]]:
    """Records + the expected fate of each id ("" = kept, else the filter that must remove it)."""
    recs: list[dict] = []
    fate: dict[str, str] = {}

    def add(r: dict, why: str) -> dict:
        recs.append(r)
        fate[r["id"]] = why
        return r

    originals = []
    for i in range(12):
        ans = " ".join(rnd.choices(VOCAB, k=120))
        originals.append(add(record(f"Question number {i}?", ans), ""))
    # near duplicates: 1 word of 120 replaced at the very end (Jaccard ~0.98), planted after their original
    for k, i in enumerate([0, 0, 3, 7]):
        words = originals[i]["messages"][-1]["content"].split()
        words[-1] = ["alpha", "beta", "gamma", "delta"][k]
        add(record(f"Question number {i}?", " ".join(words), n=10 + k), "near_dup")
    # exact duplicate after normalization (case and whitespace)
    src = originals[5]["messages"][-1]["content"]
    add(record("QUESTION  number 5? ", src.upper().replace(" ", "  ") + "\n", n=20), "exact_dup")
    add(record("Broken?", "", n=30, error="HTTP 500: upstream"), "failed")
    add(record("Cut?", "This answer stops in the mid", n=31, finish_reason="length"), "truncated")
    add(record("Who are you?", "As an AI language model, I cannot browse.", n=32), "refusal")
    looped = " ".join(rnd.choices(VOCAB, k=20)) + " " + " ".join(["and then we go around again"] * 15)
    add(record("Loop?", looped, n=33), "repetition")
    add(record("What is 2+2?", "4", n=34), "")  # one-token answer: kept (no default length bound)
    return recs, fate


def write(path: Path, recs: list[dict], extra_lines: list[str] = ()) -> Path:
    path.write_text("".join(dumps(r) + "\n" for r in recs) + "".join(extra_lines), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def corpus(tmp_path):
    recs, fate = make_corpus(random.Random(0))
    return write(tmp_path / "records.jsonl", recs), recs, fate


def clean_cfg(tmp_path: Path, inputs: list[Path], **kw) -> CleanConfig:
    return CleanConfig(
        inputs=inputs, out=tmp_path / "clean.jsonl", removed=tmp_path / "removed.jsonl",
        report=tmp_path / "report.json", **kw,
    )  # fmt: skip


def test_each_record_meets_its_fate_and_order_is_kept(tmp_path, corpus):
    src, recs, fate = corpus
    summary = run(clean_cfg(tmp_path, [src], chunk_size=3))  # several map chunks
    kept = read(tmp_path / "clean.jsonl")
    assert [r["id"] for r in kept] == [r["id"] for r in recs if fate[r["id"]] == ""]
    assert kept == [r for r in recs if fate[r["id"]] == ""]  # record format unchanged
    removed = read(tmp_path / "removed.jsonl")
    assert {r["id"]: r["removed"]["filter"] for r in removed} == {i: f for i, f in fate.items() if f}
    by_id = {r["id"]: r for r in removed}
    for k, i in enumerate([0, 0, 3, 7]):
        dup = recs[12 + k]
        assert by_id[dup["id"]]["removed"]["duplicate_of"] == recs[i]["id"]  # survivor = first in input order
    assert by_id[recs[16]["id"]]["removed"]["duplicate_of"] == recs[5]["id"]
    assert summary["clusters"]["exact_dup"]["sizes"] == {"2": 1}


def test_report_counts_add_up(tmp_path, corpus):
    src, recs, fate = corpus
    s = run(clean_cfg(tmp_path, [src]))
    assert s["in"] == len(recs)
    assert s["in"] == s["out"] + sum(s["removed"].values())
    assert s["removed_total"] == sum(s["removed"].values())
    for name in ("failed", "truncated", "refusal", "repetition", "exact_dup", "near_dup"):
        assert s["removed"][name] == sum(1 for f in fate.values() if f == name), name
    near = s["clusters"]["near_dup"]
    assert near["records_in_clusters"] - near["clusters"] == s["removed"]["near_dup"]
    assert near["clusters"] == 3 and near["largest"] == 3
    assert near["sizes"] == {"2": 2, "3-4": 1}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["removed"] == s["removed"]
    assert report["examples"]["refusal"][0]["detail"].startswith("matched")
    assert report["examples"]["near_dup"][0]["duplicate_of"] == recs[0]["id"]
    assert set(report["timing"]["cpu_s_per_step"]) >= {"failed", "refusal", "near_dup"}


def test_same_input_same_bytes(tmp_path, corpus):
    src, _, _ = corpus
    outs = []
    for k, workers in enumerate([1, 1, 2]):
        d = tmp_path / f"run{k}"
        d.mkdir()
        s = run(clean_cfg(d, [src], workers=workers, chunk_size=4))
        report = json.loads((d / "report.json").read_text())
        report.pop("timing")
        report["config"].pop("workers")
        for key in ("out", "removed", "report"):
            report["config"].pop(key)
        report.pop("outputs")
        outs.append(((d / "clean.jsonl").read_bytes(), (d / "removed.jsonl").read_bytes(), report))
        assert s["out"] > 0
    assert outs[0] == outs[1] == outs[2]


def test_priority_picks_the_survivor(tmp_path, corpus):
    src, recs, _ = corpus
    run(clean_cfg(tmp_path, [src], priority="sample"))  # highest sample index wins
    removed = {r["id"]: r["removed"] for r in read(tmp_path / "removed.jsonl")}
    assert recs[0]["id"] in removed and removed[recs[0]["id"]]["duplicate_of"] == recs[13]["id"]
    kept = [r["id"] for r in read(tmp_path / "clean.jsonl")]
    assert recs[13]["id"] in kept and recs[12]["id"] not in kept


def test_one_per_prompt_and_switches(tmp_path):
    answers = ["Paris is the capital of France.", "Rome is lovely in the spring.", "Bananas are a yellow fruit."]
    recs = [record("Same prompt", a, n=i) for i, a in enumerate(answers)]
    src = write(tmp_path / "r.jsonl", recs)
    s = run(clean_cfg(tmp_path, [src]))
    assert s["out"] == 3
    s = run(clean_cfg(tmp_path, [src], one_per_prompt=True, max_removed=1))
    assert s["out"] == 1 and s["removed"]["prompt_dup"] == 2
    assert [r["id"] for r in read(tmp_path / "clean.jsonl")] == [recs[0]["id"]]
    s = run(clean_cfg(tmp_path, [src], exact_dedup=False, near_dedup=False, drop_refusals=False))
    assert list(s["removed"]) == ["failed", "truncated", "repetition"]


def test_verify_drops_candidates_below_threshold(tmp_path):
    rnd = random.Random(1)
    base = rnd.choices(VOCAB, k=200)
    far = list(base)
    for i in range(0, 200, 4):  # 50 substitutions spread out: character 5-gram Jaccard ~0.5
        far[i] = "zzz"
    recs = [record("p", " ".join(base), n=0), record("p", " ".join(far), n=1)]
    src = write(tmp_path / "r.jsonl", recs)
    loose = {"bands": 64, "near_on": "answer", "max_removed": 1}  # 64 bands of 2 rows: any overlap is a candidate
    assert run(clean_cfg(tmp_path, [src], verify=False, **loose))["removed"]["near_dup"] == 1
    assert run(clean_cfg(tmp_path, [src], **loose))["removed"]["near_dup"] == 0


def test_decontamination_end_to_end(tmp_path, corpus):
    src, recs, _ = corpus
    answer = recs[2]["messages"][-1]["content"]
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"question": "q", "answer": " ".join(answer.split()[40:60])}) + "\n")
    s = run(clean_cfg(tmp_path, [src], decontaminate=[ev]))
    assert s["removed"]["decontaminate"] == 1
    removed = {r["id"]: r["removed"] for r in read(tmp_path / "removed.jsonl")}
    assert "eval.jsonl:1" in removed[recs[2]["id"]]["detail"]


def test_bad_line_names_file_and_line_or_is_skipped(tmp_path, corpus):
    _, recs, _ = corpus
    src = write(tmp_path / "r.jsonl", recs[:3], ['{"id": "broken", \n', '{"id": "no messages"}\n'])
    with pytest.raises(InputError, match=r"r\.jsonl:4: not valid JSON"):
        run(clean_cfg(tmp_path, [src]))
    s = run(clean_cfg(tmp_path, [src], on_bad_line="skip"))
    assert s["bad_lines"] == 2 and s["in"] == 3 and s["out"] == 3
    assert any("r.jsonl:5" in b and "messages" in b for b in s["bad_line_examples"])
    other = write(tmp_path / "u.jsonl", recs[:2])
    with other.open("ab") as fh:
        fh.write(b'{"messages": "\xff"}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"u\.jsonl:3: not valid UTF-8"):
        run(clean_cfg(tmp_path, [other], workers=2))
    s = run(clean_cfg(tmp_path, [src, other], on_bad_line="skip"))
    assert s["bad_lines"] == 4 and "u.jsonl:4: expected a JSON object" in s["bad_line_examples"][-1]
    assert len(read(tmp_path / "clean.jsonl")) == 3  # the two records of u.jsonl are exact duplicates


def test_multiple_inputs_keep_file_order(tmp_path, corpus):
    _, recs, fate = corpus
    a = write(tmp_path / "a.jsonl", recs[:8])
    b = write(tmp_path / "b.jsonl", recs[8:])
    run(clean_cfg(tmp_path, [a, b], chunk_size=5))
    assert [r["id"] for r in read(tmp_path / "clean.jsonl")] == [r["id"] for r in recs if fate[r["id"]] == ""]


# --- CLI --------------------------------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, corpus):
    src, _, fate = corpus
    out, rem, rep = tmp_path / "c.jsonl", tmp_path / "rm.jsonl", tmp_path / "rep.json"
    res = CliRunner().invoke(
        app,
        [
            "clean", str(src), "--out", str(out), "--removed", str(rem), "--report", str(rep), "--json",
            "--min-words", "assistant=2", "--workers", "2",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["removed"]["length"] == 1  # the answer "4"
    assert summary["out"] == sum(1 for f in fate.values() if f == "") - 1
    assert len(read(out)) == summary["out"] and len(read(rem)) == summary["removed_total"]
    assert json.loads(rep.read_text())["removed"] == summary["removed"]


def test_cli_config_file_and_errors(tmp_path, corpus):
    src, _, _ = corpus
    cfg = tmp_path / "clean.toml"
    cfg.write_text(
        f'[clean]\ninputs = ["{src.name}"]\nout = "cleaned.jsonl"\nthreshold = 0.9\ndrop-truncated = false\n'
        "min_words = {assistant = 2}\n"
    )
    res = CliRunner().invoke(app, ["clean", "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert "truncated" not in s["removed"] and s["removed"]["length"] == 1
    assert s["lsh"]["threshold"] == 0.9 and (tmp_path / "cleaned.jsonl").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    res = CliRunner().invoke(app, ["clean", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 1
    assert "bad.jsonl:2" in res.output and "--on-bad-line skip" in res.output
    res = CliRunner().invoke(app, ["clean", str(src), "--out", str(tmp_path / "o.jsonl"), "--min-words", "lots"])
    assert res.exit_code != 0 and "ROLE=NUMBER" in res.output
    res = CliRunner().invoke(app, ["clean", str(src)])
    assert res.exit_code == 2 and "--out" in res.output
    typo = tmp_path / "typo.toml"  # a misspelt section is an error, not silently ignored
    typo.write_text("[cleen]\nthreshold = 0.5\n")
    res = CliRunner().invoke(app, ["clean", str(src), "--out", str(tmp_path / "o.jsonl"), "--config", str(typo)])
    assert res.exit_code == 2 and "no [clean] section" in res.stderr and "[cleen]" in res.stderr
    res = CliRunner().invoke(app, ["clean", str(tmp_path), "--out", str(tmp_path / "o.jsonl")])  # a directory
    assert res.exit_code == 1 and "Is a directory" in res.stderr and "Traceback" not in res.output
    assert not isinstance(res.exception, IsADirectoryError)


def test_nothing_kept_or_nothing_in_is_noted(tmp_path):
    answer = "As an AI language model, I cannot help."
    refusals = write(tmp_path / "r.jsonl", [record(f"q {i}", answer) for i in range(3)])
    s = run(clean_cfg(tmp_path, [refusals], max_removed=1))
    assert s["out"] == 0 and any("every record was removed" in n for n in s["notes"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    s = run(clean_cfg(tmp_path, [empty]))
    assert s["in"] == 0 and any("no records" in n for n in s["notes"])
    ok = run(clean_cfg(tmp_path, [write(tmp_path / "ok.jsonl", [record("q", "a fine answer")])]))
    assert ok["out"] == 1 and not any("removed" in n or "no records" in n for n in ok["notes"])


def test_near_dup_on_both_needs_prompt_and_answer_alike(tmp_path):
    rnd = random.Random(2)
    context = " ".join(rnd.choices(VOCAB, k=400))  # a long few-shot prompt shared by every record
    system = " ".join(rnd.choices(VOCAB, k=300))
    answers = [" ".join(rnd.choices(VOCAB, k=30)) for _ in range(4)]
    recs = [record(context, a, n=i) for i, a in enumerate(answers)]
    for r in recs:
        r["messages"].insert(0, {"role": "system", "content": system})
    src = write(tmp_path / "r.jsonl", recs)
    assert run(clean_cfg(tmp_path, [src]))["out"] == 4  # different answers: kept, however long the shared prompt
    prompt_only = clean_cfg(tmp_path, [src], near_on="prompt", exact_dedup=False, max_removed=1)
    assert run(prompt_only)["removed"]["near_dup"] == 3
    words = answers[0].split()
    words[-1] = "other"  # same prompt, answer Jaccard ~0.96: a near duplicate on both sides
    # (no system turn on this one: system prompts are left out of near-dedup)
    src = write(tmp_path / "r2.jsonl", [*recs, record(context, " ".join(words), n=9)])
    s = run(clean_cfg(tmp_path, [src]))
    assert s["removed"]["near_dup"] == 1
