"""`imitate clean`: records -> filters (cheap first) -> exact and near dedup -> kept + removed (with reason) + report.

Two streaming passes over the inputs, so memory holds per-record keys, never the records:
  1. map: chunks of raw lines (in `--workers` processes) are parsed, filtered, and turned into dedup keys
     (a normalized hash of the conversation and of the prompt, and MinHash LSH band keys);
  2. group + cluster in this process: records sharing a key form components; each keeps its best-ranked member;
  3. write: the inputs are read again and each line goes to CLEAN (verbatim, input order) or REMOVED (with `removed`).
Same inputs and options give byte-identical CLEAN and REMOVED files; only the report's `timing` section varies.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imitate.cards import write_dataset_card
from imitate.clean.dedup import NearDup, cluster, exact_key
from imitate.clean.filters import GOPHER_DUP_NGRAM, GOPHER_TOP_NGRAM, Predicate, apply, build_filters
from imitate.config import path_field, to_dict
from imitate.errors import InputError, UsageError
from imitate.records import assistant_text, dumps, prompt_messages, record_problem

LENGTH_ROLES = ("system", "user", "assistant", "prompt")


@dataclass(frozen=True)
class CleanConfig:
    # --- inputs and outputs
    inputs: list[Path] = path_field([])  # record files written by `imitate collect`, read in this order
    out: Path | None = path_field(None)  # CLEAN.jsonl: kept records, verbatim, in input order (required)
    removed: Path | None = path_field(None)  # REMOVED.jsonl: each removed record + "removed": {filter, detail, ...}
    report: Path | None = path_field(None)  # REPORT.json: counts, clusters, timing, examples
    on_bad_line: Literal["error", "skip"] = "error"  # "skip": count malformed lines and report them, don't stop
    workers: int = 1  # processes for the map step (parse, filter, MinHash); 1 runs in-process
    chunk_size: int = 4000  # lines per map task: bigger amortizes numpy calls, smaller balances workers
    examples: int = 3  # removed examples kept per filter in the report
    # --- failed and truncated answers
    drop_failed: bool = True  # an `error` field, no final assistant turn, or an empty answer
    drop_truncated: bool = True  # finish_reason "length" (the teacher hit max_tokens: the answer is cut off)
    # --- length bounds, per role: "assistant" = the answer, "prompt" = all turns before it, "user", "system"
    min_chars: dict[str, int] = field(default_factory=dict)  # e.g. {assistant = 20}; flag --min-chars assistant=20
    max_chars: dict[str, int] = field(default_factory=dict)  # e.g. {prompt = 8000}
    min_words: dict[str, int] = field(default_factory=dict)  # e.g. {assistant = 3}
    max_words: dict[str, int] = field(default_factory=dict)  # e.g. {assistant = 2000}
    min_ratio: float | None = None  # answer words / prompt words below this -> removed (off by default)
    max_ratio: float | None = None  # ... above this -> removed (off by default)
    # --- refusals and boilerplate in the answer (patterns: data/refusals.txt)
    drop_refusals: bool = True
    default_refusals: bool = True  # use the shipped data/refusals.txt; false to rely only on --refusals files
    refusals: list[Path] = path_field([])  # extra pattern files, same format as data/refusals.txt
    # --- repetition in the answer (Gopher thresholds, see imitate/filters.py)
    drop_repetitive: bool = True
    repetition_min_words: int = 50  # shorter answers are not checked: the ratios are noise on a few sentences
    max_dup_line_frac: float = 0.30  # duplicated lines (and paragraphs) / all lines
    max_dup_line_char_frac: float = 0.20  # characters in duplicated lines (and paragraphs) / all characters
    max_top_ngram_frac: list[float] = field(default_factory=lambda: list(GOPHER_TOP_NGRAM))  # n = 2, 3, 4
    max_dup_ngram_frac: list[float] = field(default_factory=lambda: list(GOPHER_DUP_NGRAM))  # n = 5 .. 10
    # --- language (only where a light detector, langid or langdetect, is importable; else skipped with a note)
    language: list[str] = field(default_factory=list)  # ISO 639-1 codes to keep, e.g. ["en"]; empty = no filter
    # --- decontamination against eval sets
    decontaminate: list[Path] = path_field([])  # eval JSONL files: records or rows with prompt/answer/reference fields
    decontaminate_ngram: int = 13  # a record sharing one word n-gram of this size with an eval text is removed
    decontaminate_min_words: int = 8  # eval texts shorter than the n-gram count whole if they have this many words
    # --- exact duplicates (after folding case, whitespace, punctuation and digits)
    exact_dedup: bool = True  # on the whole conversation
    one_per_prompt: bool = False  # also keep one answer per (normalized) prompt, e.g. after collect --n 4
    # --- near duplicates (MinHash LSH; clusters = connected components of LSH candidates)
    near_dedup: bool = True
    near_on: Literal["both", "prompt", "answer"] = "both"  # "both": prompt AND answer similar (Jaccard product)
    threshold: float = 0.8  # Jaccard similarity of shingle sets above which two records are duplicates
    num_perm: int = 128  # MinHash permutations (signature length)
    bands: int | None = None  # LSH bands; default: the choice minimizing false positives + negatives at threshold
    ngram: int = 5  # word n-gram shingle size
    char_ngram: int = 5  # character n-gram size for texts with fewer than near_min_words words
    near_min_words: int = 20  # texts with fewer words use character n-grams (one-sentence answers)
    near_min_chars: int = 10  # texts with fewer characters are one shingle: exact match only
    verify: bool = False  # check each candidate pair's exact Jaccard (re-reads candidate texts) before clustering
    seed: int = 1  # MinHash permutation seed
    # --- survivor of a duplicate cluster
    priority: str | None = None  # dotted record field, higher wins (e.g. "usage.output_tokens"); "-field": lower wins;
    #                              ties and records without the field fall back to input order


# --- map: raw lines -> statuses and keys ------------------------------------------------------------------------------


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
    priority: np.ndarray | None = None  # [n] float64
    seconds: dict[str, float] = field(default_factory=dict)


def _field(record: dict, dotted: str) -> Any:
    v: Any = record
    for part in dotted.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def _conversation(msgs: list[dict]) -> str:
    return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in msgs)


def dedup_parts(record: dict, on: str) -> tuple[str, ...]:
    """The texts near-dedup compares: (prompt,), (answer,) or (prompt, answer). The prompt leaves out system turns:
    one system prompt is usually shared by a whole collect run and would make every record look alike."""
    prompt = "\n".join(m.get("content") or "" for m in prompt_messages(record) if m.get("role") != "system")
    if on == "prompt":
        return (prompt,)
    if on == "answer":
        return (assistant_text(record),)
    return prompt, assistant_text(record)


def _snippet(record: dict) -> dict:
    prompt = prompt_messages(record)
    return {
        "prompt": (prompt[-1].get("content") or "")[:160] if prompt else "",
        "answer": assistant_text(record)[:240],
    }


class Mapper:
    """Parses, filters and keys one chunk of lines. Built once, shipped to each worker."""

    def __init__(self, cfg: CleanConfig, filters: dict[str, Predicate], near: NearDup | None):
        self.cfg, self.filters, self.near = cfg, filters, near

    def __call__(self, job: tuple[str, list[tuple[int, bytes]]]) -> Chunk:
        path, lines = job
        cfg, out = self.cfg, Chunk(path=path)
        t = time.perf_counter()
        records: list[dict] = []
        for lineno, raw in lines:
            rec, why = _parse(raw)
            if why:
                out.bad.append((lineno, why))
                continue
            records.append(rec)
            out.linenos.append(lineno)
            out.ids.append(str(rec.get("id") or f"{Path(path).name}:{lineno}"))
        n = len(records)
        out.status = [""] * n
        secs = {"parse": time.perf_counter() - t}
        alive = list(range(n))
        for name, pred in self.filters.items():  # filter-major: each filter sees the survivors of the previous ones
            t = time.perf_counter()
            reasons = apply(pred, [records[i] for i in alive])
            still = []
            for i, reason in zip(alive, reasons):
                if reason is None:
                    still.append(i)
                    continue
                out.status[i], out.details[i] = name, reason
                ex = out.examples.setdefault(name, [])
                if len(ex) < cfg.examples:
                    ex.append({"id": out.ids[i], "detail": reason, **_snippet(records[i])})
            alive = still
            secs[name] = time.perf_counter() - t
        kept = [records[i] for i in alive]
        ix = np.asarray(alive, np.int64)
        out.exact = np.zeros(n, np.uint64)
        out.prompt = np.zeros(n, np.uint64)
        if cfg.exact_dedup:
            t = time.perf_counter()
            out.exact[ix] = np.fromiter((exact_key(_conversation(r["messages"])) for r in kept), np.uint64, len(kept))
            secs["exact_dup"] = time.perf_counter() - t
        if cfg.one_per_prompt:
            t = time.perf_counter()
            out.prompt[ix] = np.fromiter(
                (exact_key(_conversation(prompt_messages(r))) for r in kept), np.uint64, len(kept)
            )
            secs["prompt_dup"] = time.perf_counter() - t
        if self.near is not None:
            t = time.perf_counter()
            out.bands = np.zeros((n, self.near.bands), np.uint64)
            if kept:
                parts = list(zip(*(dedup_parts(r, cfg.near_on) for r in kept)))
                out.bands[ix] = self.near.keys(parts[0], parts[1] if len(parts) > 1 else None)
            secs["near_dup"] = time.perf_counter() - t
        out.priority = np.full(n, -math.inf)
        if cfg.priority:
            out.priority[ix] = [_priority(r, cfg.priority) for r in kept]
        out.seconds = secs
        return out


def _parse(raw: bytes) -> tuple[dict | None, str | None]:
    """(record, None) or (None, why the line is not a record)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason})"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    problem = record_problem(rec)
    return (None, problem) if problem else (rec, None)


def _priority(record: dict, spec: str) -> float:
    """Higher = better survivor. "-field" flips the sign; a missing or non-numeric field ranks last."""
    v = _field(record, spec.lstrip("-"))
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return -math.inf
    return -float(v) if spec.startswith("-") else float(v)


_MAPPER: Mapper | None = None


def _init_worker(mapper: Mapper) -> None:
    global _MAPPER
    _MAPPER = mapper


def _map_in_worker(job: tuple[str, list[tuple[int, bytes]]]) -> Chunk:
    assert _MAPPER is not None
    return _MAPPER(job)


def _raw_chunks(paths: list[Path], size: int) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """(path, [(lineno, raw bytes)]) chunks of the non-blank lines of every input, in order."""
    for path in paths:
        buf: list[tuple[int, bytes]] = []
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if raw.strip():
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


# --- exact-Jaccard verification of candidate pairs (grouping and clustering: dedup.cluster) ---------------------


def _read_texts(paths: list[Path], want: dict[tuple[int, int], int], on: str) -> dict[int, tuple[str, ...]]:
    """Re-read the records at (file index, line) in `want` -> node; returns node -> its near-dedup texts."""
    out: dict[int, tuple[str, ...]] = {}
    for fi, path in enumerate(paths):
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                node = want.get((fi, lineno))
                if node is not None:
                    out[node] = dedup_parts(json.loads(raw), on)
    return out


# --- run --------------------------------------------------------------------------------------------------------------


def _check(cfg: CleanConfig) -> None:
    if cfg.out is None:
        raise UsageError("no output file", hint="give --out CLEAN.jsonl (or out = ... in the [clean] config section)")
    if not cfg.inputs:
        raise UsageError("no input files", hint="imitate clean records.jsonl --out clean.jsonl")
    for p in cfg.inputs:
        if not Path(p).exists():
            raise InputError(f"{p}: no such file", hint="check the input path")
    for name in ("min_chars", "max_chars", "min_words", "max_words"):
        for role, v in getattr(cfg, name).items():
            if role not in LENGTH_ROLES:
                raise UsageError(f"{name}: unknown role {role!r}", hint=f"roles: {', '.join(LENGTH_ROLES)}")
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UsageError(f"{name}.{role} must be a non-negative integer, got {v!r}")
    if not 0.0 < cfg.threshold <= 1.0:
        raise UsageError(f"threshold must be in (0, 1], got {cfg.threshold}", hint="e.g. --threshold 0.8")
    if cfg.bands is not None and not 1 <= cfg.bands <= cfg.num_perm:
        raise UsageError(f"bands must be between 1 and num_perm ({cfg.num_perm}), got {cfg.bands}")
    if cfg.workers < 1 or cfg.chunk_size < 1:
        raise UsageError("workers and chunk-size must be at least 1")


def run(cfg: CleanConfig) -> dict:
    """Clean `cfg.inputs` into `cfg.out` (+ `cfg.removed`, `cfg.report`); returns the report (the --json summary)."""
    _check(cfg)
    t0 = time.perf_counter()
    notes: list[str] = []
    filters = build_filters(cfg, notes)
    near = None
    if cfg.near_dedup:
        near = NearDup(
            cfg.num_perm, cfg.threshold, cfg.ngram, cfg.char_ngram, cfg.near_min_words, cfg.near_min_chars,
            cfg.bands, cfg.seed,
        )  # fmt: skip
    paths = [Path(p) for p in cfg.inputs]
    chunks, bad = _map_step(cfg, Mapper(cfg, filters, near), paths)
    t1 = time.perf_counter()
    table = _Table(chunks, paths)
    clusters, cluster_s, stages = _cluster_step(cfg, table, near, paths)
    t2 = time.perf_counter()
    kept = _write(cfg, paths, table)
    t3 = time.perf_counter()

    seconds: dict[str, float] = {}
    for c in chunks:
        for k, v in c.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
    timing = {
        "wall_s": round(t3 - t0, 3),
        "map_wall_s": round(t1 - t0, 3),
        "cluster_wall_s": round(t2 - t1, 3),
        "write_wall_s": round(t3 - t2, 3),
        "cpu_s_per_step": {k: round(v, 4) for k, v in seconds.items()},
        "cluster_s": {k: round(v, 4) for k, v in cluster_s.items()},
        "records_per_s": round(len(table.ids) / max(t3 - t0, 1e-9), 1),
    }
    if not table.ids:
        notes.append("the inputs hold no records: nothing to clean (and nothing for imitate train)")
    elif not kept:
        notes.append("every record was removed, so imitate train has nothing to train on: see which filter took them "
                     "(the keep-/no- flags turn filters off)")
    summary = {
        "in": len(table.ids),
        "out": kept,
        "removed": {name: table.status.count(name) for name in [*filters, *stages]},
        "removed_total": len(table.ids) - kept,
        "bad_lines": len(bad),
        "bad_line_examples": [f"{p}:{ln}: {why}" for p, ln, why in bad[:10]],
        "clusters": clusters,
        "lsh": {"bands": near.bands, "rows": near.rows, "num_perm": cfg.num_perm, "threshold": cfg.threshold}
        if near
        else None,
        "notes": notes,
        "examples": _examples(cfg, chunks, table, stages),
        "outputs": {"clean": str(cfg.out), "removed": str(cfg.removed) if cfg.removed else None},
        "config": to_dict(cfg),
        "timing": timing,  # the only part that changes between identical runs
    }
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.report).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary["outputs"]["card"] = str(write_dataset_card(cfg, summary))  # CLEAN_STEM.README.md (imitate/cards.py)
    print_report(summary)
    return summary


def _map_step(cfg: CleanConfig, mapper: Mapper, paths: list[Path]) -> tuple[list[Chunk], list[tuple[str, int, str]]]:
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
    else:
        results = map(mapper, jobs)
    try:
        for chunk in results:
            for lineno, reason in chunk.bad:
                if cfg.on_bad_line == "error":
                    raise InputError(
                        f"{chunk.path}:{lineno}: {reason}",
                        hint="each line must be one record (JSON object with 'messages'); "
                        "use --on-bad-line skip to count and skip such lines",
                    )
                bad.append((chunk.path, lineno, reason))
            chunks.append(chunk)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return chunks, bad


class _Table:
    """Every record's small facts, gathered from the chunks in input order: where it is, its id, its fate."""

    def __init__(self, chunks: list[Chunk], paths: list[Path]):
        index = {str(p): i for i, p in enumerate(paths)}
        self.ids = [i for c in chunks for i in c.ids]
        n = len(self.ids)
        self.files = [index[c.path] for c in chunks for _ in c.ids]
        self.linenos = [ln for c in chunks for ln in c.linenos]
        self.status = [s for c in chunks for s in c.status]  # "" = kept, else the filter or dedup stage
        self.details: dict[int, str] = {}
        self.dup_of: dict[int, int] = {}  # removed duplicate -> its survivor
        offset = 0
        for c in chunks:
            self.details.update({offset + k: v for k, v in c.details.items()})
            offset += len(c.ids)
        self.keys = {
            name: np.concatenate([getattr(c, name) for c in chunks]) if chunks and getattr(chunks[0], name) is not None
            else None
            for name in ("exact", "prompt", "bands")
        }  # fmt: skip
        prio = np.concatenate([c.priority for c in chunks]) if chunks else np.zeros(0)
        order = np.lexsort((np.arange(n), -prio))  # best priority first, then input order
        self.rank = np.empty(n, np.int64)
        self.rank[order] = np.arange(n)


def _cluster_step(
    cfg: CleanConfig, table: _Table, near: NearDup | None, paths: list[Path]
) -> tuple[dict[str, dict], dict[str, float], list[str]]:
    """Exact, prompt and near dedup in turn over the records still alive; marks the removed ones in `table`."""
    alive = np.array([s == "" for s in table.status], bool)
    stages: list[tuple[str, np.ndarray | None, Any]] = []
    if cfg.exact_dedup:
        stages.append(("exact_dup", table.keys["exact"], None))
    if cfg.one_per_prompt:
        stages.append(("prompt_dup", table.keys["prompt"], None))
    if near is not None:
        verify = None
        if cfg.verify:

            def verify(idx: np.ndarray, edges: np.ndarray) -> np.ndarray:
                want = {(table.files[idx[k]], table.linenos[idx[k]]): int(k) for k in np.unique(edges).tolist()}
                return near.verify(edges, _read_texts(paths, want, cfg.near_on))

        stages.append(("near_dup", table.keys["bands"], verify))
    clusters: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name, keys, verify in stages:
        t = time.perf_counter()
        if keys is None or not alive.any():
            clusters[name] = {"clusters": 0, "records_in_clusters": 0, "sizes": {}}
            continue
        removed_ix, surv_ix, clusters[name] = cluster(keys, alive, table.rank, verify)
        for r, s in zip(removed_ix.tolist(), surv_ix.tolist()):
            table.status[r] = name
            table.dup_of[r] = s
            table.details[r] = f"duplicate of {table.ids[s]}"
        alive[removed_ix] = False
        seconds[name] = time.perf_counter() - t
    return clusters, seconds, [s[0] for s in stages]


def _examples(cfg: CleanConfig, chunks: list[Chunk], table: _Table, stages: list[str]) -> dict[str, list[dict]]:
    """The first `cfg.examples` removed records of each filter and dedup stage, in input order."""
    out: dict[str, list[dict]] = {}
    for c in chunks:
        for name, ex in c.examples.items():
            room = cfg.examples - len(out.setdefault(name, []))
            out[name].extend(ex[: max(0, room)])
    for name in stages:
        picked = [i for i, s in enumerate(table.status) if s == name][: cfg.examples]
        out[name] = [
            {"id": table.ids[i], "detail": table.details[i], "duplicate_of": table.ids[table.dup_of[i]]} for i in picked
        ]
    return out


def _write(cfg: CleanConfig, paths: list[Path], table: _Table) -> int:
    """Second pass: kept lines verbatim to CLEAN, removed records (+ "removed") to REMOVED; atomic renames."""
    for t in [cfg.out] + ([cfg.removed] if cfg.removed else []):
        Path(t).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(str(cfg.out) + ".tmp")
    tmp_rem = Path(str(cfg.removed) + ".tmp") if cfg.removed else None
    kept = 0
    status, files, linenos = table.status, table.files, table.linenos
    i, n = 0, len(status)  # records are in (file, line) order: walk them alongside the lines
    with open(tmp_out, "wb") as fo, open(tmp_rem, "wb") if tmp_rem else open(os.devnull, "wb") as fr:
        for fi, path in enumerate(paths):
            with open(path, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if i >= n or files[i] != fi or linenos[i] != lineno:
                        continue  # blank or bad line
                    k, i = i, i + 1
                    if not status[k]:
                        fo.write(raw.rstrip(b"\r\n") + b"\n")
                        kept += 1
                    elif tmp_rem is not None:
                        rec = json.loads(raw)
                        rec["removed"] = {"filter": status[k], "detail": table.details.get(k, "")}
                        if k in table.dup_of:
                            rec["removed"]["duplicate_of"] = table.ids[table.dup_of[k]]
                        fr.write((dumps(rec) + "\n").encode("utf-8"))
    os.replace(tmp_out, cfg.out)
    if tmp_rem is not None:
        os.replace(tmp_rem, cfg.removed)
    return kept


def print_report(summary: dict) -> None:
    """The human report, on stderr."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, file=sys.stderr)
    table = Table(title=f"imitate clean: {summary['in']} in, {summary['out']} out", title_justify="left")
    table.add_column("filter")
    table.add_column("removed", justify="right")
    table.add_column("share", justify="right")
    table.add_column("seconds", justify="right")
    cpu, clus = summary["timing"]["cpu_s_per_step"], summary["timing"]["cluster_s"]
    secs = {k: cpu.get(k, 0.0) + clus.get(k, 0.0) for k in set(cpu) | set(clus)}
    for name, count in summary["removed"].items():
        share = f"{100 * count / summary['in']:.1f}%" if summary["in"] else "-"
        table.add_row(name, str(count), share, f"{secs.get(name, 0.0):.2f}")
    if summary["bad_lines"]:
        table.add_row("bad lines (skipped)", str(summary["bad_lines"]), "", "")
    console.print(table)
    for name, c in summary["clusters"].items():
        if c["clusters"]:
            sizes = ", ".join(f"{k}: {v}" for k, v in c["sizes"].items())
            console.print(f"{name}: {c['clusters']} clusters over {c['records_in_clusters']} records (sizes {sizes})")
    for note in summary["notes"]:
        console.print(f"note: {note}")
