"""Hashing for clean's map step: word tokens, character/word n-gram hashes, MinHash signatures, exact keys.

Everything runs on a whole batch of texts at once. With the C kernels (imitate/clean/_native.c, `native`; built at
install where a compiler is) each is one pass in C; without them, numpy array ops give the same numbers: n-gram
hashes are n vector ops over all positions (`ngram_hashes`), and the `num_perm` permutations are
`(a * h + b) mod 2**32` (odd `a`: a bijection) over a [num_perm, shingles] block with `np.minimum.reduceat` taking
the minimum per record. `native` is also what the other clean modules check (dedup, keys, filters, repetition,
verify); tests set it to None to run the fallback.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence

import numpy as np


def _load_native():
    """The C kernels (imitate/clean/_native.c), or None: not built (no compiler at install), or IMITATE_NATIVE=0."""
    if os.environ.get("IMITATE_NATIVE", "1") == "0":
        return None
    try:
        from imitate.clean import _native  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _native


native = _load_native()  # the numpy code below gives the same numbers (tests/test_native.py)

WORD_RE = re.compile(r"\w+")

MUL = np.uint64(0x9E3779B97F4A7C15)  # odd constant of the polynomial n-gram hash
_TAG_TURN = np.uint64(0x5157A1E0C0FFEE01)  # shingles of turn k are tagged with fmix64(k + this)
_BLOCK = 1 << 13  # shingles per signature block: [128, 8192] uint32 = 4 MiB of scratch, fits in L2/L3


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (an avalanching bijection), elementwise on a uint64 array."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


_CODE_HASH = fmix64(np.arange(1, 0x10001, dtype=np.uint64))  # character code point -> 64-bit token, for the BMP


def stable_hash64(text: str) -> int:
    """A 64-bit hash of a string that is the same in every process and run (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def exact_key(text: str) -> int:
    """64-bit key of an (already normalized) text; equal keys = exact duplicates (collision odds ~n^2 / 2^65)."""
    return stable_hash64(text)


def ngram_hashes(tokens: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polynomial hashes of every n-gram inside each segment of a flat uint64 token array.

    tokens: [T] uint64, the segments back to back; lengths: [S] int64, each segment's length, in order. Returns
    (hashes [G] uint64, owner [G] int64: the segment of each n-gram, pos [G] int64: its first token); n-grams never
    cross segments.
    """
    total = len(tokens)
    lengths = np.asarray(lengths, np.int64)
    if total < n:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), np.maximum(lengths - n + 1, 0))
    if native is not None:
        h, pos = np.empty(len(owner), np.uint64), np.empty(len(owner), np.int64)
        tokens, lengths = np.ascontiguousarray(tokens, np.uint64), np.ascontiguousarray(lengths)
        native.ngram_hashes(tokens, lengths, n, h, pos)
        return h, owner, pos
    m = total - n + 1
    h = tokens[:m].copy()
    for j in range(1, n):  # n in-place vector ops over all positions, not a loop per shingle
        np.multiply(h, MUL, out=h)
        np.add(h, tokens[j : j + m], out=h)
    valid = np.ones(m, bool)
    ends = np.cumsum(lengths)
    tail = (ends[:, None] - np.arange(1, n, dtype=np.int64)[None, :]).ravel()  # last n-1 starts of each segment
    valid[tail[(tail >= 0) & (tail < m)]] = False  # (covers all of a segment shorter than n, too)
    pos = np.flatnonzero(valid)
    return h[pos], owner, pos


_WORD_BYTE = np.zeros(256, bool)
for _c in b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True  # any non-ASCII byte (letters of other scripts, but also e.g. curly quotes) joins words
_WORD_BYTE_U8 = _WORD_BYTE.astype(np.uint8)  # (the table as the C kernel reads it)


def word_tokens(texts: Sequence[str], *, lengths: bool = False) -> tuple[np.ndarray, ...]:
    """Lowercased words of many texts as stable 64-bit hashes, computed on the UTF-8 bytes with numpy.

    A word is a run of ASCII letters, digits, '_' or non-ASCII bytes (so "don’t" is one word, "don't" two). Returns
    (tokens [W] uint64 in text order, counts [S] int64: words per text), plus with `lengths` each word's length in
    UTF-8 bytes [W] (= characters for ASCII). Same words -> same hashes in every process.
    """
    enc = [t.lower().encode("utf-8") for t in texts]
    lens = np.fromiter(map(len, enc), np.int64, count=len(enc))
    if native is not None:  # the same numbers, one pass over the bytes
        joined, counts = b"".join(enc), np.empty(len(enc), np.int64)
        most = (len(joined) + len(enc)) // 2 + 1  # (a word is >= 1 byte, and words of a text are >= 1 byte apart)
        tokens, wlen = np.empty(most, np.uint64), np.empty(most, np.int64)
        n = native.words(joined, lens, _WORD_BYTE_U8, counts, tokens, wlen)
        return (tokens[:n].copy(), counts, wlen[:n].copy()) if lengths else (tokens[:n].copy(), counts)
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
    if not len(word_pos):  # texts without a word (e.g. "?"): nothing to hash
        empty = (np.zeros(0, np.uint64), np.zeros(len(enc), np.int64))
        return empty + ((np.zeros(0, np.int64),) if lengths else ())
    powers = np.cumprod(np.full(int(pos_in_word.max()) + 1, MUL, np.uint64))
    contrib = (buf[word_pos].astype(np.uint64) + np.uint64(1)) * powers[pos_in_word]
    tokens = fmix64(np.add.reduceat(contrib, first_ix)) if len(first_ix) else np.zeros(0, np.uint64)
    owner = np.searchsorted(np.cumsum(lens), word_pos[first_ix], side="right")
    counts = np.bincount(owner, minlength=len(enc)).astype(np.int64)
    if lengths:
        return tokens, counts, np.diff(np.append(first_ix, len(word_pos)))
    return tokens, counts


def word_counts(texts: Sequence[str]) -> np.ndarray:
    """[S] int64: the words of each text as `word_tokens` counts them, without hashing them (a third of the time)."""
    enc = [t.encode("utf-8") for t in texts]  # (lowercasing does not move word boundaries: bytes >= 0x80 are word)
    lens = np.fromiter(map(len, enc), np.int64, count=len(enc))
    if native is not None:
        counts = np.empty(len(enc), np.int64)
        native.words(b"".join(enc), lens, _WORD_BYTE_U8, counts, None, None)
        return counts
    buf = np.frombuffer(b"".join(enc), np.uint8)
    if not len(buf):
        return np.zeros(len(enc), np.int64)
    w = _WORD_BYTE[buf]
    start = w.copy()
    start[1:] &= ~w[:-1]
    ends = np.cumsum(lens)
    text_start = (ends - lens)[lens > 0]
    start[text_start] = w[text_start]
    per = np.add.reduceat(start.astype(np.int64), text_start) if len(text_start) else np.zeros(0, np.int64)
    out = np.zeros(len(enc), np.int64)
    out[lens > 0] = per
    return out


class Shingler:
    """Turns -> 64-bit character n-gram hashes, each tagged by its turn's position, flat, with the owning turn."""

    def __init__(self, ngram: int = 5):
        self.ngram = ngram

    def shingles(self, turns: Sequence[str], position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """turns: normalized texts; position: [S] each turn's index in its record (the tag). Returns (hashes [G]
        uint64, owner [G] int64: the turn of each, ascending). Every turn owns at least one shingle."""
        h, counts = self.hashes(turns, position)
        return h, np.repeat(np.arange(len(turns), dtype=np.int64), counts)

    def hashes(self, turns: Sequence[str], position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As `shingles`, with [S] shingles per turn (>= 1) in place of the owner of each shingle."""
        n = self.ngram
        lengths = np.fromiter(map(len, turns), np.int64, count=len(turns))
        codes = np.frombuffer("".join(turns).encode("utf-32-le"), np.uint32)
        tags = fmix64(np.asarray(position, np.uint64) + _TAG_TURN)
        counts = np.where(lengths < n, 1, lengths - n + 1)  # a turn shorter than n is one shingle: itself
        short = np.flatnonzero(lengths < n)
        short_hash = np.array([stable_hash64(turns[i]) for i in short], np.uint64)
        if native is not None and n <= 64:  # the same numbers as below, in one pass (its window holds 64 at most)
            whole = np.zeros(len(turns), np.uint64)
            whole[short] = short_hash
            h = np.empty(int(counts.sum()), np.uint64)
            native.char_shingles(codes, lengths, tags, whole, n, h)
            return h, counts
        big = codes > 0xFFFF
        if not big.any():
            tokens = _CODE_HASH[codes]  # a table lookup per character (fmix64 of the code point + 1)
        else:
            tokens = _CODE_HASH[np.where(big, 0, codes)]
            tokens[big] = fmix64(codes[big].astype(np.uint64) + np.uint64(1))
        h, owner, _ = ngram_hashes(tokens, lengths, n)
        h ^= tags[owner]
        if len(short):
            h = np.concatenate([h, short_hash ^ tags[short]])
            owner = np.concatenate([owner, short])
            h = h[np.argsort(owner, kind="stable")]
        return h, counts


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
        if native is not None:
            starts = np.searchsorted(owner, np.arange(n_texts + 1))  # owner is ascending
            return self.signatures_at(np.ascontiguousarray(hashes, np.uint32), starts)
        return self._signatures_numpy(hashes, owner, n_texts)

    def signatures_at(self, hashes: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """As `signatures`, with each text's shingles given as hashes[starts[i]:starts[i + 1]]; hashes: uint32, or
        uint64 whose high 32 bits are the values (read in place: no shifted copy)."""
        n_texts = len(starts) - 1
        if hashes.dtype not in (np.uint32, np.uint64):
            raise TypeError(f"signatures_at: hashes must be uint32 or uint64, not {hashes.dtype}")
        if native is not None:
            out = np.empty((n_texts, self.num_perm), np.uint32)
            native.minhash(np.ascontiguousarray(hashes), np.ascontiguousarray(starts, np.int64), self.a, self.b, out)
            return out
        values = (hashes >> np.uint64(32)).astype(np.uint32) if hashes.dtype == np.uint64 else hashes
        owner = np.repeat(np.arange(n_texts, dtype=np.int64), np.diff(starts))
        return self._signatures_numpy(values, owner, n_texts)

    def _signatures_numpy(self, hashes: np.ndarray, owner: np.ndarray, n_texts: int) -> np.ndarray:
        sig = np.full((self.num_perm, n_texts), np.iinfo(np.uint32).max, np.uint32)
        if not len(hashes):
            return sig.T
        text_starts = np.concatenate(([0], np.flatnonzero(np.diff(owner)) + 1))
        a, b = self.a[:, None], self.b[:, None]
        # one scratch array reused for every block (a fresh 4 MiB array per block costs ~25% more: page faults); a
        # block ends after the text that crosses _BLOCK shingles, so it may be longer: up to twice, else its own array
        scratch = np.empty((self.num_perm, 2 * _BLOCK), np.uint32)
        lo = 0
        while lo < len(text_starts):  # blocks cut at text boundaries: a text's shingles stay in one block
            start = text_starts[lo]
            hi = max(int(np.searchsorted(text_starts, start + _BLOCK, side="right")), lo + 1)
            stop = text_starts[hi] if hi < len(text_starts) else len(hashes)
            m = stop - start
            block = scratch[:, :m] if m <= scratch.shape[1] else np.empty((self.num_perm, m), np.uint32)
            np.multiply(a, hashes[None, start:stop], out=block)  # uint32 wraparound = mod 2^32
            block += b
            sig[:, owner[text_starts[lo:hi]]] = np.minimum.reduceat(block, text_starts[lo:hi] - start, axis=1)
            lo = hi
        return sig.T
