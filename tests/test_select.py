"""`imitate clean --select agree|judge` on hand-made groups: majorities, ties, no majority, duplicates that vote;
a scripted judge on the loopback server (scores, ties, errors and retries, a failure for good, budget stop, never
paid twice), the report per teacher and the dataset card."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate.clean.select import final_answer, majority, parse_score
from imitate.clean.stage import CleanConfig, run
from imitate.cli import app
from imitate.errors import BudgetExceeded, UsageError
from imitate.records import request_id

T1, T2 = "openai:teacher-one", "anthropic:teacher-two"


def rec(prompt: str | list[dict], answer: str, teacher: str = T1, sample: int = 0) -> dict:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    params = {"temperature": 0.7, "max_tokens": 256}
    return {"id": request_id(teacher, messages, params, sample), "teacher": teacher,
            "messages": [*messages, {"role": "assistant", "content": answer}], "params": params, "sample": sample,
            "finish_reason": "stop", "usage": {"input_tokens": 9, "output_tokens": 9}, "source": {}}


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def answers(path: Path) -> list[str]:
    return [r["messages"][-1]["content"] for r in read(path)]


# --- final answers and majorities -------------------------------------------------------------------------------


def test_final_answer_shapes():
    assert final_answer("17 * 23: first 17 * 20 = 340, then 17 * 3 = 51, so 391.") == "391"
    assert final_answer("The total is 1,234.50 dollars") == "1234.5" and final_answer("x = 12.0") == "12"
    assert final_answer("minus: -7") == "-7"
    assert final_answer("The capital is...\n\n  **Paris.**  \n") == "paris"
    assert final_answer("Die Hauptstadt ist\nBERLIN") == "berlin"
    assert final_answer("work\n#### 42\nthanks, 7 more", r"#### (\d+)") == "42"
    assert final_answer("Answer: Forty-Two!", r"Answer: (.+)") == "forty-two"
    assert final_answer("no marker here", r"#### (\d+)") is None and final_answer("   \n") is None


def test_majority_needs_a_unique_top_held_by_two():
    assert majority(["4", "4", "5"]) == "4" and majority(["4", "4", "5", "6", "7"]) == "4"
    assert majority(["4", "4", "5", "5"]) is None  # a tie at the top
    assert majority(["1", "2", "3"]) is None and majority(["9"]) is None and majority([]) is None
    assert majority([None, None, "3", "3"]) == "3"  # answers without a final answer never agree


# --- agree through clean ----------------------------------------------------------------------------------------


def agree_corpus() -> list[dict]:
    multi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Wie viele Beine hat eine Spinne?"}]
    return [
        # 5 samples over two teachers, 3 say 391 (in different words), one 381, one 401
        rec("What is 17 * 23?", "17 * 23 = 391", T1, 0),
        rec("What is 17 * 23?", "Let me think: 17 times 20 is 340 and 17 times 3 is 51. Total 381.", T1, 1),
        rec("What is 17 * 23?", "The product is 391.", T2, 0),
        rec("What is 17 * 23?", "Multiplying gives 401", T2, 1),
        rec("What is 17 * 23?", "Answer: 391", T2, 2),
        # a tie: 2 vs 2
        rec("Pick 7 or 8", "I pick 7", T1, 0), rec("Pick 7 or 8", "seven... no wait: 8", T1, 1),
        rec("Pick 7 or 8", "my choice is 7", T2, 0), rec("Pick 7 or 8", "eight: 8", T2, 1),
        # one answer alone
        rec("Name a colour", "Blue, like the sea.", T1, 0),
        # multi-turn, non-English: words, no numbers; the exact duplicate of "Acht." still votes for it
        rec(multi, "Eine Spinne hat\nAcht.", T1, 0), rec(multi, "Eine Spinne hat\nAcht.", T1, 1),
        rec(multi, "Sie hat\nsechs.", T2, 0),
    ]


def test_agree_keeps_the_majority_and_no_majority_groups_by_default(tmp_path):
    src = write(tmp_path / "r.jsonl", agree_corpus())
    s = run(CleanConfig(inputs=[src], out=tmp_path / "c.jsonl", removed=tmp_path / "rm.jsonl", select="agree"))
    kept = answers(tmp_path / "c.jsonl")
    assert "Multiplying gives 401" not in kept and not any("381" in a for a in kept)
    assert {"17 * 23 = 391", "The product is 391.", "Answer: 391"} <= set(kept)
    assert {"I pick 7", "seven... no wait: 8", "my choice is 7", "eight: 8", "Blue, like the sea."} <= set(kept)
    assert "Eine Spinne hat\nAcht." in kept and "Sie hat\nsechs." not in kept  # 2 (one a duplicate) to 1
    assert s["removed"]["exact_dup"] == 1 and s["removed"]["select"] == 3
    sel = s["select"]
    assert sel["groups"] == 4 and sel["with_majority"] == 2 and sel["without_majority"] == 2
    assert sel["per_teacher"][T2] == {"agree": 2, "disagree": 2, "no_majority": 2}
    removed = {r["messages"][-1]["content"]: r["removed"] for r in read(tmp_path / "rm.jsonl")}
    assert removed["Multiplying gives 401"]["filter"] == "select"
    assert "'401' is not the majority '391' (3 of 5)" in removed["Multiplying gives 401"]["detail"]
    assert read(tmp_path / "c.jsonl")[0] == agree_corpus()[0]  # kept records are verbatim


def test_agree_no_majority_drop_and_a_pattern(tmp_path):
    src = write(tmp_path / "r.jsonl", agree_corpus())
    s = run(CleanConfig(inputs=[src], out=tmp_path / "c.jsonl", select="agree", no_majority="drop"))
    kept = answers(tmp_path / "c.jsonl")
    assert not any(a in kept for a in ("I pick 7", "eight: 8", "Blue, like the sea."))
    assert s["removed"]["select"] == 3 + 5
    # a pattern that finds nothing anywhere: no group has a majority, and with --no-majority keep nothing goes
    s2 = run(CleanConfig(inputs=[src], out=tmp_path / "c2.jsonl", select="agree", answer_pattern=r"#### (\d+)"))
    assert s2["removed"]["select"] == 0 and s2["select"]["with_majority"] == 0


def test_agree_on_single_samples_says_there_is_nothing_to_compare(tmp_path):
    src = write(tmp_path / "r.jsonl", [rec(f"What is {i} + {i}?", f"It is {2 * i}.") for i in range(4)])
    s = run(CleanConfig(inputs=[src], out=tmp_path / "c.jsonl", select="agree"))
    assert s["out"] == 4 and any("nothing to compare" in n for n in s["select"]["notes"])


# --- judge ----------------------------------------------------------------------------------------------------------


def scripted(body: dict, server: FakeServer) -> str:
    """The judge: scores the answer by the [q=N] mark it carries; no mark, no score."""
    text = body["messages"][-1]["content"]
    answer = text.split("### Answer", 1)[1]
    m = re.search(r"\[q=(\d+)\]", answer)
    return f"The answer is fine as far as I can tell.\nScore: {m.group(1)}" if m else "I cannot tell."


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    from imitate.collect.limiter import RetryPolicy

    monkeypatch.setattr("imitate.collect.engine.RetryPolicy", functools.partial(RetryPolicy, base=0.01))


@pytest.fixture
def server():
    with FakeServer(retry_after=0.01, responder=scripted) as s:
        yield s


def judge_corpus() -> list[dict]:
    return [
        rec("Explain recursion", "A function calling itself. [q=6]", T1, 0),
        rec("Explain recursion", "Recursion: a function defined by itself, with a base case. [q=9]", T2, 0),
        rec("Explain recursion", "It is when loops loop. [q=2]", T2, 1),
        rec("Translate 'chat' to English", "cat [q=8]", T1, 0),
        rec("Translate 'chat' to English", "The word means cat. [q=8]", T2, 0),  # a tie: the first is kept
        rec("Write def add(a, b):", "def add(a, b):\n    return a + b  [q=10]", T1, 0),
    ]


def jcfg(server, tmp_path, **kw) -> CleanConfig:
    opts = {"base-url": server.base_url + "/v1", "progress": False, "retries": 3, **kw.pop("options", {})}
    return CleanConfig(inputs=[write(tmp_path / "r.jsonl", kw.pop("records", judge_corpus()))],
                       out=tmp_path / "c.jsonl", removed=tmp_path / "rm.jsonl", select="judge",
                       judge="openai:judge-model", judge_options=opts, **kw)


def test_judge_keeps_the_best_of_each_group_and_stores_score_and_reason(server, tmp_path):
    s = run(jcfg(server, tmp_path))
    kept = read(tmp_path / "c.jsonl")
    assert [r["messages"][-1]["content"] for r in kept] == [
        "Recursion: a function defined by itself, with a base case. [q=9]", "cat [q=8]",
        "def add(a, b):\n    return a + b  [q=10]"]
    assert kept[0]["judge"] == {"model": "openai:judge-model", "score": 9.0,
                                "reason": "The answer is fine as far as I can tell."}
    assert all(r["judge"]["score"] for r in read(tmp_path / "rm.jsonl"))
    sel = s["select"]
    assert sel["judged"] == 6 and sel["unjudged"] == 0 and sel["removed"] == 3
    assert sel["scores"] == {T1: {"6": 1, "8": 1, "10": 1}, T2: {"2": 1, "8": 1, "9": 1}}
    assert server.count() == 6 and all(h["body"]["temperature"] == 0 for h in server.history)
    card = (tmp_path / "c.README.md").read_text()
    assert "openai:judge-model" in card and "## Selection" in card
    # a re-run pays for nothing: every score is in the judge journal
    run(jcfg(server, tmp_path))
    assert server.count() == 6 and read(tmp_path / "c.jsonl") == kept


def test_judge_min_score_keep_all(server, tmp_path):
    s = run(jcfg(server, tmp_path, keep="all", min_judge_score=8))
    assert sorted(r["judge"]["score"] for r in read(tmp_path / "c.jsonl")) == [8, 8, 9, 10]
    assert s["removed"]["select"] == 2


def test_judge_errors_are_retried_and_a_failure_for_good_leaves_its_group_whole(server, tmp_path):
    server.enqueue("500", "429", "malformed")
    server.fail_when["loops loop"] = "500"  # one answer's judging fails every time
    recs = [*judge_corpus(), rec("Say hi", "hello there"), rec("Say hi", "hi! [q=7]", T2)]  # no mark: no score
    s = run(jcfg(server, tmp_path, records=recs))
    sel = s["select"]
    assert sel["unjudged"] == 2 and sel["judged"] == 6
    kept = answers(tmp_path / "c.jsonl")
    assert {"A function calling itself. [q=6]", "It is when loops loop. [q=2]", "hello there", "hi! [q=7]"} <= set(kept)
    failed = [r for r in read(tmp_path / "c.jsonl") if r["messages"][-1]["content"] == "It is when loops loop. [q=2]"]
    assert failed[0]["judge"]["score"] is None and "failed" in failed[0]["judge"]["error"]
    assert any("Run the same clean again" in n for n in sel["notes"])
    # the server recovers: only the failed answer is judged again, and its group is now selected
    del server.fail_when["loops loop"]
    before = server.count()
    s2 = run(jcfg(server, tmp_path, records=recs))
    assert server.count() == before + 1 and s2["select"]["unjudged"] == 1  # "hello there" still has no score
    assert "It is when loops loop. [q=2]" not in answers(tmp_path / "c.jsonl")


def test_judge_budget_stop_writes_nothing(server, tmp_path):
    opts = {"max-cost": 0.00001, "price-in": 1.0, "price-out": 1.0}
    with pytest.raises(BudgetExceeded):
        run(jcfg(server, tmp_path, options=opts))
    assert server.count() == 0 and not (tmp_path / "c.jsonl").exists()
    r = CliRunner().invoke(app, ["clean", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "c.jsonl"), "--select",
                                 "judge", "--judge", "openai:judge-model", "--judge-option",
                                 f"base-url={server.base_url}/v1", "--judge-option", "max-cost=0.00001",
                                 "--judge-option", "price-in=1", "--judge-option", "price-out=1"])
    assert r.exit_code == 4 and "--max-cost" in r.stderr and "Traceback" not in r.output


def test_select_options_are_checked_when_built(tmp_path):
    base = dict(inputs=[tmp_path / "r.jsonl"], out=tmp_path / "c.jsonl")
    with pytest.raises(UsageError, match="needs --judge"):
        CleanConfig(**base, select="judge")
    with pytest.raises(UsageError, match="not a valid regex"):
        CleanConfig(**base, select="agree", answer_pattern="(")
    with pytest.raises(UsageError, match="set by the judge run itself"):
        CleanConfig(**base, select="judge", judge="openai:j", judge_options={"teacher": "openai:x"})
    with pytest.raises(UsageError, match="need --select judge"):
        CleanConfig(**base, judge="openai:j")
    with pytest.raises(UsageError, match="one-per-prompt"):
        CleanConfig(**base, select="agree", one_per_prompt=True)
    r = CliRunner().invoke(app, ["clean", str(tmp_path / "r.jsonl"), "--out", "c.jsonl", "--select", "judge",
                                 "--judge", "openai:j", "--judge-option", "rmp=5"])
    assert r.exit_code != 0 and "did you mean 'rpm'" in r.stderr


def test_parse_score():
    assert parse_score("Good.\nScore: 7") == (7.0, "Good.")
    assert parse_score("score 3 at first... final **Score: 9/10**")[0] == 9.0
    assert parse_score("Score: 11")[0] is None and parse_score("no number")[0] is None
