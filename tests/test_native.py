"""clean's C kernels (imitate/clean/_native.c) against the numpy code they stand in for: the same numbers bit for bit,
so `imitate clean` writes the same files whether or not the module was built."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
from test_clean_shapes import distinct_corpus, planted, write

import imitate.clean.minhash as mh
from imitate.clean.minhash import MinHasher, Shingler, ngram_hashes
from imitate.clean.stage import CleanConfig, run

needs_native = pytest.mark.skipif(mh.native is None, reason="the C kernels are not built here")


def test_the_kernels_are_built_where_a_compiler_is():
    """setup.py builds them as optional (an install without a compiler still works): a C file that stops compiling
    would otherwise fall back to numpy without a word. CI has a compiler, so there they must be present."""
    if os.environ.get("IMITATE_NATIVE") == "0" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler (or IMITATE_NATIVE=0): the numpy code runs")
    assert mh.native is not None, "imitate/clean/_native.c did not build: `pip install -v -e .` shows the compiler's error"


def without_native(monkeypatch, fn, *args):
    monkeypatch.setattr(mh, "native", None)
    try:
        return fn(*args)
    finally:
        monkeypatch.undo()


def turns(rnd: random.Random, k: int) -> list[str]:
    """Texts of every length around the n-gram size (0..4 characters give one shingle), ASCII, accents, CJK and
    characters outside the BMP (emoji: their own token path in the numpy code)."""
    alphabet = "abcdefgh ij" + "éüñ" + "漢字" + "\U0001f600\U0001d11e"
    out = [""] * 3 + ["a", "ab", "abcd", "abcde", "\U0001f600" * 6]
    out += ["".join(rnd.choices(alphabet, k=rnd.choice([rnd.randint(0, 8), rnd.randint(5, 300)]))) for _ in range(k)]
    return out


@needs_native
@pytest.mark.parametrize("ngram", [1, 3, 5, 9])
def test_shingles_equal_the_numpy_code(monkeypatch, ngram):
    rnd = random.Random(ngram)
    texts = turns(rnd, 300)
    position = np.array([rnd.randrange(4) for _ in texts], np.int64)
    sh = Shingler(ngram)
    h, owner = sh.shingles(texts, position)
    h0, owner0 = without_native(monkeypatch, sh.shingles, texts, position)
    assert h.dtype == h0.dtype == np.uint64
    assert np.array_equal(owner, owner0) and np.array_equal(h, h0)


@needs_native
def test_ngram_hashes_equal_the_numpy_code(monkeypatch):
    rnd = random.Random(3)
    lengths = np.array([rnd.choice([0, 1, 2, rnd.randint(0, 40)]) for _ in range(500)], np.int64)
    tokens = np.array([rnd.getrandbits(64) for _ in range(int(lengths.sum()))], np.uint64)
    for n in (1, 2, 4, 10):
        got, want = ngram_hashes(tokens, lengths, n), without_native(monkeypatch, ngram_hashes, tokens, lengths, n)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))


@needs_native
@pytest.mark.parametrize("num_perm", [1, 16, 128, 200])
def test_signatures_equal_the_numpy_code(monkeypatch, num_perm):
    """Every text's minimum under every permutation, texts without shingles (all ones) included."""
    rnd = random.Random(num_perm)
    owner = np.sort(np.array([rnd.randrange(0, 60) for _ in range(5000)], np.int64))  # some of 0..63 own none
    hashes = np.array([rnd.getrandbits(32) for _ in owner], np.uint32)
    mhr = MinHasher(num_perm, seed=5)
    got = mhr.signatures(hashes, owner, 64)
    want = without_native(monkeypatch, mhr.signatures, hashes, owner, 64)
    assert got.shape == want.shape == (64, num_perm) and np.array_equal(got, want)
    assert (got[63] == 0xFFFFFFFF).all()


@needs_native
def test_kernels_refuse_arrays_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.ngram_hashes(np.zeros(3, np.uint64), np.array([5], np.int64), 2, np.zeros(9, np.uint64),
                               np.zeros(9, np.int64))  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.char_shingles(np.zeros(3, np.uint32), np.array([3], np.int64), np.zeros(1, np.uint64),
                                np.zeros(1, np.uint64), 2, np.zeros(1, np.uint64))  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.minhash(np.zeros(3, np.uint32), np.array([0, 4], np.int64), np.ones(4, np.uint32),
                          np.ones(4, np.uint32), np.zeros(4, np.uint32))  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.band_keys(np.zeros((2, 8), np.uint32), 3, 3, None, np.zeros((2, 3), np.uint64))  # 9 > 8 values
    one, off, turn = np.zeros(3, np.uint32), np.array([0, 3], np.int64), np.array([4], np.int64)  # 4 > 3 values
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.pair_jaccard(one, off, turn, np.array([0, 1], np.int64), one, off, np.array([3], np.int64),
                               np.array([0, 1], np.int64), np.zeros(1))  # fmt: skip


@needs_native
@pytest.mark.parametrize("near_on", ["both", "answer"])
def test_clean_writes_the_same_files_without_the_kernels(tmp_path, monkeypatch, near_on):
    """The shapes corpus (math, code, chat, multi-turn; planted exact and near copies) and its repetitive records."""
    recs, _ = planted(distinct_corpus(random.Random(0)), random.Random(0))
    recs += [{"id": f"r{k}", "messages": [{"role": "user", "content": f"Say it {k}"},
                                           {"role": "assistant", "content": "the same words again " * 30}]}
             for k in range(3)]  # fmt: skip
    src = write(tmp_path / "in.jsonl", recs)
    outs = []
    for label in ("native", "numpy"):
        if label == "numpy":
            monkeypatch.setattr(mh, "native", None)
        d = tmp_path / label
        d.mkdir()
        run(CleanConfig(inputs=[src], out=d / "clean.jsonl", removed=d / "removed.jsonl", near_on=near_on,
                        chunk_size=64))  # fmt: skip
        outs.append(((d / "clean.jsonl").read_bytes(), (d / "removed.jsonl").read_bytes()))
    assert outs[0] == outs[1]
    assert b'"near_dup"' in outs[0][1] and b'"repetition"' in outs[0][1]


@needs_native
def test_similarities_equal_the_numpy_code(monkeypatch):
    """The exact check's Jaccard of aligned turns, as merges of sorted runs, against the numpy searchsorted."""
    from imitate.clean.dedup import NearDup

    rnd = random.Random(9)
    nd = NearDup()
    recs = [[t] for t in turns(rnd, 200)] + [[t, u] for t, u in zip(turns(rnd, 100), turns(rnd, 100))]
    sets = nd.turn_sets(recs)
    pairs = [(rnd.choice(sets), rnd.choice(sets)) for _ in range(3000)] + [(s, s) for s in sets[:50]]
    got = NearDup.similarities(pairs)
    want = without_native(monkeypatch, NearDup.similarities, pairs)
    assert np.array_equal(got, want) and (got[-50:] == 1.0).all() and 0 < (got > 0.5).sum() < len(got)


@needs_native
def test_words_equal_the_numpy_code(monkeypatch):
    """Word hashes, counts and byte lengths (the repetition filter's input): ASCII, accents, curly quotes, emoji,
    texts without words, case changes that alter byte lengths."""
    rnd = random.Random(4)
    alphabet = "ab_9 ,.\n'’" + "ÇİẞǄ" + "漢" + "\U0001f600"
    texts = ["", "   ", "x", "Hello, World! snake_case 42x"]
    texts += ["".join(rnd.choices(alphabet, k=rnd.randint(0, 120))) for _ in range(400)]
    for with_lengths in (False, True):
        got = mh.word_tokens(texts, lengths=with_lengths)
        want = without_native(monkeypatch, lambda: mh.word_tokens(texts, lengths=with_lengths))
        assert len(got) == len(want) and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, want))
    assert np.array_equal(mh.word_counts(texts), without_native(monkeypatch, mh.word_counts, texts))
    assert mh.word_counts([]).tolist() == [] and mh.word_tokens([])[0].tolist() == []


@needs_native
@pytest.mark.parametrize("with_guards", [False, True])
def test_band_keys_and_sketches_equal_the_numpy_code(monkeypatch, with_guards):
    """The map step's whole output for near-dedup: records of one and several turns, short and empty turns."""
    from imitate.clean.dedup import NearDup

    rnd = random.Random(11)
    nd = NearDup(num_perm=128, threshold=0.8)
    recs = [[t] for t in turns(rnd, 150)] + [[t, u, ""] for t, u in zip(turns(rnd, 60), turns(rnd, 60))]
    guards = np.array([rnd.getrandbits(64) for _ in recs], np.uint64) if with_guards else None
    got = nd.keys_and_sketch(recs, guards)
    want = without_native(monkeypatch, nd.keys_and_sketch, recs, guards)
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, want))
    assert got[0].shape == (len(recs), nd.bands)


@needs_native
def test_signatures_read_the_high_halves_of_64_bit_hashes(monkeypatch):
    rnd = random.Random(12)
    h = np.array([rnd.getrandbits(64) for _ in range(3000)], np.uint64)
    starts = np.array([0, 0, 5, 1000, 1000, 2999, 3000], np.int64)
    mhr = MinHasher(64, seed=2)
    got = mhr.signatures_at(h, starts)
    assert np.array_equal(got, mhr.signatures_at((h >> np.uint64(32)).astype(np.uint32), starts))
    assert np.array_equal(got, without_native(monkeypatch, mhr.signatures_at, h, starts))


@needs_native
def test_packed_similarities_equal_the_sorted_turn_sets():
    """The exact check from unsorted values and hash tables (C) against sorted distinct sets (numpy): the same
    floats, repeated n-grams, short and empty turns and records of other turn counts included."""
    from imitate.clean.dedup import NearDup

    rnd = random.Random(13)
    nd = NearDup()
    recs = [[t] for t in turns(rnd, 150)] + [[t, u] for t, u in zip(turns(rnd, 80), turns(rnd, 80))]
    recs += [["abcabcabcabcabc" * k] for k in range(1, 4)] + [["", "x"], ["", "y"], [""]]
    sets, packed = nd.turn_sets(recs), nd.packed(recs)
    ij = [(rnd.randrange(len(recs)), rnd.randrange(len(recs))) for _ in range(4000)] + [(i, i) for i in range(40)]
    ij += [(len(recs) - 3, len(recs) - 2), (len(recs) - 1, len(recs) - 1)]
    got = NearDup.packed_similarities([(packed[i], packed[j]) for i, j in ij])
    want = NearDup.similarities([(sets[i], sets[j]) for i, j in ij])
    assert np.array_equal(got, want) and (got[-42:-2] == 1.0).all() and got[-1] == 1.0
    assert NearDup.packed_similarities([]).shape == (0,)


def test_ascii_normal_form_equals_normalize():
    """keys.normalize on ASCII texts -- case, every str.split whitespace (\\x1c-\\x1f too), every line break
    (\\r\\n as one), indentation, blank lines -- and None for the texts it leaves to Python."""
    if mh.native is None:
        pytest.skip("the C kernels are not built here")
    from imitate.clean.keys import normalize

    rnd = random.Random(14)
    alphabet = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1fabcXYZ09.,_-"
    texts = ["".join(rnd.choices(alphabet, k=rnd.randint(0, 30))) for _ in range(20000)]
    texts += ["", "A\r\nB", "\r\n\r\n", "  x  \n   y\t z  ", "def f():\n    return 1\n", "x" * 10000]
    got = mh.native.normalize_ascii(texts + ["é", "x²", "Ｈｉ"])
    assert got[-3:] == [None, None, None]
    assert got[:-3] == [normalize(t) for t in texts]


@needs_native
@pytest.mark.parametrize("stop_below", [0.0, 0.1])
def test_repetition_statistics_equal_the_numpy_code(monkeypatch, stop_below):
    """Gopher's statistics of texts from a small vocabulary (n-grams repeat at every n), of repeated lines and
    paragraphs, of texts shorter than every n, with and without the early stop."""
    from imitate.clean.repetition import repetition_stats_batch

    rnd = random.Random(15)
    vocab = ["the", "cat", "sat", "on", "mat", "über", "naïve", "x1", "a_b", "42"]
    texts = [" ".join(rnd.choices(vocab[: rnd.randint(2, 10)], k=rnd.randint(0, 120))) for _ in range(400)]
    texts += ["one line\n" * 5, "para one\n\npara one\n\npara two", "", "a", "a b", "a b c d e f g h i j"]
    got = repetition_stats_batch(texts, stop_below=stop_below)
    want = without_native(monkeypatch, lambda: repetition_stats_batch(texts, stop_below=stop_below))
    assert got.keys() == want.keys()
    for name in got:
        assert np.array_equal(got[name], want[name]), name
    assert (got["top_2gram_frac"] > 0.2).sum() > 50 and (got["dup_10gram_char_frac"] > 0).sum() > 10


@needs_native
def test_phrase_search_finds_the_regex_match():
    """The refusal phrases' trie searched in C against the trie regex: the same leftmost match, start and end, on
    texts built from the phrases' prefixes with every kind of whitespace (and non-space) between their words."""
    from imitate.clean.filters import DEFAULT_REFUSALS, load_refusals

    patterns, trie = load_refusals([DEFAULT_REFUSALS])
    lines = DEFAULT_REFUSALS.read_text(encoding="utf-8").splitlines()
    phrases = [x.lower().split() for x in lines if x.strip() and not x.startswith(("#", "re:"))]
    rnd = random.Random(16)
    seps = [" ", "  ", "\n", "\t", "\x1c", "\x1f", " \r\n ", "\x0b", "", "x", "'", "."]

    def piece() -> str:
        words = rnd.choice(phrases)
        words = words[: rnd.randint(1, len(words))] if rnd.random() < 0.7 else words
        return "".join(w + rnd.choice(seps) for w in words)

    texts = ["".join(rnd.choice(["", "has ", "xi", "a", " "]) + piece() for _ in range(rnd.randint(1, 4)))
             for _ in range(20000)] + ["", "i", "as a", "I cannot help with".lower(), "naïve i cannot help with"]  # fmt: skip
    hits = np.empty((len(texts), 2), np.int64)
    mh.native.phrase_search(texts, *trie, hits)
    want = [(m.start(), m.end()) if (m := patterns[0].search(t)) else (-1, -1) for t in texts[:-1]]
    assert [tuple(h) for h in hits.tolist()[:-1]] == want and hits[-1].tolist() == [-2, -2]
    assert sum(a >= 0 for a, _ in want) > 5000


@pytest.mark.parametrize("native", [True, False])
def test_refusal_batch_equals_refusal(tmp_path, monkeypatch, native):
    """The filter's batch twin against the per-record filter: ASCII and not, curly apostrophes, phrases and `re:`
    lines, a pattern file with a non-ASCII phrase (no C trie then)."""
    import functools

    from imitate.clean.filters import build_filters, refusal, refusal_batch
    from imitate.clean.stage import CleanConfig

    if not native:
        monkeypatch.setattr(mh, "native", None)
    extra = tmp_path / "more.txt"
    extra.write_text("ça ne marche pas\nre:trained by \\w+ corp\n", encoding="utf-8")
    answers = ["Sure, here it is.", "I’m sorry, but I can’t do that.", "As an AI language model, I...",
               "I was trained by Acme corp.", "Ça ne marche pas.", "naïve: i cannot help with that",
               "My name is Claude.", "I'm just an AI, so I can't", "Nothing\n\n here", ""]  # fmt: skip
    recs = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]} for a in answers]
    for files in ([], [extra]):
        cfg = CleanConfig(inputs=[tmp_path / "x.jsonl"], out=tmp_path / "out.jsonl", refusals=files)
        pred = build_filters(cfg)["refusal"]
        assert isinstance(pred, functools.partial) and pred.func is refusal
        assert (pred.keywords["trie"] is None) == bool(files)  # a non-ASCII phrase: the regex only
        got = refusal_batch(recs, **pred.keywords)
        assert got == [pred(r) for r in recs]
        assert sum(g is not None for g in got) == (7 if files else 5), got


@needs_native
@pytest.mark.parametrize("max_pairs", [0, 2, 5, 50])
def test_candidate_edges_equal_the_numpy_code(monkeypatch, max_pairs):
    """Buckets of every size (keys from a small range), stars past max_pairs, one band and many; buckets all past
    max_pairs (the numpy code failed there before: no small bucket to size its loop)."""
    from imitate.clean.dedup import candidate_edges

    rng = np.random.default_rng(max_pairs)
    for keys in (rng.integers(0, 300, (2000, 7)).astype(np.uint64), rng.integers(0, 40, 500).astype(np.uint64),
                 rng.integers(0, 2**63, (1000, 3)).astype(np.uint64)):  # fmt: skip
        got = candidate_edges(keys, max_pairs)
        want = without_native(monkeypatch, candidate_edges, keys, max_pairs)
        assert got.dtype == want.dtype == np.int64 and np.array_equal(got, want)


def test_edges_the_review_found(monkeypatch, tmp_path):
    """n-grams past the C window (64) fall back to numpy; no records, no keys; texts without a word; --bands past
    --num-perm is refused; hashes of another dtype are refused."""
    from imitate.clean.dedup import NearDup
    from imitate.errors import UsageError

    sh = Shingler(70)
    got = sh.hashes(["x" * 100, "short"], np.array([0, 1]))
    want = without_native(monkeypatch, sh.hashes, ["x" * 100, "short"], np.array([0, 1]))
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and got[1].tolist() == [31, 1]
    keys, sketch = NearDup().keys_and_sketch([], np.zeros(0, np.uint64))
    assert keys.shape == (0, NearDup().bands) and sketch.shape == (0, 128)
    for fn in (lambda: mh.word_tokens(["?", "", "!!"], lengths=True), lambda: mh.word_counts(["?"])):
        got, want = fn(), without_native(monkeypatch, fn)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)) if isinstance(got, tuple) else np.array_equal(got, want)
    with pytest.raises(UsageError, match="--bands 32 is more than --num-perm 16"):
        CleanConfig(inputs=[tmp_path / "x.jsonl"], out=tmp_path / "o.jsonl", num_perm=16, bands=32).check()
    with pytest.raises(TypeError, match="uint32 or uint64"):
        MinHasher(8).signatures_at(np.zeros(4, np.int64), np.array([0, 4]))


@needs_native
def test_kernels_refuse_lengths_that_would_overflow():
    """Lengths near 2^63 must not wrap the bounds checks into a pass (they would read far outside the arrays)."""
    big = 2**63 - 1
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.ngram_hashes(np.zeros(4, np.uint64), np.array([1, big], np.int64), 1, np.empty(8, np.uint64),
                               np.empty(8, np.int64))  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.char_shingles(np.zeros(4, np.uint32), np.array([1, big], np.int64), np.zeros(2, np.uint64),
                                np.zeros(2, np.uint64), 2, np.empty(8, np.uint64))  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.words(b"ab cd", np.array([1, big], np.int64), mh._WORD_BYTE_U8, np.empty(2, np.int64), None, None)
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.repetition(np.zeros(4, np.uint64), np.array([1, big], np.int64), np.zeros(4, np.int64), 0.0,
                             np.empty(6), np.empty(12))  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.band_keys(np.zeros((1, 4), np.uint32), 2, 2**62, None, np.empty((1, 2), np.uint64))
    quarter = np.array([2**62] * 4, np.int64)  # four turns whose lengths sum to 0 mod 2^64
    with pytest.raises(ValueError, match="do not fit"):
        mh.native.pair_jaccard(np.zeros(4, np.uint32), np.array([0, 0], np.int64), quarter, np.array([0, 4], np.int64),
                               np.zeros(4, np.uint32), np.array([0, 0], np.int64), quarter, np.array([0, 4], np.int64),
                               np.zeros(1))  # fmt: skip
