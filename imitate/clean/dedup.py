"""Duplicate detection: exact (normalized hash) and near-duplicate (MinHash LSH candidates, verified exactly), with a
deterministic survivor.

What near-dedup measures (`similarity`): records are compared turn by turn (the turns of `keys.near_turns`: every
non-system turn by default, in order; records with other roles or another number of turns are never near-duplicates).
Each turn is its normalized text (`keys.normalize`) as a set of character n-grams (default 5; a turn shorter than n
is one shingle, itself). The similarity of two records is the smallest Jaccard similarity of their turns: every
turn must be alike, so a later turn that differs makes a different record, and a long shared prompt cannot make two
different answers look alike. On top, prompts must have equal content guards (`keys.prompt_guard`: numbers, code,
identifiers). A one-word edit in a 20-word answer (~120 characters) changes about 9 of ~116 5-grams: Jaccard ~0.86.

The design is map -> group by key -> verify -> select, so each step could run on a distributed engine:

  map       turns -> n-gram hashes, each tagged by its turn -> MinHash signature of the record -> one 64-bit key per
            LSH band, mixed with the guard (`NearDup.keys`); text -> one 64-bit key of its normal form (`exact_key`)
  group     records sharing a key in any band are candidate pairs                                (`candidate_edges`)
  verify    the exact similarity of every candidate pair, from the shingle sets              (`NearDup.similarity`)
  select    in rank order, a record with a verified edge to an already kept record is removed as its duplicate;
            others are kept (`select`). Removed records are always alike to their survivor, never only through
            a chain (A~B~C with A and C far apart keeps A and C).

Why candidates catch what verify accepts: turn-tagged shingles make the record's set the disjoint union of its turn
sets, and a union's Jaccard is a mediant of the turns' (sum of intersections / sum of unions), so it is at least the
smallest turn Jaccard. LSH over the whole record with P(candidate | Jaccard = threshold) >= 0.99 (`recall_bands`)
therefore finds >= 99% of the pairs whose similarity reaches the threshold.

The map step's hashing (n-grams, MinHash signatures, exact keys) is imitate/clean/minhash.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from imitate.clean import minhash
from imitate.clean.minhash import MUL, MinHasher, Shingler, fmix64


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimizing the area of false positives below `threshold` + false negatives above it,
    with P(candidate | Jaccard s) = 1 - (1 - s^rows)^bands (the usual LSH parameter choice, equal weights)."""
    best, best_err = (1, num_perm), float("inf")
    lo = np.linspace(0.0, threshold, 401)
    hi = np.linspace(threshold, 1.0, 401)
    for b in range(2, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo**r) ** b, lo)
            fn = np.trapezoid((1 - hi**r) ** b, hi)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


def recall_bands(threshold: float, num_perm: int, target: float = 0.99) -> tuple[int, int]:
    """(bands, rows) for candidates that an exact check follows: the most rows per band (fewest false candidates)
    such that a pair at exactly `threshold` is a candidate with probability >= target, 1 - (1 - t^rows)^bands.
    At 0.8 with 128 permutations: 21 x 6 (P = 0.998; 9 x 13, balanced for no check, gives 0.40)."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= target:
            return bands, rows
    return num_perm, 1


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n, bands] uint64: one hash per band of `rows` signature values (the LSH bucket of the text in that band)."""
    n = sig.shape[0]
    s64 = sig[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    keys = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64), (n, bands))
    for j in range(rows):  # all bands at once, one row at a time
        keys = fmix64(keys * MUL + s64[:, :, j])
    return keys


def candidate_edges(keys: np.ndarray, max_pairs_bucket: int = 0) -> np.ndarray:
    """Group by key, per column (band): [E, 2] int64 edges (first member of a bucket, other member).

    keys: [n] or [n, bands] uint64. Star edges keep the edge count linear in bucket size; a bucket's members end up
    in one component either way. With `max_pairs_bucket` > 0, buckets up to that size emit all pairs instead
    (for verification, where a failed star edge must not hide a true pair).
    """
    keys = keys.reshape(len(keys), -1)
    if minhash.native is not None and len(keys) < 2**32:  # the same edges, from hash tables
        packed = np.frombuffer(minhash.native.band_edges(np.ascontiguousarray(keys, np.uint64), keys.shape[1],
                                                         max_pairs_bucket), np.uint64)  # fmt: skip
        return _unpack(np.sort(packed))
    nodes = np.arange(len(keys), dtype=np.int64)
    return unique_edges(
        [bucket_edges(keys[:, col], nodes, max_pairs_bucket) for col in range(keys.shape[1])]
    )


def bucket_edges(k: np.ndarray, nodes: np.ndarray, max_pairs_bucket: int = 0) -> np.ndarray:
    """The edges of one band's buckets: rows (key k[i], record nodes[i]) in any order, every member of a bucket among
    them (a shuffle by key brings them together). Star edges from the bucket's smallest node; all pairs of a bucket of
    up to `max_pairs_bucket` members. [E, 2] int64, not yet unique (`unique_edges`): the same set of edges whatever
    the order of the rows."""
    order = np.argsort(k)  # not stable: numpy's vectorized sort, ~6x a stable one; a bucket's order does not matter
    ks, ns = k[order], nodes[order]
    new = np.ones(len(ks), bool)
    new[1:] = ks[1:] != ks[:-1]
    gid = np.cumsum(new) - 1
    first_pos = np.flatnonzero(new)
    size = np.diff(np.append(first_pos, len(ks)))
    member = size[gid] > 1
    if not member.any():
        return np.zeros((0, 2), np.int64)
    first = np.minimum.reduceat(ns, first_pos)[gid]  # the bucket's smallest node
    star = member & (ns != first)
    out = [np.stack([first[star], ns[star]], axis=1)]
    small = member & (size[gid] <= max_pairs_bucket) if max_pairs_bucket > 2 else np.zeros(0, bool)
    if small.any():  # every pair of a small bucket: members d apart in sorted order, for each d
        for d in range(2, min(int(size[size <= max_pairs_bucket].max()), max_pairs_bucket)):
            same = small[d:] & (gid[d:] == gid[:-d])
            out.append(np.stack([ns[:-d][same], ns[d:][same]], axis=1))
        same = small[1:] & ~new[1:]
        out.append(np.stack([ns[:-1][same], ns[1:][same]], axis=1))  # d = 1
    return np.concatenate(out)


def unique_edges(parts: list[np.ndarray]) -> np.ndarray:
    """Edges as (smaller, larger) node, each once, sorted: [E, 2] int64."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros((0, 2), np.int64)
    edges = np.sort(np.concatenate(parts), axis=1).astype(np.uint64)
    return _unpack(np.sort((edges[:, 0] << np.uint64(32)) | edges[:, 1]))  # one sort on packed pairs (n < 2^32)


def _unpack(key: np.ndarray) -> np.ndarray:
    """Sorted packed pairs (a << 32 | b) -> [E, 2] int64 edges, each once."""
    if not len(key):
        return np.zeros((0, 2), np.int64)
    key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    return np.stack([key >> np.uint64(32), key & np.uint64(0xFFFFFFFF)], axis=1).astype(np.int64)


def components(n: int, edges: np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
    """Connected components; returns for each node the survivor of its component (the member with the lowest rank).

    rank: [n] distinct ints (default: input order). Min-label propagation with pointer jumping, all array ops:
    each round pushes the smaller label across every edge, then jumps labels to their label's label.
    """
    if rank is None:
        rank = np.arange(n, dtype=np.int64)
    by_rank = np.argsort(rank, kind="stable")  # node at each rank position
    pos = np.empty(n, np.int64)
    pos[by_rank] = np.arange(n)
    label = np.arange(n, dtype=np.int64)  # in rank-position space
    if len(edges):
        u, v = pos[edges[:, 0]], pos[edges[:, 1]]
        while True:
            m = np.minimum(label[u], label[v])
            new = label.copy()
            np.minimum.at(new, u, m)
            np.minimum.at(new, v, m)
            while True:  # pointer jumping
                jumped = new[new]
                if np.array_equal(jumped, new):
                    break
                new = jumped
            if np.array_equal(new, label):
                break
            label = new
    return by_rank[label[pos]]


def select(n: int, edges: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Survivors over verified edges, without chaining: in rank order, a record with an edge to a better-ranked record
    that is kept is removed as a duplicate of the best such record; otherwise it is kept. Returns for each node its
    survivor (itself when kept). A removed record is always directly alike to its survivor."""
    surv = np.arange(n, dtype=np.int64)
    if not len(edges):
        return surv
    u, v = edges[:, 0], edges[:, 1]
    swap = rank[u] > rank[v]
    better, worse = np.where(swap, v, u), np.where(swap, u, v)
    order = np.lexsort((rank[better], rank[worse]))  # by the worse end's rank, then its better neighbours' ranks
    removed = np.zeros(n, bool)
    for w, b in zip(worse[order].tolist(), better[order].tolist()):  # a better end is decided before its edges here
        if not removed[w] and not removed[b]:
            removed[w] = True
            surv[w] = b
    return surv


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted arrays of distinct shingle hashes (1.0 for two empty sets)."""
    if not len(a) or not len(b):
        return 1.0 if len(a) == len(b) else 0.0
    pos = np.minimum(np.searchsorted(b, a), len(b) - 1)
    inter = int(np.count_nonzero(b[pos] == a))
    return inter / (len(a) + len(b) - inter)


def _packed(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A record's `turn_sets` in the form of `NearDup.packed`: (its values, turn after turn; values per turn)."""
    values = np.concatenate(sets) if sets else np.zeros(0, np.uint32)
    return values, np.fromiter(map(len, sets), np.int64, len(sets))


def _histogram(sizes: np.ndarray) -> dict[str, int]:
    """Cluster-size histogram with power-of-two bins: 2, 3-4, 5-8, ..."""
    out: dict[str, int] = {}
    for s in sorted(sizes.tolist()):
        lo = 2 if s == 2 else 2 ** math.ceil(math.log2(s) - 1) + 1
        hi = 2 if s == 2 else 2 ** math.ceil(math.log2(s))
        key = str(lo) if lo == hi else f"{lo}-{hi}"
        out[key] = out.get(key, 0) + 1
    return out


MAX_PAIRS_BUCKET = 50  # with verification, a bucket up to this size emits all its pairs, a bigger one a star


def cluster(
    keys: np.ndarray, alive: np.ndarray, rank: np.ndarray, verify: Any = None, group: Any = candidate_edges
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Group the alive records by shared keys (exact hashes or LSH bands) and pick survivors.

    Without `verify` a shared key is a duplicate (exact keys): connected components, the best-ranked member survives.
    With it, verify(idx, edges) -> edges keeps the candidate pairs that are duplicates, and `select` picks survivors.
    rank orders survivors (lowest first). `group(keys, max_pairs_bucket)` finds the candidate pairs (`candidate_edges`
    here, a shuffle on the Ray engine: the same edges). Returns (removed global indexes, their survivors, stats with
    a histogram).
    """
    idx = np.flatnonzero(alive)
    edges = group(keys[idx], MAX_PAIRS_BUCKET if verify else 0)
    if verify is None:
        surv = components(len(idx), edges, rank[idx])
    else:
        surv = select(len(idx), verify(idx, edges) if len(edges) else edges, rank[idx])
    dup = np.flatnonzero(surv != np.arange(len(idx)))
    counts = np.bincount(surv, minlength=len(idx))
    sizes = counts[counts > 1]
    stats = {"clusters": len(sizes), "records_in_clusters": int(sizes.sum()), "sizes": _histogram(sizes)}
    if len(sizes):
        stats["largest"] = int(sizes.max())
    return idx[dup], idx[surv[dup]], stats


class NearDup:
    """Near-duplicates as defined in the module docstring. `keys(...)` is the map step (run it in workers); the
    module's `cluster(keys, ...)` groups them, `similarity` verifies candidate pairs from `turn_sets`."""

    def __init__(
        self,
        num_perm: int = 128,
        threshold: float = 0.8,
        ngram: int = 5,
        bands: int | None = None,
        seed: int = 1,
        verify: bool = True,
    ):
        self.shingler = Shingler(ngram)
        self.hasher = MinHasher(num_perm, seed)
        self.threshold = threshold
        if bands:
            self.bands, self.rows = bands, num_perm // bands
        elif verify:
            self.bands, self.rows = recall_bands(threshold, num_perm)
        else:  # no exact check: balance false candidates against missed pairs
            self.bands, self.rows = optimal_bands(threshold, num_perm)

    def _hashes(self, records: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shingle hashes, turn after turn; shingles per turn; turns per record) of records given as lists of
        normalized turns, each turn's shingles tagged by its position in its record."""
        counts = np.fromiter(map(len, records), np.int64, count=len(records))
        flat = [t for turns in records for t in turns]
        position = np.arange(len(flat), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        h, per_turn = self.shingler.hashes(flat, position)
        return h, per_turn, counts

    def _shingles(self, records: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hashes, owning turn, record of each turn) of records given as lists of normalized turns."""
        h, per_turn, counts = self._hashes(records)
        turn = np.repeat(np.arange(len(per_turn), dtype=np.int64), per_turn)
        return h, turn, np.repeat(np.arange(len(records), dtype=np.int64), counts)

    def signatures(self, records: Sequence[Sequence[str]]) -> np.ndarray:
        """[n, num_perm] MinHash signatures of each record's turn-tagged shingle set (each record has >= 1 turn):
        of the high 32 bits of each shingle hash."""
        h, per_turn, counts = self._hashes(records)
        turn_ends = np.cumsum(per_turn)
        record_ends = turn_ends[np.cumsum(counts) - 1] if len(per_turn) else np.zeros(len(records), np.int64)
        return self.hasher.signatures_at(h, np.concatenate(([0], record_ends)))

    def keys(self, records: Sequence[Sequence[str]], guards: np.ndarray | None = None) -> np.ndarray:
        """Map: records (lists of normalized turns) -> [n, bands] uint64 band keys, each mixed with the record's
        guard (uint64, e.g. a hash of `keys.prompt_guard`), so records with different guards never share a key."""
        return self.keys_and_sketch(records, guards)[0]

    def keys_and_sketch(
        self, records: Sequence[Sequence[str]], guards: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Band keys (as `keys`) and [n, num_perm] uint8 sketches: the low 8 bits of each signature value (b-bit
        MinHash), kept to drop candidates that are far below the threshold before the exact check (`plausible`)."""
        sig = self.signatures(records)
        if minhash.native is not None and len(sig):  # the same keys as below
            keys = np.empty((len(sig), self.bands), np.uint64)
            g = None if guards is None else np.ascontiguousarray(guards, np.uint64)
            minhash.native.band_keys(np.ascontiguousarray(sig), self.bands, self.rows, g, keys)
        else:
            keys = band_keys(sig, self.bands, self.rows)
            if guards is not None:
                keys = fmix64(keys * MUL + np.asarray(guards, np.uint64)[:, None])
        return keys, (sig & np.uint32(0xFF)).astype(np.uint8)

    def plausible(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[E] bool for sketch rows a, b [E, num_perm]: False where the Jaccard estimate is below threshold - 0.2.

        A matching 8-bit value means an equal minimum (probability J) or a chance collision (1/256 of the rest), so
        the estimate is (matches - 1/256) / (1 - 1/256). A pair whose record Jaccard reaches the threshold (and every
        pair that passes the exact check does: the record's Jaccard is at least its smallest turn's) falls 0.2 below
        it with 128 values at worst with odds ~1e-8 (5.6 standard deviations at 0.8, 4.5 at 0.5)."""
        m = (a == b).mean(axis=1)
        return (m - 1 / 256) / (1 - 1 / 256) >= self.threshold - 0.2

    def turn_sets(self, records: Sequence[Sequence[str]]) -> list[list[np.ndarray]]:
        """Per record, per turn: the sorted distinct 32-bit shingle hashes (what `similarity` compares; with ~1000
        shingles a turn, a 32-bit collision shifts a Jaccard by 1/1000 about once in 10^4 pairs)."""
        h, owner, record_of = self._shingles(records)
        key = np.sort((owner.astype(np.uint64) << np.uint64(32)) | (h >> np.uint64(32)))  # one sort: turn, hash
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]  # (np.unique: 100x slower in numpy 2.4)
        turn = (key >> np.uint64(32)).astype(np.int64)
        cuts = [0, *(np.flatnonzero(np.diff(turn)) + 1).tolist(), len(key)]  # every turn owns >= 1
        hashes = key.astype(np.uint32)
        per_turn = [hashes[a:b] for a, b in zip(cuts[:-1], cuts[1:])]  # (slices: np.split costs 3x more)
        out: list[list[np.ndarray]] = [[] for _ in records]
        for r, arr in zip(record_of.tolist(), per_turn):
            out[r].append(arr)
        return out

    def packed(self, records: Sequence[Sequence[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per record: (the 32-bit shingle values of all its turns, turn after turn, unsorted, repeats included;
        [turns] the values per turn). What `packed_similarities` compares: the same sets as `turn_sets`, without
        sorting them (the C kernel counts distinct values with a hash table)."""
        h, per_turn, counts = self._hashes(records)
        values = (h >> np.uint64(32)).astype(np.uint32)
        ends = np.cumsum(per_turn).tolist()
        out, t, at = [], 0, 0
        for c in counts.tolist():
            stop = ends[t + c - 1] if c else at
            out.append((values[at:stop], per_turn[t : t + c]))
            t, at = t + c, stop
        return out

    @staticmethod
    def packed_similarities(pairs: Sequence[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]):
        """[P] float64: `similarity` of each pair of `packed` records (the same values as `similarities` of their
        `turn_sets`); needs the C kernels."""
        out = np.zeros(len(pairs), np.float64)
        if not pairs:
            return out
        sides = []
        for k in (0, 1):
            vals = [p[k][0] for p in pairs]
            turns = [p[k][1] for p in pairs]
            v_off = np.concatenate(([0], np.cumsum(np.fromiter(map(len, vals), np.int64, len(vals)))))
            t_off = np.concatenate(([0], np.cumsum(np.fromiter(map(len, turns), np.int64, len(turns)))))
            sides += [np.concatenate(vals), v_off, np.concatenate(turns).astype(np.int64, copy=False), t_off]
        minhash.native.pair_jaccard(*sides, out)
        return out

    @staticmethod
    def similarity(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        """The smallest Jaccard similarity over aligned turns; 0 when the records have different numbers of turns."""
        if len(a) != len(b):
            return 0.0
        return min(jaccard(x, y) for x, y in zip(a, b))

    @staticmethod
    def similarities(pairs: Sequence[tuple[list[np.ndarray], list[np.ndarray]]]) -> np.ndarray:
        """[P] float64: `similarity` of each pair of `turn_sets`, all pairs in a few array ops (the same values:
        the same counts, divided as floats). Every turn of both sides, tagged by its pair-turn, is laid end to end:
        each side is then one sorted array, and one `searchsorted` finds every shared shingle. With the C kernels,
        `packed_similarities` of the same sets (sorted values are a case of unsorted ones)."""
        if minhash.native is not None:
            return NearDup.packed_similarities([(_packed(a), _packed(b)) for a, b in pairs])
        sims = np.zeros(len(pairs), np.float64)
        a_sets: list[np.ndarray] = []
        b_sets: list[np.ndarray] = []
        owner: list[int] = []
        for i, (a, b) in enumerate(pairs):
            if len(a) == len(b):  # (a record has >= 1 turn)
                a_sets += a
                b_sets += b
                owner += [i] * len(a)
        if not owner:
            return sims
        la = np.fromiter(map(len, a_sets), np.int64, len(a_sets))
        lb = np.fromiter(map(len, b_sets), np.int64, len(b_sets))
        turn = np.arange(len(a_sets), dtype=np.uint64) << np.uint64(32)
        ka = np.repeat(turn, la) | np.concatenate(a_sets).astype(np.uint64)  # sorted: by turn, then hash
        kb = np.repeat(turn, lb) | np.concatenate(b_sets).astype(np.uint64)
        inter = np.zeros(len(a_sets), np.int64)
        if len(ka) and len(kb):
            hit = kb[np.minimum(np.searchsorted(kb, ka), len(kb) - 1)] == ka
            inter = np.bincount(np.repeat(np.arange(len(a_sets)), la)[hit], minlength=len(a_sets))
        with np.errstate(invalid="ignore", divide="ignore"):
            jac = inter / (la + lb - inter)
        empty = (la == 0) | (lb == 0)  # as `jaccard`: two empty sets are alike, one empty set is not
        jac[empty] = (la[empty] == lb[empty]).astype(np.float64)
        owner_arr = np.asarray(owner, np.int64)
        starts = np.flatnonzero(np.concatenate(([True], owner_arr[1:] != owner_arr[:-1])))
        sims[owner_arr[starts]] = np.minimum.reduceat(jac, starts)
        return sims
