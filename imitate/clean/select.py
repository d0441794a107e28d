"""`imitate clean --select agree|judge`: among the answers that share a student view, keep the ones that hold up.

A group is every record left after the filters and dedup whose `messages` before the answer are the same: the --n
samples of one prompt, from one teacher or several. This step runs after dedup and only removes records (status
"select", with the reason), so kept records stay verbatim except for the `judge` field a judge adds.

agree (self-consistency): each answer's final answer is read (--answer-pattern, else the last number, else the
normalized last line). The group's majority is the answer held by the most records, when no other answer is held by
as many and at least two hold it. Records removed as duplicates of a group member still vote (an exact duplicate is a
second sample saying the same thing), but only the group's live records are kept or removed. Groups without a
majority are kept whole or dropped (--no-majority).

judge: each live answer is sent to --judge with the rubric template, through `imitate collect` itself (journal
CLEAN.judge.jsonl beside the output, limiter, retries, --max-cost, batch), so a re-run never pays for a score twice.
The score and the judge's reason go into the record as `judge`; --keep best keeps the top score of each group (ties:
input order), --keep all every answer; --min-judge-score drops those below it. An answer the judge did not score
(failed after retries, or a reply without "Score: N") keeps its whole group unselected and is counted as unjudged.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from imitate.records import assistant_text, dumps, prompt_messages

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
SCORE = re.compile(r"score\W{0,4}(\d+(?:\.\d+)?)", re.IGNORECASE)
VOTERS = ("", "exact_dup", "near_dup")
# The built-in rubric (Jinja2, the blocks of imitate.collect.templates): variables prompt (the conversation before the
# answer, as text), answer, teacher. The reply must end with "Score: N" (1-10); the last one is read.
RUBRIC = """\
{% block system %}You grade answers written by AI assistants. You are strict, fair and brief.{% endblock %}
{% block user %}Rate the answer below for correctness and helpfulness, from 1 to 10:
1-3: wrong, unsafe or useless; 4-6: partly right or unhelpful; 7-8: correct and helpful; 9-10: correct, complete and
clear. A wrong final result is at most 3, however well it is written.

### Request
{{ prompt }}

### Answer
{{ answer }}

First give a short reason (one or two sentences). Then, on the last line, write "Score: N" with N a whole number from 1
to 10.{% endblock %}
"""  # live records, and duplicates (their answers still count as votes)


# --- final answers -----------------------------------------------------------------------------------------------


def _number(text: str) -> str:
    """'1,234.50' -> '1234.5'; '12.0' -> '12'."""
    value = float(text.replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)


def _fold(text: str) -> str:
    """Case, Unicode forms, whitespace and surrounding punctuation / markdown folded."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.strip(" \t*_`'\".,:;!?()[]")


def final_answer(text: str, pattern: str | None = None) -> str | None:
    """An answer's final answer: the last match of `pattern` (group 1 if it has one), else the last number, else the
    last non-empty line, folded; None when there is none."""
    if pattern is not None:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        m = matches[-1]
        found = m.group(1) if m.re.groups and m.group(1) is not None else m.group(0)
        folded = _fold(found)
        return _number(folded) if NUMBER.fullmatch(folded) else (folded or None)
    numbers = NUMBER.findall(text)
    if numbers:
        return _number(numbers[-1])
    lines = [ln for ln in text.splitlines() if _fold(ln)]
    return _fold(lines[-1]) if lines else None


def majority(answers: list[str | None]) -> str | None:
    """The answer held by the most, when it is held by at least two and no other answer is held by as many."""
    counts = Counter(a for a in answers if a is not None).most_common(2)
    if not counts or counts[0][1] < 2 or (len(counts) > 1 and counts[1][1] == counts[0][1]):
        return None
    return counts[0][0]


# --- the judge's reply -------------------------------------------------------------------------------------------


def parse_score(reply: str) -> tuple[float | None, str]:
    """(score 1-10 or None, reason): the last 'Score: N' of the reply, and the text before it."""
    matches = list(SCORE.finditer(reply))
    if not matches:
        return None, reply.strip()[:500]
    m = matches[-1]
    score = float(m.group(1))
    reason = reply[: m.start()].strip() or reply[m.end():].strip()
    return (score if 1 <= score <= 10 else None), reason[:500]


def as_text(messages: list[dict]) -> str:
    """The student's view as the judge reads it: a single user turn as is, else 'Role: text' turns."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


# --- the step ----------------------------------------------------------------------------------------------------


class Member:
    """What selection needs of one record."""

    __slots__ = ("k", "id", "teacher", "prompt", "answer", "live")

    def __init__(self, k: int, rec: dict, live: bool):
        self.k, self.id, self.teacher, self.live = k, rec.get("id"), rec.get("teacher") or "?", live
        self.prompt = prompt_messages(rec)
        self.answer = assistant_text(rec)


def groups_of(paths: list[Path], table: Any) -> list[list[Member]]:
    """Live and duplicate records grouped by student view, in input order (records are re-read from the inputs)."""
    by_view: dict[str, list[Member]] = defaultdict(list)
    for k, rec in table.records(paths, (k for k, s in enumerate(table.status) if s in VOTERS)):
        m = Member(k, rec, table.status[k] == "")
        by_view[hashlib.sha256(dumps(m.prompt).encode("utf-8")).hexdigest()].append(m)
    return [g for g in by_view.values() if any(m.live for m in g)]


def drop(table: Any, m: Member, why: str) -> None:
    table.status[m.k] = "select"
    table.details[m.k] = why


def select(cfg: Any, paths: list[Path], table: Any) -> dict:
    """Mark the records selection removes in `table` (status "select"); returns the report's `select` section."""
    groups = groups_of(paths, table)
    result = agree(cfg, groups, table) if cfg.select == "agree" else judge(cfg, groups, table)
    picked = [k for k, s in enumerate(table.status) if s == "select"][: cfg.examples]
    result["examples"] = [{"id": table.ids[k], "detail": table.details[k]} for k in picked]
    notes = result["notes"] = []
    if groups and result.get("single_answer_groups") == len(groups):
        notes.append("every group holds one answer, so --select agree had nothing to compare: collect several "
                     "samples (--n) or teachers")
    if result.get("unjudged"):
        notes.append(f"{result['unjudged']} answer(s) have no judge score (failed requests or replies without "
                     "'Score: N'); their groups were kept unselected. Run the same clean again to retry the failed "
                     "ones (scores already in the judge journal are not paid for again)")
    return result


def print_selection(console: Any, sel: dict) -> None:
    """The selection part of the clean report: per teacher, agreement or the judge's score distribution."""
    from rich.table import Table

    if sel["mode"] == "agree":
        title = (f"select agree: {sel['groups']} groups, {sel['with_majority']} with a majority, "
                 f"{sel['without_majority']} without; {sel['removed']} removed")
        table = Table(title=title, title_justify="left")
        for col in ("teacher", "agree", "disagree", "no majority"):
            table.add_column(col, justify="left" if col == "teacher" else "right")
        for t, c in sel["per_teacher"].items():
            table.add_row(t, str(c.get("agree", 0)), str(c.get("disagree", 0)), str(c.get("no_majority", 0)))
    else:
        title = (f"select judge ({sel['judge']}, keep {sel['keep']}): {sel['judged']} scored, {sel['unjudged']} "
                 f"unjudged; {sel['removed']} removed")
        table = Table(title=title, title_justify="left")
        for col in ("teacher", "scored", "mean", "scores (score: count)"):
            table.add_column(col, justify="right" if col in ("scored", "mean") else "left")
        for t, dist in sel["scores"].items():
            n = sum(dist.values())
            mean = sum(float(k) * v for k, v in dist.items()) / max(1, n)
            table.add_row(t, str(n), f"{mean:.2f}", "  ".join(f"{k}: {v}" for k, v in dist.items()))
    console.print(table)
    for note in sel.get("notes", []):
        console.print(f"note: {note}")


def agree(cfg: Any, groups: list[list[Member]], table: Any) -> dict:
    with_majority = without = singles = removed = 0
    votes: dict[str, Counter] = defaultdict(Counter)  # teacher -> agreeing / disagreeing / no majority (live only)
    for g in groups:
        answers = [final_answer(m.answer, cfg.answer_pattern) for m in g]
        top = majority(answers)
        live = [(m, a) for m, a in zip(g, answers) if m.live]
        if top is None:
            without += 1
            singles += len(g) == 1
            for m, a in live:
                votes[m.teacher]["no_majority"] += 1
                if cfg.no_majority == "drop":
                    shown = ", ".join(sorted({str(x) for x in answers}))[:200]
                    drop(table, m, f"no majority answer in its group of {len(g)} (answers: {shown})")
                    removed += 1
            continue
        with_majority += 1
        held = sum(a == top for a in answers)
        for m, a in live:
            votes[m.teacher]["agree" if a == top else "disagree"] += 1
            if a != top:
                drop(table, m, f"final answer {a!r} is not the majority {top!r} ({held} of {len(g)})")
                removed += 1
    return {
        "mode": "agree", "answer_pattern": cfg.answer_pattern, "no_majority": cfg.no_majority, "groups": len(groups),
        "with_majority": with_majority, "without_majority": without, "single_answer_groups": singles,
        "removed": removed, "per_teacher": {t: dict(c) for t, c in sorted(votes.items())},
    }  # fmt: skip


def judge(cfg: Any, groups: list[list[Member]], table: Any) -> dict:
    """Score every live answer with the judge (through `imitate collect`), then keep per --keep / --min-judge-score."""
    from imitate.collect import stage as collect
    from imitate.collect import templates
    from imitate.collect.journal import read_by_id
    from imitate.records import request_id, write_jsonl

    template = templates.load(cfg.judge_template) if cfg.judge_template else templates.from_string(RUBRIC, "judge")
    out = Path(cfg.out)
    stem = out.name.removesuffix(".jsonl")
    requests, journal = out.with_name(f"{stem}.judge.requests.jsonl"), out.with_name(f"{stem}.judge.jsonl")
    jcfg = cfg.judge_config(requests, journal)
    params = collect.params_of(jcfg)
    live = [m for g in groups for m in g if m.live]
    rows, ids = [], {}
    for m in live:  # cheap first: every rubric renders before anything is sent
        row = {"prompt": as_text(m.prompt), "answer": m.answer, "teacher": m.teacher}
        messages = template.render(row, f"record {m.id}")
        rows.append({"messages": messages, "judge_of": m.id})
        ids[m.k] = request_id(jcfg.teacher, messages, params, 0)
    collected: dict = {}
    if rows:
        write_jsonl(requests, rows)
        collected = collect.run(jcfg)  # its own summary table; --max-cost stops here (exit 4), nothing written
    replies = read_by_id(journal, set(ids.values())) if journal.exists() else {}
    scores: dict[str, Counter] = defaultdict(Counter)
    n_judged = unjudged = removed = 0
    for g in groups:
        members = [m for m in g if m.live]
        judged: dict[int, float] = {}
        for m in members:
            reply = replies.get(ids[m.k])
            score, reason = parse_score(assistant_text(reply)) if reply else (None, "")
            verdict = {"model": cfg.judge, "score": score, "reason": reason}
            if reply is None:
                verdict["error"] = "not judged (the request failed; see the judge's failures file)"
            elif score is None:
                verdict["error"] = "no 'Score: N' (1-10) in the judge's reply"
            table.extra.setdefault(m.k, {})["judge"] = verdict
            if score is not None:
                n_judged += 1
                judged[m.k] = score
                scores[m.teacher][_bucket(score)] += 1
        if len(judged) < len(members):  # an unscored answer cannot be ranked: the group stays as it is
            unjudged += len(members) - len(judged)
            continue
        best = max(members, key=lambda m: judged[m.k])  # max() keeps the first of equals: input order
        for m in members:
            if cfg.min_judge_score is not None and judged[m.k] < cfg.min_judge_score:
                drop(table, m, f"judge score {judged[m.k]:g} below --min-judge-score {cfg.min_judge_score:g}")
            elif cfg.keep == "best" and m is not best:
                drop(table, m, f"judge score {judged[m.k]:g}; the group's best is {judged[best.k]:g} ({best.id})")
            else:
                continue
            removed += 1
    return {
        "mode": "judge", "judge": cfg.judge, "template": template.name, "keep": cfg.keep,
        "min_judge_score": cfg.min_judge_score, "groups": len(groups), "judged": n_judged, "unjudged": unjudged,
        "removed": removed,
        "scores": {t: dict(sorted(c.items(), key=lambda kv: float(kv[0]))) for t, c in sorted(scores.items())},
        "journal": str(journal), "cost_usd": collected.get("cost_usd"),
    }  # fmt: skip


def _bucket(score: float) -> str:
    return str(int(score)) if float(score).is_integer() else f"{score:g}"
