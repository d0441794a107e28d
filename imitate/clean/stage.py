"""`imitate clean`: records -> filters (cheap first) -> exact and near dedup -> kept + removed (with reason) + report.

Streaming passes over the inputs, so memory holds per-record keys, never the records:
  1. map (scan.py): chunks of raw lines (in `--workers` processes) are parsed, filtered, and turned into dedup keys
     (a hash of the normalized conversation and of the prompt, and MinHash LSH band keys mixed with a prompt guard);
  2. group + cluster in this process: records sharing an exact key are duplicates; records sharing an LSH band are
     candidates, and the inputs are read again for the candidates only, to check each pair's exact similarity;
  3. stop if one filter removed more than `max_removed` of the records (nothing is written);
  4. write: the inputs are read again and each line goes to CLEAN (verbatim, input order) or REMOVED (with `removed`).
Same inputs and options give byte-identical CLEAN and REMOVED files; only the report's `timing` section varies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import glob
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imitate.cards import Counted, write_dataset_card
from imitate.clean.config import CleanConfig
from imitate.clean.dedup import NearDup, candidate_edges, cluster
from imitate.clean.filters import build_filters
from imitate.clean.scan import Chunk, LocalEngine, Mapper, snippet
from imitate.clean.verify import pair_similarity
from imitate.config import to_dict
from imitate.errors import ImitateError, InputError, UsageError
from imitate.jsonl import lines, pick
from imitate.locks import locks_outputs
from imitate.records import as_text, dumps
from imitate.writes import failed_writes, is_write_failure, remove_quietly, write_error

# --- run --------------------------------------------------------------------------------------------------------------


def _check(cfg: CleanConfig) -> None:
    """What the config cannot know when it is built: the inputs (options were checked by CleanConfig itself)."""
    if not cfg.inputs:
        raise UsageError("no input files", hint="imitate clean records.jsonl --out clean.jsonl")
    for p in cfg.inputs:
        if not Path(p).exists():
            raise InputError(f"{p}: no such file", hint="check the input path")


def expand_inputs(cfg: CleanConfig) -> CleanConfig:
    """Inputs given as a glob (`'shards/*.jsonl'`, quoted so the shell leaves it) -> the matching files, sorted."""
    out: list[Path] = []
    for p in cfg.inputs:
        s = str(p)
        matches = sorted(glob.glob(s)) if not Path(s).exists() and glob.has_magic(s) else []
        if glob.has_magic(s) and not Path(s).exists() and not matches:
            raise InputError(f"{s}: no file matches", hint="check the input pattern (quote it: 'shards/*.jsonl')")
        out += [Path(m) for m in matches] or [p]
    return cfg if out == list(cfg.inputs) else dataclasses.replace(cfg, inputs=out)


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, back as it was after. What clean allocates -- parsed
    records (dicts, lists, strings), numpy arrays, chunks -- holds no reference cycles, so reference counting frees
    all of it; the collector would only walk the live records again and again as they pile up (~7 % of a clean's
    CPU on 100k records)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@locks_outputs("clean")  # CLEAN, REMOVED, REPORT: one writer each
def run(cfg: CleanConfig) -> dict:
    """Clean `cfg.inputs` into `cfg.out` (+ `cfg.removed`, `cfg.report`); returns the report (the --json summary)."""
    with cyclic_gc_paused():
        return _run(cfg)


def _run(cfg: CleanConfig) -> dict:
    cfg = expand_inputs(cfg)
    _check(cfg)
    t0 = time.perf_counter()
    notes: list[str] = []
    filters = build_filters(cfg, notes)
    near = None
    if cfg.near_dedup:
        near = NearDup(cfg.num_perm, cfg.threshold, cfg.ngram, cfg.bands, cfg.seed, verify=cfg.verify)
    paths = [Path(p) for p in cfg.inputs]
    engine = _engine(cfg)
    try:
        chunks, bad = engine.scan(cfg, Mapper(cfg, filters, near), paths)
        t1 = time.perf_counter()
        table = _Table(chunks, paths)
        clusters, cluster_s, stages = _cluster_step(cfg, table, near, paths, engine.group)
    finally:
        engine.close()
    selection = None
    if cfg.select != "none":  # a step of its own after dedup (imitate/clean/select.py)
        from imitate.clean.select import select

        selection = select(cfg, paths, table)
    t2 = time.perf_counter()
    removed = {name: table.status.count(name) for name in [*filters, *stages, *(["select"] if selection else [])]}
    # selection removes by design (--keep best of 5 drops 4 in 5): --max-removed guards the filters and dedup
    too_many = [name for name, count in removed.items()
                if name != "select" and count > cfg.max_removed * len(table.ids)]
    if too_many:
        kept = len(table.ids) - sum(removed.values())
        no_timing = {"cpu_s_per_step": {}, "cluster_s": {}}
        print_report({"in": len(table.ids), "out": kept, "removed": removed, "bad_lines": len(bad),
                      "clusters": clusters, "notes": notes, "timing": no_timing})  # fmt: skip
        raise _mass_removal(cfg, table, too_many[0], removed[too_many[0]], chunks)
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
        "engine": cfg.engine,
    }
    if not table.ids:
        notes.append("the inputs hold no records: nothing to clean (and nothing for imitate train)")
    elif not kept:
        notes.append("every record was removed, so imitate train has nothing to train on: see which filter took them "
                     "(the keep-/no- flags turn filters off)")
    summary = {
        "in": len(table.ids),
        "out": kept,
        "removed": removed,
        "removed_share": {name: round(count / max(1, len(table.ids)), 4) for name, count in removed.items()},
        "removed_total": len(table.ids) - kept,
        "bad_lines": len(bad),
        "bad_line_examples": [f"{p}:{ln}: {why}" for p, ln, why in bad[:10]],
        "clusters": clusters,
        "lsh": {
            "bands": near.bands, "rows": near.rows, "num_perm": cfg.num_perm, "threshold": cfg.threshold,
            "ngram": cfg.ngram, "verify": cfg.verify,
        } if near else None,  # fmt: skip
        "select": selection,
        "notes": notes,
        "examples": _examples(cfg, chunks, table, stages),
        "outputs": {"clean": str(cfg.out), "removed": str(cfg.removed) if cfg.removed else None},
        "config": {k: v for k, v in to_dict(cfg).items() if k not in _WHERE},  # where it ran is in timing
        "timing": timing,  # the only part that changes between identical runs
    }
    with failed_writes(f"{cfg.out} is complete, the report or the dataset card is not; run the same command again"):
        if cfg.report:
            Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.report).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        card = write_dataset_card(cfg, summary, _counted(cfg, paths, chunks, table))  # imitate/cards.py
        summary["outputs"]["card"] = str(card)  # CLEAN_STEM.README.md
    print_report(summary)
    return summary


def _engine(cfg: CleanConfig) -> Any:
    """Where the map step and the grouping by key run; the steps themselves (Mapper, cluster, verify) are the same."""
    if cfg.engine == "ray":
        from imitate.clean.ray_engine import RayEngine  # Ray is imported only here

        return RayEngine(cfg)
    return LocalEngine(cfg)


_WHERE = ("engine", "ray_address")  # how a run was executed, not what it computes: left out of the report's config


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
        self.similarity: dict[tuple[int, int], float] = {}  # verified near-duplicate pairs, both ways
        self.extra: dict[int, dict] = {}  # fields a step adds to a record (selection's `judge`)
        offset = 0
        for c in chunks:
            self.details.update({offset + k: v for k, v in c.details.items()})
            offset += len(c.ids)
        self.keys = {
            name: np.concatenate([getattr(c, name) for c in chunks]) if chunks and getattr(chunks[0], name) is not None
            else None
            for name in ("exact", "prompt", "bands", "sketch")
        }  # fmt: skip
        self.turns: list[list[str] | None] | None = None  # near-dedup turns the map step kept (Chunk.turns)
        if any(c.turns is not None for c in chunks):
            self.turns = [t for c in chunks for t in (c.turns if c.turns is not None else [None] * len(c.ids))]
        prio = np.concatenate([c.priority for c in chunks]) if chunks else np.zeros(0)
        order = np.lexsort((np.arange(n), -prio))  # best priority first, then input order
        self.rank = np.empty(n, np.int64)
        self.rank[order] = np.arange(n)

    def records(self, paths: list, ks: Any) -> Iterator[tuple[int, dict]]:
        """(k, record as the stages read it: content parts joined) for the records `ks`, re-read from the inputs, in
        input order."""
        for k, raw in pick(paths, {(self.files[k], self.linenos[k]): k for k in ks}):
            yield k, as_text(json.loads(raw))


def _cluster_step(
    cfg: CleanConfig, table: _Table, near: NearDup | None, paths: list[Path], group: Any = candidate_edges
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
                def locate(k: int) -> tuple[int, int]:
                    return table.files[idx[k]], table.linenos[idx[k]]

                def kept_turns(k: int) -> list[str] | None:
                    return table.turns[idx[k]] if table.turns is not None else None

                sketch = table.keys["sketch"]
                edges = edges[near.plausible(sketch[idx[edges[:, 0]]], sketch[idx[edges[:, 1]]])]
                if not len(edges):
                    return edges
                sims = pair_similarity(paths, locate, edges, near, cfg.near_on, kept_turns)
                keep = sims >= cfg.threshold
                for (a, b), sim in zip(idx[edges[keep]].tolist(), sims[keep].tolist()):
                    table.similarity[(a, b)] = table.similarity[(b, a)] = sim
                return edges[keep]

        stages.append(("near_dup", table.keys["bands"], verify))
    clusters: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name, keys, verify in stages:
        t = time.perf_counter()
        if keys is None or not alive.any():
            clusters[name] = {"clusters": 0, "records_in_clusters": 0, "sizes": {}}
            continue
        removed_ix, surv_ix, clusters[name] = cluster(keys, alive, table.rank, verify, group)
        for r, s in zip(removed_ix.tolist(), surv_ix.tolist()):
            table.status[r] = name
            table.dup_of[r] = s
            sim = table.similarity.get((r, s))
            table.details[r] = f"duplicate of {table.ids[s]}" + (f" (similarity {sim:.3f})" if sim else "")
        alive[removed_ix] = False
        seconds[name] = time.perf_counter() - t
    return clusters, seconds, [s[0] for s in stages]


_FLAG_OFF = {
    "failed": "--keep-failed", "truncated": "--keep-truncated", "refusal": "--keep-refusals",
    "repetition": "--keep-repetitive", "exact_dup": "--no-exact-dedup", "prompt_dup": "--all-per-prompt",
    "near_dup": "--no-near-dedup",
}  # fmt: skip


def _mass_removal(cfg: CleanConfig, table: _Table, name: str, count: int, chunks: list[Chunk]) -> ImitateError:
    """The error for a filter that removed more than `max_removed` of the records: its share and three examples
    (kept <-> removed pairs for dedup stages, removed records with their reason for the other filters)."""
    n = len(table.ids)
    lines = []
    if table.dup_of and any(table.status[r] == name for r in table.dup_of):
        pairs = [(s, r) for r, s in table.dup_of.items() if table.status[r] == name][:3]
        texts = _texts(cfg, table, {k for pair in pairs for k in pair})
        for s, r in pairs:
            sim = table.similarity.get((r, s))
            lines.append(f"  kept    {table.ids[s]}: {texts[s]}")
            sim_note = f" (similarity {sim:.3f})" if sim else ""
            lines.append(f"  removed {table.ids[r]}: {texts[r]}{sim_note}")
    else:
        shown = [ex for c in chunks for ex in c.examples.get(name, [])][:3]
        lines += [f"  removed {ex['id']}: {ex['detail']}: {ex['answer'][:100]!r}" for ex in shown]
    share = count / n
    allow = min(1.0, math.ceil(share * 100) / 100)
    off = f", or turn the filter off ({_FLAG_OFF[name]})" if name in _FLAG_OFF else ""
    return ImitateError(
        f"the {name} filter removed {count} of {n} records ({share:.1%}), more than --max-removed "
        f"{cfg.max_removed:g}; nothing was written. Examples:\n" + "\n".join(lines),
        hint=f"check the examples; if this is right, allow it with --max-removed {allow:g} (max-removed = {allow:g} "
        f"in [clean]){off}",
    )


def _texts(cfg: CleanConfig, table: _Table, ks: set[int]) -> dict[int, str]:
    """A short view of each record in `ks` (re-read from its file): its last prompt turn and its answer."""
    out: dict[int, str] = {}
    for k, rec in table.records(cfg.inputs, ks):
        snip = snippet(rec)
        out[k] = f"{snip['prompt'][:70]!r} -> {snip['answer'][:70]!r}"
    return out


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
    try:
        with open(tmp_out, "wb") as fo, open(tmp_rem, "wb") if tmp_rem else open(os.devnull, "wb") as fr:
            for fi, path in enumerate(paths):
                for lineno, raw in lines(path):
                    if i >= n or files[i] != fi or linenos[i] != lineno:
                        continue  # blank or bad line
                    k, i = i, i + 1
                    if not status[k]:
                        if k in table.extra:
                            raw = dumps({**json.loads(raw), **table.extra[k]}).encode("utf-8")
                        fo.write(raw.rstrip(b"\r\n") + b"\n")
                        kept += 1
                    elif tmp_rem is not None:
                        rec = {**json.loads(raw), **table.extra.get(k, {})}
                        rec["removed"] = {"filter": status[k], "detail": table.details.get(k, "")}
                        if k in table.dup_of:
                            rec["removed"]["duplicate_of"] = table.ids[table.dup_of[k]]
                        fr.write((dumps(rec) + "\n").encode("utf-8"))
    except BaseException as exc:  # a full disk, Ctrl-C, SIGTERM: CLEAN and REMOVED stay as they were
        remove_quietly(tmp_out, tmp_rem)
        if isinstance(exc, OSError) and is_write_failure(exc):
            kept = (f"{cfg.out} and {cfg.removed or 'REMOVED'} are left as they were (the new files are written aside "
                    "and replace them only when complete)")
            raise write_error(exc, exc.filename or tmp_out, kept) from None
        raise
    os.replace(tmp_out, cfg.out)
    if tmp_rem is not None:
        os.replace(tmp_rem, cfg.removed)
    return kept


def _counted(cfg: CleanConfig, paths: list[Path], chunks: list[Chunk], table: _Table) -> dict[str, Counted]:
    """What the dataset card counts in each input and in CLEAN (records, teachers in order of first mention,
    tokens), from the map step's facts: the card then reads each file only for its sha256. A file with a line the
    card would count otherwise (`Chunk.counted`) is left out: the card reads it."""
    names = [str(p) for p in paths]
    if len(set(names)) < len(names) or str(cfg.out) in names:
        return {}
    out: dict[str, Counted] = {}
    for name in names:
        mine = [c for c in chunks if c.path == name]
        if all(c.counted for c in mine):
            out[name] = _sum_counts(mine, [None] * len(mine))
    if len(out) == len(names) and not table.extra:  # CLEAN: the kept lines, verbatim
        kept, offset = [], 0
        for c in chunks:
            kept.append(np.array([s == "" for s in table.status[offset : offset + len(c.ids)]], bool))
            offset += len(c.ids)
        out[str(cfg.out)] = _sum_counts(chunks, kept)
    return out


def _sum_counts(chunks: list[Chunk], kept: list[np.ndarray | None]) -> Counted:
    """(records, teachers, tokens in, tokens out) of the chunks' records (those `kept`, or all of them with their
    bad lines, for None)."""
    records = tokens_in = tokens_out = 0
    teachers: dict[str, int] = {}
    for c, keep in zip(chunks, kept):
        ix, tok = (c.teacher, c.tokens) if keep is None else (c.teacher[keep], c.tokens[keep])
        bad = c.bad_counted if keep is None else [0, 0, 0]
        records += len(ix) + bad[0]
        tokens_in += int(tok[:, 0].sum(dtype=np.int64)) + bad[1]  # (up to 2^32 records of < 2^31 tokens each)
        tokens_out += int(tok[:, 1].sum(dtype=np.int64)) + bad[2]
        named = ix[ix >= 0]
        first = np.unique(named, return_index=True)  # each teacher's first record, for the order of first mention
        counts = np.bincount(named, minlength=len(c.teachers))
        for k in first[0][np.argsort(first[1])].tolist():
            teachers[c.teachers[k]] = teachers.get(c.teachers[k], 0) + int(counts[k])
    return records, teachers, tokens_in, tokens_out


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
    if summary.get("select"):
        from imitate.clean.select import print_selection

        print_selection(console, summary["select"])
    for note in summary["notes"]:
        console.print(f"note: {note}")
