"""The exact check of near-duplicate candidates, from their turns: kept by the map step when it ran in this process
(up to `scan.TURN_BUDGET` characters), else read again from the inputs, for the candidate records only.

Candidates are numbered in input order, so a pair (u, v), u < v, can be checked as soon as v is read; u's shingles
are kept until its last partner has been read, then freed. Memory holds the shingles of the records with a partner
still ahead (planted or sampled duplicates sit near their originals: a few thousand), not of every candidate.
Records are shingled in batches; each pair is compared by the C kernel (hash tables over unsorted shingle values) or,
without it, by numpy lookups in sorted turn sets -- the same numbers.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imitate.clean import minhash
from imitate.clean.dedup import NearDup
from imitate.clean.keys import RecordTexts
from imitate.jsonl import parse, pick
from imitate.records import as_text

BATCH = 2000  # candidate records shingled together


def pair_similarity(
    paths: list[Path],
    locate: Callable[[int], tuple[int, int]],
    edges: np.ndarray,
    near: NearDup,
    on: str,
    kept: Callable[[int], list[str] | None] | None = None,
) -> np.ndarray:
    """[E] float64: `near.similarity` of each candidate pair. edges: [E, 2] node ids, numbered in input order;
    locate(node) -> (file index, line number) of its record; kept(node) -> its near-dedup turns if the map step kept
    them (then it is not read again), else None."""
    u, v = edges.min(axis=1), edges.max(axis=1)
    nodes = np.sort(np.concatenate([u, v]))
    nodes = nodes[np.concatenate(([True], nodes[1:] != nodes[:-1]))].tolist()
    known = {k: t for k in nodes if (t := kept(k) if kept else None) is not None}
    want = {locate(k): k for k in nodes if k not in known}
    last_use = np.full(int(v.max()) + 1, -1, np.int64)  # the last node whose reading still needs this one
    np.maximum.at(last_use, u, v)
    np.maximum.at(last_use, v, v)
    last_use_list = last_use.tolist()
    order = np.argsort(v, kind="stable").tolist()
    u_list, v_list = u.tolist(), v.tolist()
    sims = np.zeros(len(edges), np.float64)
    # the C kernel compares unsorted shingle values (hash tables); numpy compares sorted turn sets: the same numbers
    sets_of, sims_of = (near.packed, near.packed_similarities) if minhash.native else (near.turn_sets, near.similarities)
    store: dict[int, Any] = {}
    batch_nodes: list[int] = []
    batch_turns: list[list[str]] = []
    ptr = 0

    def flush() -> None:
        nonlocal ptr
        if not batch_nodes:
            return
        store.update(zip(batch_nodes, sets_of(batch_turns)))
        last = batch_nodes[-1]
        ready = []
        while ptr < len(order) and v_list[order[ptr]] <= last:
            ready.append(order[ptr])
            ptr += 1
        sims[ready] = sims_of([(store[u_list[e]], store[v_list[e]]) for e in ready])
        for k in [k for k in store if last_use_list[k] <= last]:
            del store[k]
        batch_nodes.clear()
        batch_turns.clear()

    texts = RecordTexts(on, prompt_key=False, near=False)  # the turns, prompts computed once (as in the map step)

    def read() -> Iterator[tuple[int, list[str]]]:
        for node, raw in pick(paths, want):
            yield node, texts(as_text(parse(raw)[0]))[2]  # (a line the map step parsed)
            if len(texts.memo) > 10_000:
                texts.memo.clear()

    for node, turns in heapq.merge(known.items(), read()):  # both in node (= input) order
        batch_nodes.append(node)
        batch_turns.append(turns)
        if len(batch_nodes) >= BATCH:
            flush()
    flush()
    return sims
