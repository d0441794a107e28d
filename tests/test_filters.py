"""Each clean filter on records that must and must not be removed; repetition statistics against a naive reference."""

from __future__ import annotations

import json
import random
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from imitate.clean import filters as F
from imitate.clean import repetition as R
from imitate.clean.stage import CleanConfig


def rec(answer: str, prompt: str = "What is the capital of France?", **extra) -> dict:
    r = {
        "id": "x",
        "teacher": "openai:gpt-4o-mini",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        + ([{"role": "assistant", "content": answer}] if answer is not None else []),
        "finish_reason": "stop",
    }
    r.update(extra)
    return r


def built(**kw) -> dict:
    return F.build_filters(CleanConfig(out=Path("x"), **kw))


# --- failed / truncated -----------------------------------------------------------------------------------------------


def test_failed_removes_errors_missing_and_empty_answers():
    assert F.failed(rec("Paris.")) is None
    assert F.failed(rec("", error="HTTP 500")).startswith("error")
    assert F.failed(rec(None)) == "no assistant answer"
    assert F.failed(rec("   \n ")) == "empty answer"


def test_truncated_only_on_length():
    assert F.truncated(rec("Paris.")) is None
    assert F.truncated(rec("Paris is the cap", finish_reason="length")) == "finish_reason=length"
    assert F.truncated(rec("Paris.", finish_reason="end_turn")) is None


def test_failed_and_truncated_can_be_switched_off():
    assert "failed" in built() and "truncated" in built()
    assert "failed" not in built(drop_failed=False)
    assert "truncated" not in built(drop_truncated=False)


# --- length / ratio ---------------------------------------------------------------------------------------------------


def test_length_bounds_per_role_in_chars_and_words():
    f = built(min_words={"assistant": 3}, max_chars={"prompt": 40})["length"]
    assert f(rec("Paris is the capital.")) is None
    assert "assistant has 1 words < 3" in f(rec("Paris."))
    long_prompt = "word " * 20
    assert "prompt has" in f(rec("Paris is the capital.", prompt=long_prompt))
    g = built(max_words={"user": 3})["length"]
    assert g(rec("ok fine then", prompt="one two three")) is None
    assert g(rec("ok fine then", prompt="one two three four")) is not None


def test_ratio_bounds():
    f = built(min_ratio=0.5, max_ratio=4.0)["ratio"]
    assert f(rec("Paris is the capital city.", prompt="Capital of France, please?")) is None
    assert "<" in f(rec("Paris.", prompt="Tell me everything you know about the capital of France"))
    assert ">" in f(rec("word " * 30, prompt="Capital?"))
    assert "ratio" not in built()


# --- refusals ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "As an AI language model, I do not have opinions.",
        "I'm sorry, but I can't help with that request.",
        "I can\u2019t help with that.",
        "I\u2019m ChatGPT, a model.",  # a `re:` line, with a curly apostrophe
        "I cannot\n  assist with this.",
        "As of my last knowledge update in 2023, the population was 2.1 million.",
        "I am Claude, an AI assistant.",
        "Sure. I was trained by OpenAI, and the answer is 4.",
    ],
)
def test_refusal_removed(answer):
    assert built()["refusal"](rec(answer)) is not None


@pytest.mark.parametrize(
    "answer",
    [
        "Paris is the capital of France.",
        "I can help with that: the answer is 4.",
        "The model cannot handle inputs longer than 512 tokens.",
        "Claude Monet painted water lilies.",
    ],
)
def test_refusal_kept(answer):
    assert built()["refusal"](rec(answer)) is None


def test_refusal_list_is_extensible_and_replaceable(tmp_path):
    extra = tmp_path / "mine.txt"
    extra.write_text("# my boilerplate\nHope this helps!\nre:\\bcertainly!? here is\n", encoding="utf-8")
    f = built(refusals=[extra])["refusal"]
    assert f(rec("Paris. Hope   this helps!")) is not None
    assert f(rec("Certainly! Here is the answer: Paris.")) is not None
    assert f(rec("As an AI language model, no.")) is not None  # defaults still on
    g = built(refusals=[extra], default_refusals=False)["refusal"]
    assert g(rec("As an AI language model, no.")) is None
    bad = tmp_path / "bad.txt"
    bad.write_text("re:(unclosed\n", encoding="utf-8")
    with pytest.raises(F.InputError, match=r"bad.txt:1"):
        built(refusals=[bad])


def test_trie_regex_matches_exactly_the_phrases():
    phrases = ["i cannot help", "i cannot assist", "i cannot", "as an ai"]
    pat = re.compile(F._trie_regex([p.split() for p in phrases]))
    for p in phrases:
        assert pat.fullmatch(p), p
    assert pat.search("so i  cannot\thelp you").group(0) == "i  cannot\thelp"
    assert not pat.search("i can help")


# --- repetition -------------------------------------------------------------------------------------------------------


def naive_stats(text: str) -> dict[str, float]:
    """Straightforward Python version of the Gopher statistics as documented in imitate/filters.py."""
    words = re.findall(r"\w+", text.lower())
    total = sum(len(w) for w in words) or 1
    out = {}
    for n in (2, 3, 4):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        c = Counter(grams)
        best = max(((cnt, cnt * sum(map(len, g))) for g, cnt in c.items() if cnt > 1), default=(0, 0))
        out[f"top_{n}gram_frac"] = best[1] / total
    for n in range(5, 11):
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            g = tuple(words[i : i + n])
            if g in seen:
                for j in range(i, i + n):
                    covered[j] = True
            seen.add(g)
        out[f"dup_{n}gram_char_frac"] = sum(len(w) for w, c in zip(words, covered) if c) / total
    lines = [ln.strip() for ln in text.split("\n") if re.search(r"\w", ln)]
    dup = [ln for i, ln in enumerate(lines) if ln in lines[:i]]
    out["dup_line_frac"] = len(dup) / max(1, len(lines))
    out["dup_line_char_frac"] = sum(map(len, dup)) / max(1, sum(map(len, lines)))
    return out


def test_repetition_stats_match_naive_reference():
    rnd = random.Random(0)
    vocab = ["alpha", "be", "c", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = []
    for _ in range(30):
        words = rnd.choices(vocab, k=rnd.randint(0, 60))
        if rnd.random() < 0.5 and words:
            words = words + words[: rnd.randint(1, len(words))]  # plant a repeat
        lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 7)]
        texts.append("\n".join(lines + lines[: rnd.randint(0, 2)]))
    batch = R.repetition_stats_batch(texts)
    for i, t in enumerate(texts):
        ref = naive_stats(t)
        for name, v in ref.items():
            assert batch[name][i] == pytest.approx(v), (name, t)
        assert R.repetition_stats(t)[name] == pytest.approx(ref[name])


def test_repetition_filter_removes_loops_and_keeps_prose():
    f = built()["repetition"]
    prose = (
        "Paris is the capital and most populous city of France. It sits on the Seine in the north of the country. "
        "The city has been a major centre of finance, diplomacy, commerce, fashion and science for centuries. "
        "Its museums, including the Louvre, draw millions of visitors each year, and its cafés and parks shape "
        "daily life for more than two million residents who live within the city limits."
    )
    assert f(rec(prose)) is None
    loop = prose + " " + " ".join(["I will now repeat the answer again."] * 12)
    assert f(rec(loop)) is not None
    lines = "\n".join(["- Step: mix the flour and the water well"] * 10 + ["done " * 20])
    assert "dup_line" in f(rec(lines))
    short_loop = "yes yes yes yes yes"  # under repetition_min_words: not checked
    assert f(rec(short_loop)) is None
    assert "repetition" not in built(drop_repetitive=False)


# --- language ---------------------------------------------------------------------------------------------------------


def test_language_filter_skipped_with_a_note_without_detector(monkeypatch):
    monkeypatch.setitem(sys.modules, "langid", None)
    monkeypatch.setitem(sys.modules, "langdetect", None)
    notes: list[str] = []
    fs = F.build_filters(CleanConfig(out=Path("x"), language=["en"]), notes)
    assert "language" not in fs
    assert any("skipped" in n for n in notes)


def test_language_filter_with_a_detector(monkeypatch):
    fake = types.ModuleType("langid")
    fake.classify = lambda text: ("fr" if "le" in text.split() else "en", 1.0)
    monkeypatch.setitem(sys.modules, "langid", fake)
    f = built(language=["en"])["language"]
    assert f(rec("Paris is the capital of France.")) is None
    assert f(rec("Paris est le chef-lieu de la France.")) == "language fr"


# --- decontamination --------------------------------------------------------------------------------------------------

EVAL_Q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def write_eval(tmp_path: Path) -> Path:
    p = tmp_path / "eval.jsonl"
    rows = [
        {"question": EVAL_Q, "answer": "72"},
        {"messages": [{"role": "user", "content": "Name the largest planet in the solar system, please, right now."}]},
        {"prompt": "short one", "reference": "x"},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def test_decontamination_drops_records_sharing_an_ngram(tmp_path):
    f = built(decontaminate=[write_eval(tmp_path)])["decontaminate"]
    quoted = "Solve: natalia sold clips to 48 of her friends in april and then she sold half as many. Thanks"
    assert "eval.jsonl:1" in f(rec("72", prompt=quoted))
    # a short eval text (8+ words, under 13) counts as a whole
    assert "eval.jsonl:2" in f(
        rec("It is Jupiter.", prompt="name the largest planet in the solar system please right now")
    )
    assert f(rec("It is Jupiter.", prompt="Which planet is largest in our solar system?")) is None
    # 12 shared words are not 13
    near_miss = "natalia sold clips to 48 of her friends in april and then"
    assert f(rec("ok", prompt=near_miss + " he bought pens")) is None
    # eval texts under decontaminate_min_words ("short one", "72", "x") never match
    assert f(rec("short one x 72")) is None


def test_decontamination_ngram_is_configurable(tmp_path):
    f = built(decontaminate=[write_eval(tmp_path)], decontaminate_ngram=5)["decontaminate"]
    assert f(rec("ok", prompt="we know she sold half as many clips")) is not None
