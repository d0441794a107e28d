"""Exact and near-duplicate detection: signatures vs a naive loop, LSH parameters, components vs union-find,
planted clusters with the right survivor, short-text fallback."""

from __future__ import annotations

import random

import numpy as np
import pytest

from imitate.clean.dedup import (
    NearDup,
    candidate_edges,
    components,
    jaccard,
    optimal_bands,
    recall_bands,
    select,
)
from imitate.clean.keys import guard_tokens, nfkc, normalize
from imitate.clean.minhash import (
    MinHasher,
    Shingler,
    exact_key,
    ngram_hashes,
    word_counts,
    word_tokens,
)

WORDS = [f"w{i}" for i in range(3000)]


def doc(rnd: random.Random, n: int = 80) -> list[str]:
    return rnd.choices(WORDS, k=n)


def edit(words: list[str], rnd: random.Random, k: int) -> list[str]:
    words = list(words)
    for _ in range(k):
        words[rnd.randrange(len(words))] = rnd.choice(WORDS)
    return words


def test_normalize_folds_case_whitespace_and_unicode_forms_only():
    assert normalize("  Hello   WORLD \r\n\n  x =  1  ") == normalize("hello world\n  x = 1")
    assert normalize("ｆｕｌｌ ｗｉｄｔｈ １２") == "full width 12"  # NFKC
    assert normalize("STRASSE") == normalize("straße")  # case folding
    for a, b in [
        ("The answer is 7.", "The answer is 3."),  # digits are content
        ("x + 1", "x - 1"),  # so is punctuation
        ("x²", "x2"),  # NFKC would make these equal
        ("½", "1/2"),
        ("if a:\n    b\nc", "if a:\n    b\n    c"),  # indentation is syntax
    ]:
        assert normalize(a) != normalize(b), (a, b)
    assert exact_key(normalize("The answer is 7.")) != exact_key(normalize("The answer is 1."))


def test_normalize_one_line_fast_path_equals_the_line_by_line_form():
    rnd = random.Random(11)
    chars = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029\u00a0abcXYZ12ﬁ²ß"

    def by_lines(text: str) -> str:
        lines = nfkc(text).casefold().strip().splitlines()
        return "\n".join(ln[: len(ln) - len(ln.lstrip())] + " ".join(ln.split()) for ln in lines if ln.split())

    for _ in range(5000):
        t = "".join(rnd.choice(chars) for _ in range(rnd.randint(0, 12)))
        assert normalize(t) == by_lines(t), repr(t)


def test_guard_tokens_are_numbers_identifiers_and_code():
    toks = guard_tokens("Compute 3 + 4, then forty-two; call `parse_date` or parseDate, snake_case x_1 三百")
    assert toks == ["3+4", "forty", "two", "`parse_date`", "parseDate", "snake_case", "x_1", "三百"]
    assert guard_tokens("Fix:\n```py\nreturn x+1\n```") != guard_tokens("Fix:\n```py\nreturn x-1\n```")
    assert guard_tokens("Write a poem about the sea.") == guard_tokens("write a poem about the SEA!") == []


def test_ngram_hashes_stay_inside_segments():
    tokens = np.arange(1, 8, dtype=np.uint64)  # segments [1,2,3] [4,5] [6,7]
    _, owner, pos = ngram_hashes(tokens, np.array([3, 2, 2]), 2)
    assert owner.tolist() == [0, 0, 1, 2]
    assert pos.tolist() == [0, 1, 3, 5]
    _, owner3, _ = ngram_hashes(tokens, np.array([3, 2, 2]), 3)
    assert owner3.tolist() == [0]


def test_ngram_hashes_match_a_naive_loop():
    rnd = random.Random(7)
    lengths = np.array([rnd.randint(0, 9) for _ in range(40)], np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    tokens = np.array([rnd.randrange(1, 50) for _ in range(int(lengths.sum()))], np.uint64)
    for n in (1, 3, 5):
        h, owner, pos = ngram_hashes(tokens, lengths, n)
        ref = [(s, p) for s, (a, ln) in enumerate(zip(starts, lengths)) for p in range(a, a + ln - n + 1)]
        assert list(zip(owner.tolist(), pos.tolist())) == ref
        same = [tuple(tokens[p : p + n].tolist()) for _, p in ref]
        for i in range(len(ref)):  # equal n-grams <-> equal hashes
            for j in range(len(ref)):
                assert (h[i] == h[j]) == (same[i] == same[j])


def test_word_tokens_split_like_the_word_regex():
    texts = ["Hello, World! snake_case 42x", "", "   ", "hello WORLD", "x" * 300, "naïve café don’t"]
    tokens, counts = word_tokens(texts)
    assert counts.tolist() == [4, 0, 0, 2, 1, 3]
    assert tokens[:2].tolist() == tokens[4:6].tolist()  # "hello world" in both texts
    t2, _ = word_tokens(["hello"])
    assert t2[0] == tokens[0]  # stable: same word, same hash, whatever the batch


def test_word_counts_equal_word_tokens_counts():
    """The repetition filter picks the answers it reads with `word_counts`: it must count as `word_tokens` does,
    Unicode case changes that alter byte lengths included (İ -> i̇, ẞ -> ß, Ǆ -> ǆ)."""
    import re

    texts = ["Hello, World! snake_case 42x", "", "   ", "İstanbul ÇAĞ İİ", "ẞ STRASSE ǄEMAL", "naïve café don’t",
             "ﬁve ＯＮＥ ſix", "\n\n", "a", "tab\tsep-arated_words 1,000.5"]  # fmt: skip
    rnd = random.Random(0)
    texts += [" ".join(doc(rnd, rnd.randint(0, 60))) for _ in range(200)]
    assert word_counts(texts).tolist() == word_tokens(texts)[1].tolist()
    assert word_counts(texts[:3]).tolist() == [4, 0, 0] and word_counts([]).tolist() == []
    ascii_only = [t for t in texts if t.isascii()]
    assert word_counts(ascii_only).tolist() == [len(re.findall(r"[A-Za-z0-9_]+", t)) for t in ascii_only]


def records(texts: list[str]) -> list[list[str]]:
    return [[normalize(t)] for t in texts]


def test_signatures_equal_a_naive_loop():
    rnd = random.Random(1)
    texts = [" ".join(doc(rnd, rnd.randint(1, 30))) for _ in range(50)] + ["", "hi", "a b"]
    sh, mh = Shingler(), MinHasher(num_perm=32, seed=3)
    h, owner = sh.shingles(texts, np.zeros(len(texts), np.int64))
    assert set(owner.tolist()) == set(range(len(texts)))  # every text has at least one shingle
    h32 = (h >> np.uint64(32)).astype(np.uint32)
    sig = mh.signatures(h32, owner, len(texts))
    for i in range(len(texts)):
        mine = h32[owner == i]
        ref = [min((int(a) * int(x) + int(b)) % 2**32 for x in mine) for a, b in zip(mh.a, mh.b)]
        assert sig[i].tolist() == ref


def naive_char_jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t: str) -> set[str]:
        return {t[i : i + n] for i in range(len(t) - n + 1)} or {t}

    sa, sb = grams(a), grams(b)
    return len(sa & sb) / len(sa | sb)


def test_similarity_is_the_exact_char_ngram_jaccard_of_the_worst_turn():
    rnd = random.Random(6)
    nd = NearDup()
    for _ in range(30):
        base = [" ".join(doc(rnd, rnd.randint(1, 40))) for _ in range(rnd.randint(1, 3))]
        other = [" ".join(edit(t.split(), rnd, rnd.randint(0, 3))) for t in base]
        a, b = nd.turn_sets([[normalize(t) for t in base], [normalize(t) for t in other]])
        ref = min(naive_char_jaccard(normalize(x), normalize(y)) for x, y in zip(base, other))
        assert nd.similarity(a, b) == pytest.approx(ref, abs=1e-9)
    one, two = nd.turn_sets([["same"], ["same", "more"]])
    assert nd.similarity(one, two) == 0.0  # another number of turns: never alike


def test_jaccard_of_sorted_sets_matches_python_sets():
    rnd = random.Random(9)
    for _ in range(50):
        a = sorted(set(rnd.sample(range(100), rnd.randint(0, 30))))
        b = sorted(set(rnd.sample(range(100), rnd.randint(0, 30))))
        ref = len(set(a) & set(b)) / len(set(a) | set(b)) if a or b else 1.0
        assert jaccard(np.array(a, np.uint32), np.array(b, np.uint32)) == pytest.approx(ref)


def test_signature_agreement_estimates_jaccard():
    rnd = random.Random(2)
    nd = NearDup(num_perm=256, threshold=0.8)
    base = " ".join(doc(rnd, 200))
    for k in (0, 3, 10, 30):
        other = " ".join(edit(base.split(), rnd, k))
        sets = nd.turn_sets(records([base, other]))
        sig = nd.signatures(records([base, other]))
        est = float((sig[0] == sig[1]).mean())
        assert est == pytest.approx(nd.similarity(*sets), abs=0.1)


def test_optimal_bands_matches_datasketch_choice():
    # datasketch.lsh._optimal_param(0.8, 128, .5, .5) == (9, 13); (0.7, 128) -> (14, 9); (0.9, 64) -> (3, 21)
    assert optimal_bands(0.8, 128) == (9, 13)
    assert optimal_bands(0.7, 128) == (14, 9)
    assert optimal_bands(0.9, 64) == (3, 21)


@pytest.mark.parametrize("t", [0.5, 0.7, 0.8, 0.9, 0.95])
def test_recall_bands_catch_99_percent_at_the_threshold(t):
    b, r = recall_bands(t, 128)
    assert b * r <= 128 and 1 - (1 - t**r) ** b >= 0.99
    assert 1 - (1 - t ** (r + 1)) ** (128 // (r + 1)) < 0.99  # and no more rows would do
    assert recall_bands(0.8, 128) == (21, 6)


def naive_components(n: int, edges: list[tuple[int, int]], rank: list[int]) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for u, v in edges:
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv, key=lambda r: rank[r])] = min(ru, rv, key=lambda r: rank[r])
    return [find(i) for i in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_components_match_union_find(seed):
    rnd = random.Random(seed)
    n = 200
    edges = [(rnd.randrange(n), rnd.randrange(n)) for _ in range(150)]
    rank = list(range(n))
    rnd.shuffle(rank)
    got = components(n, np.array(edges, np.int64).reshape(-1, 2), np.array(rank))
    assert got.tolist() == naive_components(n, edges, rank)


def test_components_long_chain_and_no_edges():
    n = 1000
    chain = np.array([(i, i + 1) for i in range(n - 1)][::-1], np.int64)
    assert (components(n, chain) == 0).all()
    assert components(5, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2, 3, 4]


def test_candidate_edges_group_by_key():
    keys = np.array([[5, 1], [6, 2], [5, 3], [7, 2], [8, 9]], np.uint64)
    assert candidate_edges(keys).tolist() == [[0, 2], [1, 3]]
    many = np.array([1, 1, 1, 2], np.uint64)
    assert candidate_edges(many).tolist() == [[0, 1], [0, 2]]
    assert candidate_edges(many, max_pairs_bucket=10).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_select_never_chains():
    # A~B, B~C verified, A and C not alike: A kept, B removed as A's duplicate, C kept
    assert select(3, np.array([[0, 1], [1, 2]]), np.arange(3)).tolist() == [0, 0, 2]
    # B ranks first: B kept, A and C both its duplicates
    assert select(3, np.array([[0, 1], [1, 2]]), np.array([1, 0, 2])).tolist() == [1, 1, 1]
    # a removed record is never a survivor; the best-ranked kept neighbour is
    assert select(4, np.array([[0, 1], [1, 2], [0, 3], [2, 3]]), np.arange(4)).tolist() == [0, 0, 2, 0]
    assert select(2, np.zeros((0, 2), np.int64), np.arange(2)).tolist() == [0, 1]


def naive_select(n: int, edges: list[tuple[int, int]], rank: list[int]) -> list[int]:
    surv = list(range(n))
    for w in sorted(range(n), key=lambda i: rank[i]):
        nbrs = [b for a, b in edges if a == w] + [a for a, b in edges if b == w]
        kept = [b for b in nbrs if rank[b] < rank[w] and surv[b] == b]
        if kept:
            surv[w] = min(kept, key=lambda b: rank[b])
    return surv


@pytest.mark.parametrize("seed", range(5))
def test_select_matches_a_naive_greedy(seed):
    rnd = random.Random(seed)
    n = 60
    edges = list({tuple(sorted(rnd.sample(range(n), 2))) for _ in range(80)})
    rank = list(range(n))
    rnd.shuffle(rank)
    got = select(n, np.array(edges, np.int64).reshape(-1, 2), np.array(rank))
    assert got.tolist() == naive_select(n, edges, rank)


def near_survivors(nd: NearDup, texts: list[str], rank=None) -> np.ndarray:
    """LSH candidates, exact check, select: what `imitate clean` does, on one-turn records."""
    recs = records(texts)
    rank = np.arange(len(texts)) if rank is None else np.asarray(rank)
    edges = candidate_edges(nd.keys(recs), max_pairs_bucket=50)
    sets = nd.turn_sets(recs)
    keep = [nd.similarity(sets[u], sets[v]) >= nd.threshold for u, v in edges.tolist()]
    return select(len(texts), edges[np.asarray(keep, bool)] if len(edges) else edges, rank)


def test_planted_clusters_found_with_first_survivor():
    rnd = random.Random(3)
    nd = NearDup()
    texts, truth = [], []
    originals = [doc(rnd, 60) for _ in range(40)]
    for d in originals:
        texts.append(" ".join(d))
        truth.append(len(texts) - 1)
    for _ in range(60):  # near copies planted after their original: 1 substituted word of 60, Jaccard ~0.9
        j = rnd.randrange(40)
        texts.append(" ".join(edit(originals[j], rnd, 1)))
        truth.append(j)
    assert near_survivors(nd, texts).tolist() == truth


def test_unrelated_and_dissimilar_texts_are_not_clustered():
    rnd = random.Random(4)
    nd = NearDup()
    base = doc(rnd, 100)
    texts = [" ".join(base), " ".join(edit(base, rnd, 25))] + [" ".join(doc(rnd, 100)) for _ in range(50)]
    assert (near_survivors(nd, texts) == np.arange(len(texts))).all()


def test_priority_rank_picks_the_survivor():
    rnd = random.Random(5)
    nd = NearDup()
    base = doc(rnd, 100)
    texts = [" ".join(base), " ".join(edit(base, rnd, 1)), " ".join(edit(base, rnd, 1))]
    assert near_survivors(nd, texts, [2, 0, 1]).tolist() == [1, 1, 1]  # record 1 is the best


def test_one_word_edit_in_short_and_long_answers_reaches_the_threshold():
    nd = NearDup()
    a = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of cells."
    b = "Photosynthesis turns light, water and carbon dioxide into sugars and oxygen inside the chloroplasts of cells."
    c = "Respiration turns sugar and oxygen back into water, carbon dioxide and energy inside the mitochondria."
    assert nd.similarity(*nd.turn_sets(records([a, b]))) > 0.9
    assert near_survivors(nd, [a, b, c]).tolist() == [0, 0, 2]
    rnd = random.Random(8)
    for n_words in (20, 40, 80, 150):
        words = doc(rnd, n_words)
        other = list(words)
        other[n_words // 2] = "replaced"
        sim = nd.similarity(*nd.turn_sets(records([" ".join(words), " ".join(other)])))
        assert sim >= 0.8, (n_words, sim)


def test_very_short_texts_match_exactly():
    nd = NearDup()
    assert near_survivors(nd, ["Yes.", "yes.", "No.", "Yes!"]).tolist() == [0, 0, 2, 3]


def test_sketch_prefilter_keeps_alike_pairs_and_drops_far_ones():
    rnd = random.Random(10)
    nd = NearDup()
    base = [" ".join(doc(rnd, rnd.randint(20, 120))) for _ in range(60)]
    near = [" ".join(edit(t.split(), rnd, 1)) for t in base]
    far = [" ".join(edit(t.split(), rnd, len(t.split()) // 2)) for t in base]
    _, sk = nd.keys_and_sketch(records(base + near + far))
    sets = nd.turn_sets(records(base + near + far))
    n = len(base)
    alike = nd.plausible(sk[:n], sk[n : 2 * n])
    assert all(alike[i] for i in range(n) if nd.similarity(sets[i], sets[n + i]) >= 0.8)
    dropped = ~nd.plausible(sk[:n], sk[2 * n :])
    assert all(dropped[i] for i in range(n) if nd.similarity(sets[i], sets[2 * n + i]) < 0.5)
    assert dropped.sum() > n // 2
