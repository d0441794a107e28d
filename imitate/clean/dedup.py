"""Duplicate detection: exact (normalized hash) and near-duplicate (MinHash LSH), with a deterministic survivor.

The design is map -> group by key -> connected components, so each step could run on a distributed engine:

  map       text -> shingle hashes -> MinHash signature -> one 64-bit key per LSH band   (`Shingler`, `MinHasher`)
            text -> one 64-bit key of its normalized form                               (`exact_key`)
  group     records sharing a key in any band are candidate duplicates                  (`candidate_edges`)
  cluster   connected components over the candidate edges; the survivor of a component is its member with the best
            rank (input order unless a priority says otherwise)                         (`components`)

Shingles: word n-grams (default 5) of the lowercased words. One-sentence answers have too few word 5-grams for Jaccard
to mean much (one changed word kills up to 5 of 8 shingles), so texts with fewer than `min_words` words use character
n-grams of their normalized form instead, and texts shorter than `min_chars` characters are one shingle (exact match).
The three kinds are tagged differently, so a short text never collides with a long one by accident.

Everything runs on a whole batch of texts at once, as numpy array ops: words are hashed straight from the UTF-8 bytes
(`word_tokens`), n-gram hashes are n vector ops over all positions (`ngram_hashes`), each shingle is hashed to 32 bits
once, and the `num_perm` permutations are `(a * h + b) mod 2**32` (odd `a`: a bijection) over a [num_perm, shingles]
block with `np.minimum.reduceat` taking the minimum per text. No Python loop runs per word or per shingle.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

WORD_RE = re.compile(r"\w+")
_ALNUM_RUN_RE = re.compile(r"[^\W_]+")  # letters and digits; punctuation, underscores and whitespace separate
_DIGITS = str.maketrans("123456789", "000000000")

_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd constant of the polynomial n-gram hash
_TAG_WORD = np.uint64(0x5157A1E0C0FFEE01)
_TAG_CHAR = np.uint64(0x2C4A9D1B00C0FFEE)
_BLOCK = 1 << 13  # shingles per signature block: [128, 8192] uint32 = 4 MiB of scratch, fits in L2/L3


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (an avalanching bijection), elementwise on a uint64 array."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def stable_hash64(text: str) -> int:
    """A 64-bit hash of a string that is the same in every process and run (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def normalize(text: str) -> str:
    """The exact-duplicate normal form: case, punctuation, whitespace and ASCII digits (all -> 0) folded."""
    return " ".join(_ALNUM_RUN_RE.findall(text.lower().translate(_DIGITS)))


def exact_key(text: str) -> int:
    """64-bit key of the normalized text; equal keys = exact duplicates (collision odds ~n^2 / 2^65)."""
    return stable_hash64(normalize(text))


def ngram_hashes(tokens: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polynomial hashes of every n-gram inside each segment of a flat uint64 token array.

    tokens: [T] uint64, the segments back to back; lengths: [S] int64, each segment's length, in order. Returns (hashes [G] uint64, owner [G] int64: the segment of each n-gram,
    pos [G] int64: its first token); n-grams never cross segments.
    """
    total = len(tokens)
    lengths = np.asarray(lengths, np.int64)
    if total < n:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    m = total - n + 1
    h = tokens[:m].copy()
    for j in range(1, n):  # n in-place vector ops over all positions, not a loop per shingle
        np.multiply(h, _MUL, out=h)
        np.add(h, tokens[j : j + m], out=h)
    valid = np.ones(m, bool)
    ends = np.cumsum(lengths)
    tail = (ends[:, None] - np.arange(1, n, dtype=np.int64)[None, :]).ravel()  # last n-1 starts of each segment
    valid[tail[(tail >= 0) & (tail < m)]] = False  # (covers all of a segment shorter than n, too)
    pos = np.flatnonzero(valid)
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), np.maximum(lengths - n + 1, 0))
    return h[pos], owner, pos


_WORD_BYTE = np.zeros(256, bool)
for _c in b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True  # any non-ASCII byte (letters of other scripts, but also e.g. curly quotes) joins words


def word_tokens(texts: Sequence[str], *, lengths: bool = False) -> tuple[np.ndarray, ...]:
    """Lowercased words of many texts as stable 64-bit hashes, computed on the UTF-8 bytes with numpy.

    A word is a run of ASCII letters, digits, '_' or non-ASCII bytes (so "don’t" is one word, "don't" two). Returns
    (tokens [W] uint64 in text order, counts [S] int64: words per text), plus with `lengths` each word's length in
    UTF-8 bytes [W] (= characters for ASCII). Same words -> same hashes in every process.
    """
    enc = [t.lower().encode("utf-8") for t in texts]
    lens = np.fromiter(map(len, enc), np.int64, count=len(enc))
    buf = np.frombuffer(b"".join(enc), np.uint8)
    if not len(buf):
        empty = (np.zeros(0, np.uint64), np.zeros(len(enc), np.int64))
        return empty + ((np.zeros(0, np.int64),) if lengths else ())
    w = _WORD_BYTE[buf]
    start = w.copy()
    start[1:] &= ~w[:-1]
    text_start = np.concatenate(([0], np.cumsum(lens)[:-1]))[lens > 0]
    start[text_start] = w[text_start]  # a word never runs from one text into the next
    word_pos = np.flatnonzero(w)
    first = start[word_pos]  # [B] bool over word bytes: first byte of a word
    wid = np.cumsum(first) - 1
    first_ix = np.flatnonzero(first)
    pos_in_word = np.arange(len(word_pos)) - first_ix[wid]
    powers = np.cumprod(np.full(int(pos_in_word.max()) + 1, _MUL, np.uint64)) if len(word_pos) else _MUL
    contrib = (buf[word_pos].astype(np.uint64) + np.uint64(1)) * powers[pos_in_word]
    tokens = fmix64(np.add.reduceat(contrib, first_ix)) if len(first_ix) else np.zeros(0, np.uint64)
    owner = np.searchsorted(np.cumsum(lens), word_pos[first_ix], side="right")
    counts = np.bincount(owner, minlength=len(enc)).astype(np.int64)
    if lengths:
        return tokens, counts, np.diff(np.append(first_ix, len(word_pos)))
    return tokens, counts


class Shingler:
    """Texts -> 32-bit shingle hashes, flat, with the owning text of each (word n-grams, char n-grams or exact)."""

    def __init__(self, ngram: int = 5, char_ngram: int = 5, min_words: int = 20, min_chars: int = 10):
        self.ngram, self.char_ngram = ngram, char_ngram
        self.min_words = max(min_words, ngram)
        self.min_chars = max(min_chars, char_ngram)

    def shingles(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns (hashes [G] uint32, owner [G] int64). Every text owns at least one shingle."""
        tokens, counts = word_tokens(texts)
        is_long = counts >= self.min_words
        long_ix = np.flatnonzero(is_long)
        parts_h, parts_o = [], []
        if len(long_ix):
            if len(long_ix) < len(texts):
                tokens = tokens[np.repeat(is_long, counts)]
            h, owner, _ = ngram_hashes(tokens, counts[long_ix], self.ngram)
            parts_h.append(h ^ _TAG_WORD)
            parts_o.append(long_ix[owner])
        short_ix = np.flatnonzero(~is_long)
        if len(short_ix):  # few and short: plain Python is fine here
            joined = [" ".join(WORD_RE.findall(texts[i].lower())) for i in short_ix]
            char_sel = [k for k, s in enumerate(joined) if len(s) >= self.min_chars]
            if char_sel:
                codes = np.frombuffer("".join(joined[k] for k in char_sel).encode("utf-32-le"), np.uint32)
                lengths = np.array([len(joined[k]) for k in char_sel], np.int64)
                tokens = fmix64(codes.astype(np.uint64) + np.uint64(1))
                h, owner, _ = ngram_hashes(tokens, lengths, self.char_ngram)
                parts_h.append(h ^ _TAG_CHAR)
                parts_o.append(short_ix[np.asarray(char_sel, np.int64)[owner]])
            exact_sel = [k for k, s in enumerate(joined) if len(s) < self.min_chars]
            if exact_sel:
                parts_h.append(np.array([stable_hash64(joined[k]) for k in exact_sel], np.uint64))
                parts_o.append(short_ix[np.asarray(exact_sel, np.int64)])
        if not parts_h:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        h = np.concatenate(parts_h)
        owner = np.concatenate(parts_o)
        order = np.argsort(owner, kind="stable")  # group by text for reduceat
        return (fmix64(h[order]) >> np.uint64(32)).astype(np.uint32), owner[order]


class MinHasher:
    """MinHash signatures with `num_perm` affine permutations mod 2^32, all as numpy array ops."""

    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = (rng.integers(0, 1 << 31, num_perm, dtype=np.uint64) * 2 + 1).astype(np.uint32)  # odd: bijective
        self.b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)

    def signatures(self, hashes: np.ndarray, owner: np.ndarray, n_texts: int) -> np.ndarray:
        """[n_texts, num_perm] uint32 signatures from shingle hashes sorted by owner (each text owns >= 1 shingle).

        Memory layout matters more than op count here: the block is [num_perm, shingles] so that the minimum per
        text runs along contiguous rows, and a block (~8k shingles, 4 MiB) stays in cache: 10x faster than
        [shingles, num_perm] blocks of 16 MiB.
        """
        sig = np.full((self.num_perm, n_texts), np.iinfo(np.uint32).max, np.uint32)
        if not len(hashes):
            return sig.T
        text_starts = np.concatenate(([0], np.flatnonzero(np.diff(owner)) + 1))
        a, b = self.a[:, None], self.b[:, None]
        lo = 0
        while lo < len(text_starts):  # blocks cut at text boundaries: a text's shingles stay in one block
            start = text_starts[lo]
            hi = max(int(np.searchsorted(text_starts, start + _BLOCK, side="right")), lo + 1)
            stop = text_starts[hi] if hi < len(text_starts) else len(hashes)
            block = np.multiply(a, hashes[None, start:stop])  # uint32 wraparound = mod 2^32
            block += b
            sig[:, owner[text_starts[lo:hi]]] = np.minimum.reduceat(block, text_starts[lo:hi] - start, axis=1)
            lo = hi
        return sig.T


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


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n, bands] uint64: one hash per band of `rows` signature values (the LSH bucket of the text in that band)."""
    n = sig.shape[0]
    keys = np.empty((n, bands), np.uint64)
    s64 = sig.astype(np.uint64)
    for i in range(bands):
        k = np.full(n, np.uint64(i + 1), np.uint64)
        for j in range(i * rows, (i + 1) * rows):
            k = fmix64(k * _MUL + s64[:, j])
        keys[:, i] = k
    return keys


def candidate_edges(keys: np.ndarray, max_pairs_bucket: int = 0) -> np.ndarray:
    """Group by key, per column (band): [E, 2] int64 edges (first member of a bucket, other member).

    keys: [n] or [n, bands] uint64. Star edges keep the edge count linear in bucket size; a bucket's members end up
    in one component either way. With `max_pairs_bucket` > 0, buckets up to that size emit all pairs instead
    (for verification, where a failed star edge must not hide a true pair).
    """
    keys = keys.reshape(len(keys), -1)
    out = []
    for col in range(keys.shape[1]):
        k = keys[:, col]
        order = np.argsort(k, kind="stable")
        ks = k[order]
        new = np.ones(len(ks), bool)
        new[1:] = ks[1:] != ks[:-1]
        gid = np.cumsum(new) - 1
        first_pos = np.flatnonzero(new)
        size = np.diff(np.append(first_pos, len(ks)))
        member = size[gid] > 1
        if not member.any():
            continue
        first = order[first_pos[gid]]
        star = member & ~new
        out.append(np.stack([first[star], order[star]], axis=1))
        if max_pairs_bucket > 2:
            for g in np.flatnonzero((size > 2) & (size <= max_pairs_bucket)):
                mem = order[first_pos[g] : first_pos[g] + size[g]]
                iu = np.triu_indices(len(mem), 1)
                pairs = np.stack([mem[iu[0]], mem[iu[1]]], axis=1)
                out.append(pairs[pairs[:, 0] != mem[0]])
    if not out:
        return np.zeros((0, 2), np.int64)
    edges = np.sort(np.concatenate(out), axis=1)
    return np.unique(edges, axis=0)


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


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash sets."""
    a, b = np.unique(a), np.unique(b)
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


def _histogram(sizes: np.ndarray) -> dict[str, int]:
    """Cluster-size histogram with power-of-two bins: 2, 3-4, 5-8, ..."""
    out: dict[str, int] = {}
    for s in sorted(sizes.tolist()):
        lo = 2 if s == 2 else 2 ** math.ceil(math.log2(s) - 1) + 1
        hi = 2 if s == 2 else 2 ** math.ceil(math.log2(s))
        key = str(lo) if lo == hi else f"{lo}-{hi}"
        out[key] = out.get(key, 0) + 1
    return out


def cluster(
    keys: np.ndarray, alive: np.ndarray, rank: np.ndarray, verify: Any = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Group the alive records by shared keys (exact hashes or LSH bands) and form connected components.

    rank orders survivors (lowest first); verify(idx, edges) -> edges may drop candidate pairs. Returns (removed global
    indexes, their survivors, cluster stats with a size histogram).
    """
    idx = np.flatnonzero(alive)
    edges = candidate_edges(keys[idx], max_pairs_bucket=50 if verify else 0)
    if verify is not None and len(edges):
        edges = verify(idx, edges)
    surv = components(len(idx), edges, rank[idx])
    dup = np.flatnonzero(surv != np.arange(len(idx)))
    sizes = np.bincount(surv)[np.bincount(surv) > 1]
    stats = {"clusters": len(sizes), "records_in_clusters": int(sizes.sum()), "sizes": _histogram(sizes)}
    if len(sizes):
        stats["largest"] = int(sizes.max())
    return idx[dup], idx[surv[dup]], stats


class NearDup:
    """Near-duplicate clustering of texts by MinHash LSH. `keys(texts)` is the map step (run it in workers);
    the module's `cluster(keys, ...)` groups and forms components in one process."""

    def __init__(
        self,
        num_perm: int = 128,
        threshold: float = 0.8,
        ngram: int = 5,
        char_ngram: int = 5,
        min_words: int = 20,
        min_chars: int = 10,
        bands: int | None = None,
        seed: int = 1,
    ):
        self.shingler = Shingler(ngram, char_ngram, min_words, min_chars)
        self.hasher = MinHasher(num_perm, seed)
        self.threshold = threshold
        if bands:
            self.bands, self.rows = bands, num_perm // bands
        else:
            self.bands, self.rows = optimal_bands(threshold, num_perm)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        h, owner = self.shingler.shingles(texts)
        return self.hasher.signatures(h, owner, len(texts))

    def keys(self, texts: Sequence[str], second: Sequence[str] | None = None) -> np.ndarray:
        """Map: texts -> [n, bands] uint64 band keys.

        With `second` (e.g. prompts and answers), a band matches only when it matches in both signatures, so a pair
        becomes a candidate with probability 1 - (1 - (J1 * J2)^rows)^bands: the pair must be similar on both
        sides (the product of the two Jaccards is what meets the threshold), and a long shared prompt cannot make
        two different answers look alike."""
        keys = band_keys(self.signatures(texts), self.bands, self.rows)
        if second is not None:
            keys = fmix64(keys * _MUL + band_keys(self.signatures(second), self.bands, self.rows))
        return keys

    def shingle_sets(self, texts: Sequence[str]) -> list[np.ndarray]:
        h, owner = self.shingler.shingles(texts)
        cuts = np.flatnonzero(np.diff(owner)) + 1
        return np.split(h, cuts)

    def verify(self, edges: np.ndarray, parts: dict[int, tuple[str, ...]]) -> np.ndarray:
        """Keep the candidate edges whose exact shingle Jaccard (the product over the parts, if several) reaches the
        threshold. parts: node -> its texts, e.g. (prompt, answer)."""
        if not len(edges):
            return edges
        nodes = sorted(parts)
        width = len(parts[nodes[0]])
        sets = [dict(zip(nodes, self.shingle_sets([parts[i][k] for i in nodes]))) for k in range(width)]
        keep = [float(np.prod([jaccard(s[u], s[v]) for s in sets])) >= self.threshold for u, v in edges.tolist()]
        return edges[np.asarray(keep, bool)]
