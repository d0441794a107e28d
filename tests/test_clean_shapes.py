"""`imitate clean` must never eat a user's data: a corpus of many shapes of distinct records (arithmetic, number words,
code that differs by a constant or an identifier, multi-turn chats that differ in a later turn, CJK text, markdown
tables, long answers from the Python standard library's docstrings, short answers) all survive, while planted
case/whitespace copies and one-word edits of long answers are removed with the right survivor. Then the mass-removal
stop: its message through the CLI, its override, and `imitate run` stopping at that stage."""

from __future__ import annotations

import functools
import inspect
import json
import random
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imitate.clean.stage import CleanConfig, run
from imitate.cli import app
from imitate.errors import ImitateError
from imitate.records import dumps

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
    "seventeen eighteen nineteen".split()  # fmt: skip
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def in_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    return ONES[n // 100] + " hundred" + (" " + in_words(n % 100) if n % 100 else "")


@functools.cache
def docstrings() -> list[str]:
    """Prose nobody wrote for this test: docstrings of 20-150 words from standard-library modules."""
    import argparse
    import collections
    import email.message
    import json as json_mod
    import logging
    import pathlib
    import tarfile
    import textwrap
    import threading
    import unittest

    out = []
    for mod in (collections, textwrap, json_mod, pathlib, unittest, email.message, argparse, logging, tarfile,
                threading):  # fmt: skip
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and 20 <= len(doc.split()) <= 150 and doc not in out:
                out.append(doc)
    return out


def conv(*turns: str, rid: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"id": rid, "messages": [{"role": r, "content": t} for r, t in zip(roles, turns)], "finish_reason": "stop"}


def distinct_corpus(rnd: random.Random) -> list[dict]:
    recs: list[dict] = []

    def add(*turns: str) -> None:
        recs.append(conv(*turns, rid=f"d{len(recs)}"))

    pairs = rnd.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], 80)
    for a, b in pairs[:40]:
        add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
    for a, b in pairs[40:]:
        add(f"What is {a} times {b}?", f"{a} times {b} is {a * b}.")
    for n in rnd.sample(range(100, 1000), 40):
        add(f"Write {n} in words.", in_words(n))
    for a, b in pairs[:20]:
        add(f"What is {in_words(a)} plus {in_words(b)}? Answer in words.", f"It is {in_words(a + b)}.")
    for k in range(2, 14):
        add(
            f"Write a Python function that adds {k} to every item of a list.",
            f"```python\ndef add_all(items):\n    return [x + {k} for x in items]\n```\nEach item grows by {k}.",
        )
    for name in ("count_items", "list_length", "size_of", "countItems", "n_items", "total_count"):
        add(
            f"Write a Python function named `{name}` that returns how many items a list holds.",
            f"```python\ndef {name}(items):\n    return len(items)\n```",
        )
    story = " ".join(docstrings()[0].split()[:60])
    for lang in ("French", "German", "Spanish", "Italian"):
        add("Summarize this for me: " + story, "It describes a container type.", f"Now say it in {lang}.",
            f"Here it is in {lang}.")  # fmt: skip
    for lo, hi in ((3, 5), (3, 6), (4, 5)):
        add("Give me the next question.", "What is the capital of Peru?", f"Now count from {lo} to {hi}.",
            ", ".join(str(i) for i in range(lo, hi + 1)))  # fmt: skip
    for city, country in (("北京", "中国"), ("东京", "日本"), ("首尔", "韩国"), ("曼谷", "泰国")):
        add(f"{city}是哪个国家的首都？", f"{city}是{country}的首都。")
    for q in ("今天天气很好。", "我喜欢读书。", "这本书很有意思。"):
        add(f"请把这句话翻译成英文：{q}", {"今": "The weather is nice today.", "我": "I like reading.",
            "这": "This book is very interesting."}[q[0]])  # fmt: skip
    for k in range(5):
        rows = "\n".join(f"| {c} | {rnd.randint(1000, 99999)} |" for c in ("Oslo", "Lima", "Pune"))
        add(f"Make a markdown table of three cities with made-up populations (set {k}).",
            "| city | population |\n| --- | --- |\n" + rows)  # fmt: skip
    for i, doc in enumerate(docstrings()[1:41]):
        add(f"Explain item {i} of the documentation.", doc)
    for short in ("Yes.", "No.", "42", "Paris", "True"):
        add(f"One-word answer please: {short}?", short)
    return recs


def planted(recs: list[dict], rnd: random.Random) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """Distinct records plus planted duplicates right after a random later point: id -> (filter, survivor id)."""
    out = list(recs)
    fate: dict[str, tuple[str, str]] = {}
    for k, src in enumerate(rnd.sample(recs, 15)):  # case and whitespace copies
        cp = json.loads(json.dumps(src))
        m = cp["messages"]
        m[0]["content"] = m[0]["content"].upper() if k % 2 else "  " + m[0]["content"].replace(" ", "  ")
        m[-1]["content"] = m[-1]["content"].replace("\n", "  \r\n") + "\n"
        cp["id"] = f"x{k}"
        out.insert(rnd.randint(out.index(src) + 1, len(out)), cp)
        fate[cp["id"]] = ("exact_dup", src["id"])
    long = [r for r in recs if len(r["messages"][-1]["content"].split()) >= 20 and len(r["messages"]) == 2]
    for k, src in enumerate(rnd.sample(long, 10)):  # one word of a long answer changed, same prompt
        cp = json.loads(json.dumps(src))
        words = cp["messages"][-1]["content"].split(" ")
        i = rnd.choice([j for j, w in enumerate(words) if re.fullmatch(r"[A-Za-z]{3,}", w)])
        words[i] = "different"
        cp["messages"][-1]["content"] = " ".join(words)
        cp["id"] = f"n{k}"
        out.insert(rnd.randint(out.index(src) + 1, len(out)), cp)
        fate[cp["id"]] = ("near_dup", src["id"])
    return out, fate


def write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def cfg(tmp_path: Path, src: Path, **kw) -> CleanConfig:
    # the Gopher repetition filter (not dedup) takes a few of these docstrings ("the given ..." repeated): off here
    kw.setdefault("drop_repetitive", False)
    return CleanConfig(inputs=[src], out=tmp_path / "clean.jsonl", removed=tmp_path / "removed.jsonl", **kw)


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("seed", [0, 1])
def test_every_distinct_record_survives_and_planted_copies_go(tmp_path, seed):
    rnd = random.Random(seed)
    distinct = distinct_corpus(rnd)
    assert len(docstrings()) >= 41 and len(distinct) > 200
    recs, fate = planted(distinct, rnd)
    s = run(cfg(tmp_path, write(tmp_path / "in.jsonl", recs), workers=2, chunk_size=50))
    assert [r["id"] for r in read(tmp_path / "clean.jsonl")] == [r["id"] for r in distinct]
    removed = read(tmp_path / "removed.jsonl")
    assert {r["id"]: (r["removed"]["filter"], r["removed"]["duplicate_of"]) for r in removed} == fate
    assert s["removed_share"]["exact_dup"] == round(15 / len(recs), 4)


@pytest.mark.parametrize("on", ["answer", "prompt"])
def test_the_same_corpus_survives_near_dedup_on_one_side_only(tmp_path, on):
    """Comparing one side only, the prompt guard still keeps arithmetic, code and number records apart."""
    distinct = distinct_corpus(random.Random(2))
    s = run(cfg(tmp_path, write(tmp_path / "in.jsonl", distinct), near_on=on))
    assert s["out"] == len(distinct), s["examples"]


def test_300_sums_and_one_per_prompt(tmp_path):
    rnd = random.Random(3)
    pairs = rnd.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], 300)
    recs = [conv(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", rid=f"s{i}") for i, (a, b) in enumerate(pairs)]
    src = write(tmp_path / "sums.jsonl", recs)
    assert run(cfg(tmp_path, src))["out"] == 300
    assert run(cfg(tmp_path, src, one_per_prompt=True))["out"] == 300
    resampled = recs + [conv(r["messages"][0]["content"], "Another answer.", rid=f"t{i}") for i, r in
                        enumerate(recs[:10])]  # fmt: skip
    s = run(cfg(tmp_path, write(tmp_path / "n2.jsonl", resampled), one_per_prompt=True))
    assert s["out"] == 300 and s["removed"]["prompt_dup"] == 10


def mass_corpus(tmp_path: Path) -> Path:
    docs = docstrings()
    recs = []
    for i, doc in enumerate(docs[:20]):
        recs.append(conv("Explain this.", doc, rid=f"o{i}"))
        for k in range(2):
            words = doc.split(" ")
            words[len(words) // (k + 2)] = "changed"
            recs.append(conv("Explain this.", " ".join(words), rid=f"o{i}e{k}"))
    return write(tmp_path / "mass.jsonl", recs)


def test_mass_removal_stops_before_writing(tmp_path):
    src = mass_corpus(tmp_path)
    with pytest.raises(ImitateError) as err:
        run(cfg(tmp_path, src))
    msg = err.value.message
    assert "near_dup" in msg and "40 of 60 records (66.7%)" in msg and "nothing was written" in msg
    assert msg.count("kept    o") == 3 and msg.count("removed o") == 3 and "similarity 0." in msg
    assert "--max-removed 0.67" in err.value.hint and "--no-near-dedup" in err.value.hint
    assert not (tmp_path / "clean.jsonl").exists() and not (tmp_path / "removed.jsonl").exists()
    s = run(cfg(tmp_path, src, max_removed=0.67))
    assert s["out"] == 20 and s["removed_share"]["near_dup"] == round(40 / 60, 4)
    assert [r["id"] for r in read(tmp_path / "clean.jsonl")] == [f"o{i}" for i in range(20)]


def test_mass_removal_through_the_cli(tmp_path):
    src = mass_corpus(tmp_path)
    out = tmp_path / "c.jsonl"
    res = CliRunner().invoke(app, ["clean", str(src), "--out", str(out), "--keep-repetitive"])
    assert res.exit_code == 1 and not out.exists()
    assert "Error: the near_dup filter removed 40 of 60 records (66.7%)" in res.stderr
    assert "kept    o0:" in res.stderr and "removed o0e0:" in res.stderr
    assert "Hint:" in res.stderr and "--max-removed 0.67" in res.stderr
    assert "66.7%" in res.stderr.split("Error:")[0]  # the report table (each filter's share) came first
    allow = ["--keep-repetitive", "--max-removed", "0.7", "--json"]
    res = CliRunner().invoke(app, ["clean", str(src), "-o", str(out), *allow])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["removed"]["near_dup"] == 40 and len(read(out)) == 20
    refusals = write(tmp_path / "r.jsonl", [conv(f"q{i}", "As an AI language model, I cannot.", rid=f"r{i}")
                                            for i in range(4)])  # fmt: skip
    res = CliRunner().invoke(app, ["clean", str(refusals), "--out", str(out)])
    assert res.exit_code == 1 and "the refusal filter removed 4 of 4" in res.stderr
    assert "removed r0: matched" in res.stderr and "--keep-refusals" in res.stderr


def test_imitate_run_stops_at_a_clean_that_hit_the_stop(tmp_path):
    src = mass_corpus(tmp_path)
    pipe = tmp_path / "pipe.toml"
    pipe.write_text(f'[clean]\ninputs = ["{src.name}"]\nout = "runs/clean.jsonl"\ndrop-repetitive = false\n\n'
                    '[train]\nstudent = "nowhere"\nout = "runs/student"\n')  # fmt: skip
    res = CliRunner().invoke(app, ["run", str(pipe), "--json"])
    assert res.exit_code == 1, res.output
    runs = {r["name"]: r for r in json.loads(res.stdout)["runs"]}
    assert runs["clean"]["status"] == "failed" and "--max-removed" in runs["clean"]["error"]
    assert runs["train"]["status"] != "ran" and not (tmp_path / "runs" / "clean.jsonl").exists()
