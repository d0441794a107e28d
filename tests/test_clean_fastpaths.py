"""The quick paths of `imitate clean` give what the plain functions give: batched pair similarities, the keys' texts
computed once per prompt, the direct JSON scan, and the dataset card's counts gathered in the map step."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

import imitate.cards as cards
import imitate.clean.stage as stage
from imitate.clean.dedup import NearDup
from imitate.clean.filters import refusal, required_run
from imitate.clean.keys import (
    RecordTexts,
    conversation_text,
    near_turns,
    normalized_messages,
    prompt_guard,
    split_turns,
)
from imitate.clean.minhash import exact_key, stable_hash64
from imitate.clean.stage import CleanConfig, run
from imitate.jsonl import parse
from imitate.records import dumps


def test_batched_similarities_equal_the_pairwise_similarity():
    rng = np.random.default_rng(0)

    def turn_sets(k: int) -> list[np.ndarray]:  # small alphabets, so pairs share shingles; some sets empty
        sets = [rng.integers(0, 40, int(rng.integers(0, 25))) for _ in range(k)]
        return [np.unique(s).astype(np.uint32) for s in sets]

    pairs = [(turn_sets(int(rng.integers(1, 4))), turn_sets(int(rng.integers(1, 4)))) for _ in range(2000)]
    pairs += [(a, [x.copy() for x in a]) for a, _ in pairs[:50]]  # identical records: 1.0
    got = NearDup.similarities(pairs)
    ref = np.array([NearDup.similarity(a, b) for a, b in pairs])
    assert got.tolist() == ref.tolist()  # the same floats, not only close ones
    assert (ref > 0).sum() > 200 and (ref == 1.0).sum() >= 50 and (ref == 0).sum() > 200
    assert NearDup.similarities([]).shape == (0,)


def records() -> list[dict]:
    rnd = random.Random(3)
    prompts = ["Write a paragraph.", "What is 12 + 30?", "Explain `parse_date` and parseDate.", "  Twice   THREE  ",
               "Ｆｕｌｌ width １２ and x²", "写一段话。", "line one\n\n  indented\r\nlast"]  # fmt: skip
    out = []
    for i in range(300):
        p, a = rnd.choice(prompts), f"Answer {i}: " + " ".join(rnd.choice(prompts) for _ in range(3))
        shape = i % 7
        if shape == 0:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        elif shape == 1:
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p},
                    {"role": "assistant", "content": a}]  # fmt: skip
        elif shape == 2:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "more"}, {"role": "assistant", "content": a}]  # fmt: skip
        elif shape == 3:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": a}, {"role": "user", "content": p}]
        elif shape == 4:
            msgs = [{"role": "assistant", "content": a}]
        elif shape == 5:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]
        else:
            msgs = [{"role": "user", "content": ""}, {"role": "tool", "content": p},
                    {"role": "assistant", "content": a}]  # fmt: skip
        out.append({"messages": msgs})
    return out


@pytest.mark.parametrize("on", ["both", "prompt", "answer"])
def test_record_texts_equal_the_plain_key_functions(on):
    texts = RecordTexts(on, prompt_key=True, near=True)
    for rec in records():
        norm = normalized_messages(rec)
        roles, turns = near_turns(rec, on, norm)
        want = (conversation_text(norm), exact_key(conversation_text(split_turns(norm)[0])), turns,
                stable_hash64(prompt_guard(rec, roles)))  # fmt: skip
        assert texts(rec) == want
    assert 0 < len(texts.memo) < 60  # prompts were computed once each


def test_parse_fast_path_gives_json_loads_values_and_errors():
    lines = ['{"a": 1}\n', '{"a": [1, 2, {"b": null}]}\r\n', '  {"a": 1}  \n', '{"a": 1} x\n', '{"a": 1}{"b": 2}',
             "\ufeff{}", "[1, 2]", "3", '"s"', "", "\n", "{", '{"a": NaN}', "[" * 100_000,
             '{"a": "\\ud800"}']  # fmt: skip
    for line in lines:
        try:
            want = (json.loads(line), None)
        except json.JSONDecodeError as exc:
            want = (None, f"not valid JSON ({exc.msg} at column {exc.colno})")
        except RecursionError:
            want = (None, "not valid JSON (nested too deeply)")
        got = parse(line.encode("utf-8", "surrogatepass"))
        if want[1] is None:
            assert got == want
        else:
            assert got[0] is None and got[1] is not None and (got == want or "UTF-8" in got[1])


def corpus(path: Path, odd: str) -> Path:
    rnd = random.Random(7)
    lines = []
    for i in range(400):
        rec = {"id": str(i), "teacher": rnd.choice(["openai:gpt-4o-mini", "a:b", None, 3]),
               "usage": rnd.choice([{"input_tokens": 3, "output_tokens": 5}, {"output_tokens": "7"}, None, [1]]),
               "messages": [{"role": "user", "content": f"Question {i % 50}"},
                            {"role": "assistant", "content": f"An answer about item {i % 90}, long."}]}  # fmt: skip
        lines.append(dumps(rec).encode())
        if i % 97 == 5:
            lines += [b"{not json", b'{"messages": [], "usage": {"input_tokens": 11}}', b"[1, 2]", b"", b"  "]
    lines.insert(3, b'{"id": "x", "messages": [{"role": "user", "content": "\xff"}], "usage": {"input_tokens": 2}}')
    if odd == "bare CR":  # a text-mode read sees two lines
        lines.insert(9, b'{"id": "cr",\r"messages": [{"role": "user", "content": "hi"}]}')
    if odd == "huge count":  # past int32
        big = b'{"id": "big", "usage": {"input_tokens": 3000000000}, "messages": [{"role": "user", "content": "x"}]}'
        lines.insert(9, big)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("odd", ["", "bare CR", "huge count"])
def test_dataset_card_counts_from_the_map_step_equal_its_own_read(tmp_path, monkeypatch, odd):
    src = corpus(tmp_path / "in.jsonl", odd)
    read: list[str] = []
    count = cards._count
    monkeypatch.setattr(cards, "_count", lambda p: (read.append(Path(p).name), count(p))[1])

    def clean(name: str, workers: int) -> bytes:
        out = tmp_path / name / "clean.jsonl"
        run(CleanConfig(inputs=[src], out=out, on_bad_line="skip", max_removed=1.0, workers=workers, chunk_size=70))
        card = cards.dataset_card_path(out).read_text(encoding="utf-8")
        return card.replace(name, "X").replace(" --workers 2", "").encode()  # (the command says how it ran)

    fast = clean("fast", 1)
    assert read == (["clean.jsonl", "in.jsonl"] if odd else [])  # the card reads the files itself
    assert clean("fast2", 2) == fast
    monkeypatch.setattr(stage, "_counted", lambda *a: {})
    read.clear()
    assert clean("slow", 1) == fast
    assert read == ["clean.jsonl", "in.jsonl"]
    assert b"openai:gpt-4o-mini" in fast


def test_refusal_prefilter_skips_only_texts_without_a_match():
    pats = [r"(?:trained|developed|made) by (?:openai|meta)\b", r"my name is (?:claude|qwen)", r"x(?i:hello)yz",
            r"(?:foo|bar) baz+", r"a\.b\.c", r"he(?:llo)? wor", r"(?i)abc def", r"[a]bc d"]  # fmt: skip
    pieces = ["trained", "made", " by ", "openai", "meta", "my name is ", "claude", "x", "hello", "HELLO", "yz",
              "foo", "bar", " baz", "z", "a.b.c", "abc", "he", "llo", " wor", " ", "abc def", "ABC DEF",
              "bc d"]  # fmt: skip
    rnd = random.Random(2)
    texts = ["".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 8))) for _ in range(5000)]
    compiled = [re.compile(p) for p in pats]
    assert [required_run(p) for p in compiled][:2] == [" by ", "my name is "]
    hits = 0
    for text in texts:
        for p in compiled:
            m, run = p.search(text), required_run(p)
            assert m is None or run is None or run in text
            hits += m is not None
        low = text.lower()  # (the filter reads the answer lowercased)
        want = next((f"matched {m.group(0)!r}" for p in compiled if (m := p.search(low))), None)
        assert refusal({"messages": [{"role": "assistant", "content": text}]}, patterns=compiled) == want
    assert hits > 500


def test_plain_record_check_agrees_with_record_problem_and_as_text():
    from imitate.clean.scan import _plain
    from imitate.records import as_text, record_problem

    ok = {"role": "user", "content": "hi"}
    values = [None, 1, "s", [], {}, {"messages": []}, {"messages": [ok]}, {"messages": ok},
              {"messages": [ok, {"role": "assistant", "content": ""}]}, {"messages": [ok], "context": []},
              {"messages": [ok], "context": [ok]}, {"messages": [ok], "context": {}}, {"messages": [ok], "context": 0},
              {"messages": [{"role": "robot", "content": "x"}]}, {"messages": [{"role": ["user"], "content": "x"}]},
              {"messages": [{"role": "user"}]}, {"messages": [{"content": "x"}]}, {"messages": [ok, 3]},
              {"messages": [{"role": "user", "content": None}]},
              {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}]  # fmt: skip
    for v in values:
        plain = _plain(v)
        assert not plain or (record_problem(v) is None and as_text(v) is v), v
    assert [_plain(v) for v in values].count(True) == 3


@pytest.mark.parametrize("near_on", ["both", "prompt"])
def test_exact_check_on_kept_turns_equals_reading_the_records_again(tmp_path, monkeypatch, near_on):
    """The map step keeps the candidates' turns (in-process, within a budget) so the exact check need not read and
    parse them again: all kept, some kept (the budget runs out mid-run), none kept -- the same files."""
    from test_clean_shapes import distinct_corpus, planted, write

    import imitate.clean.scan as scan
    import imitate.clean.verify as verify

    recs, _ = planted(distinct_corpus(random.Random(1))[::-1], random.Random(1))  # (long answers first)
    src = write(tmp_path / "in.jsonl", recs)
    read_lines = []
    real_pick = verify.pick

    def counting_pick(paths, want):
        read_lines.append(len(want))
        return real_pick(paths, want)

    monkeypatch.setattr(verify, "pick", counting_pick)
    total = sum(len(t) for r in recs for t in RecordTexts(near_on)(r)[2])
    outs = {}
    for budget in (1 << 26, total // 2, 0):
        monkeypatch.setattr(scan, "TURN_BUDGET", budget)
        d = tmp_path / str(budget)
        d.mkdir()
        run(CleanConfig(inputs=[src], out=d / "c.jsonl", removed=d / "r.jsonl", chunk_size=40, near_on=near_on,
                        drop_repetitive=False))  # fmt: skip
        outs[budget] = ((d / "c.jsonl").read_bytes(), (d / "r.jsonl").read_bytes())
    assert outs[1 << 26] == outs[total // 2] == outs[0]
    assert read_lines[0] == 0 and 0 < read_lines[1] < read_lines[2]  # all kept; some; none
    assert b'"near_dup"' in outs[0][1]


def test_pick_reads_only_up_to_the_last_wanted_line(tmp_path):
    from imitate.jsonl import pick

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"1\n2\n3\n")
    b.write_bytes(b"4\n5\n")
    assert list(pick([a, b], {(0, 2): "x", (1, 2): "y"})) == [("x", b"2\n"), ("y", b"5\n")]
    assert list(pick([a, b], {})) == []
    a.write_bytes(b"1\n2\n" + b"x" * 100 + b"\n")  # past the last wanted line: not read (here: too long to read)
    assert list(pick([a, b], {(0, 1): "z"})) == [("z", b"1\n")]


@pytest.mark.parametrize("enabled", [True, False])
def test_clean_pauses_the_cyclic_collector_and_puts_it_back(tmp_path, monkeypatch, enabled):
    import gc

    seen = []
    real = stage._run
    monkeypatch.setattr(stage, "_run", lambda cfg: seen.append(gc.isenabled()) or real(cfg))
    src = tmp_path / "in.jsonl"
    src.write_text(dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    (gc.enable if enabled else gc.disable)()
    try:
        run(CleanConfig(inputs=[src], out=tmp_path / "c.jsonl"))
        assert seen == [False] and gc.isenabled() is enabled
    finally:
        gc.enable()
