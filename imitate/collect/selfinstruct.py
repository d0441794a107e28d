"""Self-instruct expansion: the teacher writes new instructions from seed tasks; duplicates are dropped.

Each round sends up to `concurrency` requests rendered with the `self_instruct` template, each showing a few
examples (3 seeds + up to 2 already generated, drawn with a seeded RNG) and asking for PER_CALL new tasks as a
numbered list. New tasks are kept unless they are near-duplicates of the pool (seeds + kept tasks): same normalized
text, or word-set Jaccard similarity >= SIMILAR. Generation answers are journaled as records in OUT.instructions.jsonl,
and rounds are processed in request order, so a resumed run rebuilds the same pool and re-sends nothing.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from imitate.errors import InputError
from imitate.resources import data_file

PER_CALL = 5  # tasks asked for per request
SIMILAR = 0.7  # word-set Jaccard at or above which a task counts as a duplicate
MAX_STALE = 3  # stop after this many rounds in a row that add nothing
GEN_TEMPERATURE = 1.0  # generation wants diversity, whatever the answer temperature
DEFAULT_SEEDS = data_file("seed_tasks.jsonl")  # the repository's data/seed_tasks.jsonl
ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*]|Task \d+:)\s*(.+?)\s*$")


def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def is_duplicate(candidate: frozenset[str], pool: list[frozenset[str]]) -> bool:
    for other in pool:
        union = len(candidate | other)
        if union and len(candidate & other) / union >= SIMILAR:
            return True
    return False


def parse_tasks(text: str) -> list[str]:
    """Numbered or bulleted lines of an answer -> task strings (3 to 200 words)."""
    out = []
    for line in text.splitlines():
        m = ITEM.match(line)
        if m and 3 <= len(m.group(1).split()) <= 200:
            out.append(m.group(1))
    return out


def load_seeds(path: Path) -> list[str]:
    from imitate.collect.stage import read_rows

    seeds = []
    for where, row in read_rows(path):
        text = row.get("instruction") or row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: a seed task needs an 'instruction' or 'prompt' string")
        if isinstance(row.get("input"), str) and row["input"].strip():
            text = f"{text}\n\n{row['input']}"
        seeds.append(text.strip())
    return seeds


async def expand(cfg: Any, engine: Any, seeds: list[str]) -> tuple[list[tuple[str, dict]], dict]:
    """Generate cfg.self_instruct new tasks from `seeds` (see load_seeds); returns (rows to answer, summary)."""
    from imitate.collect import templates as prompts
    from imitate.collect.engine import Stats
    from imitate.collect.journal import read_by_id
    from imitate.collect.stage import Job, sidecar
    from imitate.collect.teachers import Request
    from imitate.records import assistant_text, request_id

    gen_template = prompts.load("self_instruct")
    params = {"temperature": GEN_TEMPERATURE, "max_tokens": max(cfg.max_tokens, 512)}
    journal_path = sidecar(Path(cfg.out), "instructions")
    rng = random.Random(cfg.seed)
    pool = [words(s) for s in seeds]
    new: list[str] = []
    stats, stale, rounds = Stats(), 0, 0
    while len(new) < cfg.self_instruct and stale < MAX_STALE:
        rounds += 1
        calls = min(cfg.concurrency, -(-(cfg.self_instruct - len(new)) // PER_CALL))
        jobs = []
        for j in range(calls):
            examples = rng.sample(seeds, min(3, len(seeds))) + rng.sample(new, min(2, len(new)))
            messages = gen_template.render({"examples": examples, "count": PER_CALL}, f"self-instruct round {rounds}")
            rid = request_id(cfg.teacher, messages, params, j)
            jobs.append(Job(Request(rid, messages, params, j), {"self_instruct_round": rounds}, str(journal_path)))
        await engine.collect(jobs, out=journal_path, label=f"self-instruct {rounds}", stats=stats)
        answers = read_by_id(journal_path, {j.request.id for j in jobs})
        before = len(new)
        for job in jobs:  # request order, not arrival order: a resumed run rebuilds the same pool
            rec = answers.get(job.request.id)
            for task in parse_tasks(assistant_text(rec)) if rec else []:
                w = words(task)
                if len(new) < cfg.self_instruct and w and not is_duplicate(w, pool):
                    pool.append(w)
                    new.append(task)
        stale = stale + 1 if len(new) == before else 0
    rows = [(f"{journal_path} (task {i + 1})", {"prompt": t, "origin": "self-instruct"}) for i, t in enumerate(new)]
    info = {
        "seeds": len(seeds),
        "generated": len(new),
        "asked": cfg.self_instruct,
        "rounds": rounds,
        "calls": stats.calls,
        "failed_calls": stats.failed,
        "instructions": str(journal_path),
        "tokens_in": stats.tokens_in,
        "tokens_out": stats.tokens_out,
    }
    return rows, info
