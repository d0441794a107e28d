"""Pass 1 of `imitate clean` (the map step): raw lines -> parsed records -> filters -> dedup keys, chunk by chunk, in
this process or in `--workers` processes. Only small per-record facts come back (`Chunk`), never the records."""

from __future__ import annotations

import gc
import json
import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imitate.cards import record_facts
from imitate.clean.config import CleanConfig
from imitate.clean.dedup import NearDup, candidate_edges
from imitate.clean.filters import Predicate, apply
from imitate.clean.keys import RecordTexts
from imitate.clean.minhash import exact_key
from imitate.errors import InputError
from imitate.jsonl import TooLong, lines, parse
from imitate.records import ROLES, as_text, assistant_text, prompt_messages, record_problem


@dataclass
class Chunk:
    """What the map step returns for one chunk of raw lines (only small arrays and strings)."""

    path: str = ""  # the input file (a chunk never spans two files)
    linenos: list[int] = field(default_factory=list)  # line of each record
    ids: list[str] = field(default_factory=list)
    status: list[str] = field(default_factory=list)  # "" = passed every filter, else the filter's name
    details: dict[int, str] = field(default_factory=dict)  # position in chunk -> reason
    examples: dict[str, list[dict]] = field(default_factory=dict)
    bad: list[tuple[int, str]] = field(default_factory=list)  # (lineno, reason)
    exact: np.ndarray | None = None  # [n] uint64
    prompt: np.ndarray | None = None  # [n] uint64
    bands: np.ndarray | None = None  # [n, bands] uint64
    sketch: np.ndarray | None = None  # [n, num_perm] uint8: b-bit MinHash, to drop hopeless candidates cheaply
    priority: np.ndarray | None = None  # [n] float64
    seconds: dict[str, float] = field(default_factory=dict)
    # what the dataset card counts (cards.record_facts), so that it need not read the files again:
    teachers: list[str] = field(default_factory=list)  # teachers named by the records, in order of first mention
    teacher: np.ndarray | None = None  # [n] int32: index into `teachers`, -1 = none
    tokens: np.ndarray | None = None  # [n, 2] int32: input, output tokens (a count past int32: the card reads)
    bad_counted: list[int] = field(default_factory=lambda: [0, 0, 0])  # records, tokens in, out of the bad lines
    counted: bool = True  # False: a line the card would count otherwise (a bare \r in it...): it reads the file
    # near-dedup's normalized turns of each record (None: not kept), for the exact check to use instead of reading
    # the record again; kept only while the map runs in the process that checks (see Mapper.turn_budget)
    turns: list[list[str] | None] | None = None


def _field(record: dict, dotted: str) -> Any:
    v: Any = record
    for part in dotted.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def snippet(record: dict) -> dict:
    prompt = prompt_messages(record)
    return {
        "prompt": (prompt[-1].get("content") or "")[:160] if prompt else "",
        "answer": assistant_text(record)[:240],
    }


class Mapper:
    """Parses, filters and keys one chunk of lines. Built once, shipped to each worker."""

    def __init__(self, cfg: CleanConfig, filters: dict[str, Predicate], near: NearDup | None):
        self.cfg, self.filters, self.near = cfg, filters, near
        self.turn_budget = 0  # characters of near-dedup turns still to keep in the chunks (0: none; scan sets it)

    def __call__(self, job: tuple[str, list[tuple[int, bytes]]]) -> Chunk:
        path, lines = job
        cfg, out = self.cfg, Chunk(path=path)
        t = time.perf_counter()
        records: list[dict] = []
        names: dict[str, int] = {}
        teacher: list[int] = []
        tokens: list[tuple[int, int]] = []
        for lineno, raw in lines:
            if out.counted and not (isinstance(raw, bytes) and _one_text_line(raw)):
                out.counted = False
            rec, why = _parse(raw)
            if why:
                out.bad.append((lineno, why))
                out.counted = out.counted and _count_bad(raw, out.bad_counted)
                continue
            records.append(rec)
            out.linenos.append(lineno)
            out.ids.append(str(rec.get("id") or f"{Path(path).name}:{lineno}"))
            if out.counted:
                try:
                    who, n_in, n_out = record_facts(rec)
                except Exception:  # noqa: BLE001  (a usage count int() refuses: the card's own read says so)
                    out.counted = False
                    continue
                teacher.append(-1 if who is None else names.setdefault(who, len(names)))
                tokens.append((n_in, n_out))
        if out.counted:
            out.teachers, out.teacher = list(names), np.array(teacher, np.int32)
            try:
                wide = np.array(tokens, np.int64).reshape(len(tokens), 2)
                out.counted = bool(np.abs(wide).max(initial=0) < 2**31)  # (sums are taken in int64)
                out.tokens = wide.astype(np.int32) if out.counted else None
            except OverflowError:
                out.counted = False
        n = len(records)
        out.status = [""] * n
        secs = {"parse": time.perf_counter() - t}
        alive = list(range(n))
        for name, pred in self.filters.items():  # filter-major: each filter sees the survivors of the previous ones
            t = time.perf_counter()
            reasons = apply(pred, [records[i] for i in alive] if len(alive) < n else records)
            if reasons.count(None) < len(reasons):  # (most chunks: nobody removed, nothing to walk)
                still = []
                for i, reason in zip(alive, reasons):
                    if reason is None:
                        still.append(i)
                        continue
                    out.status[i], out.details[i] = name, reason
                    ex = out.examples.setdefault(name, [])
                    if len(ex) < cfg.examples:
                        ex.append({"id": out.ids[i], "detail": reason, **snippet(records[i])})
                alive = still
            secs[name] = time.perf_counter() - t
        kept = [records[i] for i in alive]
        ix = np.asarray(alive, np.int64)
        out.exact = np.zeros(n, np.uint64)
        out.prompt = np.zeros(n, np.uint64)
        t = time.perf_counter()
        texts = RecordTexts(cfg.near_on, cfg.one_per_prompt, self.near is not None)  # prompts: once per chunk
        facts = texts.many(kept)  # (exact key's text, prompt key, near-dedup turns, guard) of each record
        secs["normalize"] = time.perf_counter() - t
        if cfg.exact_dedup:
            t = time.perf_counter()
            out.exact[ix] = np.fromiter((exact_key(f[0]) for f in facts), np.uint64, len(kept))
            secs["exact_dup"] = time.perf_counter() - t
        if cfg.one_per_prompt:
            t = time.perf_counter()
            out.prompt[ix] = np.fromiter((f[1] for f in facts), np.uint64, len(kept))
            secs["prompt_dup"] = time.perf_counter() - t
        if self.near is not None:
            t = time.perf_counter()
            out.bands = np.zeros((n, self.near.bands), np.uint64)
            out.sketch = np.zeros((n, self.near.hasher.num_perm), np.uint8)
            if kept:
                guards = np.fromiter((f[3] for f in facts), np.uint64, len(kept))
                out.bands[ix], out.sketch[ix] = self.near.keys_and_sketch([f[2] for f in facts], guards)
            if self.turn_budget > 0 and cfg.verify:
                size = sum(len(t) for f in facts for t in f[2])  # (an upper bound: equal prompts share one string)
                if size <= self.turn_budget:
                    self.turn_budget -= size
                    out.turns = [None] * n
                    for i, f in zip(alive, facts):
                        out.turns[i] = f[2]
                else:
                    self.turn_budget = 0  # the rest is read again by the exact check
            secs["near_dup"] = time.perf_counter() - t
        out.priority = np.full(n, -math.inf)
        if cfg.priority:
            out.priority[ix] = [_priority(r, cfg.priority) for r in kept]
        out.seconds = secs
        return out


def _one_text_line(raw: bytes) -> bool:
    """Whether the card's read of the file (text mode: a bare \\r also ends a line) sees this line as one line."""
    return b"\r" not in raw or (raw.count(b"\r") == 1 and raw.endswith(b"\r\n"))


def _count_bad(raw: bytes | TooLong, into: list[int]) -> bool:
    """Add a bad line to [records, tokens in, tokens out] as the card counts it (it reads lines that are not
    records too); False when only the card's own read can tell (a teacher in it: the order of first mention)."""
    if not isinstance(raw, bytes):
        return False
    line = raw.decode("utf-8", errors="replace")
    if not line.strip():
        return True
    into[0] += 1
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return True
    try:
        t, n_in, n_out = record_facts(rec)
    except Exception:  # noqa: BLE001
        return False
    into[1] += n_in
    into[2] += n_out
    return t is None


_ROLES = frozenset(ROLES)


def _plain(rec: Any) -> bool:
    """The common record, checked in one pass: valid (`record_problem` is None) and all text already (`as_text` gives
    it back as is) -- every message an object with a known role and a string content, no context."""
    if type(rec) is not dict:
        return False
    msgs = rec.get("messages")
    if type(msgs) is not list or not msgs:
        return False
    for m in msgs:
        if type(m) is not dict or type(m.get("content")) is not str:
            return False
        role = m.get("role")
        if type(role) is not str or role not in _ROLES:
            return False
    context = rec.get("context")
    return context is None or (type(context) is list and not context)


def _parse(raw: bytes | TooLong) -> tuple[dict | None, str | None]:
    """(record, None) or (None, why the line is not a record)."""
    rec, why = parse(raw)  # not UTF-8, not JSON, nested too deeply, too long (imitate/jsonl.py)
    if why:
        return None, why
    if _plain(rec):
        return rec, None
    problem = record_problem(rec)
    return (None, problem) if problem else (as_text(rec), None)  # filters and keys read text; the write pass copies raw


def _priority(record: dict, spec: str) -> float:
    """Higher = better survivor. "-field" flips the sign; a missing or non-numeric field ranks last."""
    v = _field(record, spec.lstrip("-"))
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return -math.inf
    return -float(v) if spec.startswith("-") else float(v)


_MAPPER: Mapper | None = None
TURN_BUDGET = 1 << 26  # characters of normalized turns kept in memory for the exact check (~100 MB of text)


def _init_worker(mapper: Mapper) -> None:
    global _MAPPER
    _MAPPER = mapper
    gc.disable()  # (as in the main process: stage.cyclic_gc_paused)


def _map_in_worker(job: tuple[str, list[tuple[int, bytes]]]) -> Chunk:
    assert _MAPPER is not None
    return _MAPPER(job)


def _raw_chunks(paths: list[Path], size: int) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """(path, [(lineno, raw bytes)]) chunks of the non-blank lines of every input, in order."""
    for path in paths:
        buf: list[tuple[int, bytes | TooLong]] = []
        for lineno, raw in lines(path):  # an over-long line comes as TooLong (its size), never read whole
            if not isinstance(raw, bytes) or raw.strip():
                buf.append((lineno, raw))
                if len(buf) >= size:
                    yield str(path), buf
                    buf = []
        if buf:
            yield str(path), buf


def _bounded_map(pool: ProcessPoolExecutor, jobs: Iterator, in_flight: int) -> Iterator[Chunk]:
    """Ordered map with at most `in_flight` chunks submitted (Executor.map would read every input line up front)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(_map_in_worker, job))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def scan(cfg: CleanConfig, mapper: Mapper, paths: list[Path]) -> tuple[list[Chunk], list[tuple[str, int, str]]]:
    """Run the mapper over every chunk of input lines, in this process or in `cfg.workers` processes, in order."""
    chunks: list[Chunk] = []
    bad: list[tuple[str, int, str]] = []
    jobs = _raw_chunks(paths, cfg.chunk_size)
    pool = None
    if cfg.workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        pool = ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=(mapper,))
        results: Iterator[Chunk] = _bounded_map(pool, jobs, 2 * cfg.workers)
    else:  # in this process: the chunks may keep their turns for the exact check, up to a budget
        mapper.turn_budget = TURN_BUDGET
        results = map(mapper, jobs)
    try:
        for chunk in results:
            bad += check_bad(cfg, [chunk])
            chunks.append(chunk)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return chunks, bad


def check_bad(cfg: CleanConfig, chunks: list[Chunk]) -> list[tuple[str, int, str]]:
    """The malformed lines of `chunks` as (path, line, reason); with --on-bad-line error, the first stops the run."""
    bad = []
    for chunk in chunks:
        for lineno, reason in chunk.bad:
            if cfg.on_bad_line == "error":
                raise InputError(
                    f"{chunk.path}:{lineno}: {reason}",
                    hint="each line must be one record (JSON object with 'messages'); "
                    "use --on-bad-line skip to count and skip such lines",
                )
            bad.append((chunk.path, lineno, reason))
    return bad


class LocalEngine:
    """The executor of `--engine local`: `scan` in this process or `--workers` processes, `group` in numpy."""

    def __init__(self, cfg: CleanConfig):
        pass

    scan = staticmethod(scan)
    group = staticmethod(candidate_edges)

    def close(self) -> None:
        pass
