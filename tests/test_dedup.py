"""Exact and near-duplicate detection: signatures vs a naive loop, LSH parameters, components vs union-find,
planted clusters with the right survivor, short-text fallback."""

from __future__ import annotations

import random

import numpy as np
import pytest

from imitate.clean.dedup import (
    MinHasher,
    NearDup,
    Shingler,
    candidate_edges,
    components,
    exact_key,
    jaccard,
    ngram_hashes,
    normalize,
    optimal_bands,
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


def test_normalize_folds_case_space_punctuation_digits():
    assert normalize("Hello,   WORLD!\n It's 42.") == normalize("hello world it s 17")
    assert exact_key("The answer is 7.") == exact_key("the ANSWER is: 3")
    assert exact_key("The answer is 7.") != exact_key("The answer is seven.")


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


def test_signatures_equal_a_naive_loop():
    rnd = random.Random(1)
    texts = [" ".join(doc(rnd, rnd.randint(1, 60))) for _ in range(50)] + ["", "hi", "a b"]
    sh, mh = Shingler(), MinHasher(num_perm=32, seed=3)
    h, owner = sh.shingles(texts)
    assert set(owner.tolist()) == set(range(len(texts)))  # every text has at least one shingle
    sig = mh.signatures(h, owner, len(texts))
    for i in range(len(texts)):
        mine = h[owner == i]
        ref = [min((int(a) * int(x) + int(b)) % 2**32 for x in mine) for a, b in zip(mh.a, mh.b)]
        assert sig[i].tolist() == ref


def test_signature_agreement_estimates_jaccard():
    rnd = random.Random(2)
    nd = NearDup(num_perm=256, threshold=0.8)
    base = doc(rnd, 200)
    for k in (0, 3, 10, 30):
        a, b = " ".join(base), " ".join(edit(base, rnd, k))
        sa, sb = nd.shingle_sets([a, b])
        sig = nd.signatures([a, b])
        est = float((sig[0] == sig[1]).mean())
        assert est == pytest.approx(jaccard(sa, sb), abs=0.1)


def test_optimal_bands_matches_datasketch_choice():
    # datasketch.lsh._optimal_param(0.8, 128, .5, .5) == (9, 13); (0.7, 128) -> (14, 9); (0.9, 64) -> (3, 21)
    assert optimal_bands(0.8, 128) == (9, 13)
    assert optimal_bands(0.7, 128) == (14, 9)
    assert optimal_bands(0.9, 64) == (3, 21)


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


def cluster(nd: NearDup, texts: list[str], rank=None) -> np.ndarray:
    return components(len(texts), candidate_edges(nd.keys(texts)), rank)


def test_planted_clusters_found_with_first_survivor():
    rnd = random.Random(3)
    nd = NearDup()
    texts, truth = [], []
    originals = [doc(rnd, 200) for _ in range(40)]
    for d in originals:
        texts.append(" ".join(d))
        truth.append(len(texts) - 1)
    # near copies planted after their original: 1 substituted word of 200, Jaccard ~0.95, where 9 bands x 13 rows
    # make a pair a candidate with probability 0.998 (at Jaccard 0.9 it would be 0.93: the LSH S-curve)
    for _ in range(60):
        j = rnd.randrange(40)
        texts.append(" ".join(edit(originals[j], rnd, 1)))
        truth.append(j)
    surv = cluster(nd, texts)
    assert surv.tolist() == truth


def test_unrelated_and_dissimilar_texts_are_not_clustered():
    rnd = random.Random(4)
    nd = NearDup()
    base = doc(rnd, 100)
    texts = [" ".join(base), " ".join(edit(base, rnd, 25))] + [" ".join(doc(rnd, 100)) for _ in range(50)]
    assert (cluster(nd, texts) == np.arange(len(texts))).all()


def test_priority_rank_picks_the_survivor():
    rnd = random.Random(5)
    nd = NearDup()
    base = doc(rnd, 100)
    texts = [" ".join(base), " ".join(edit(base, rnd, 1)), " ".join(edit(base, rnd, 1))]
    rank = np.array([2, 0, 1])  # record 1 is the best
    assert cluster(nd, texts, rank).tolist() == [1, 1, 1]


def test_one_sentence_answers_use_char_ngrams():
    nd = NearDup()
    a = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of cells."
    b = "Photosynthesis turns light, water and carbon dioxide into sugars and oxygen inside the chloroplasts of cells."
    c = "Respiration turns sugar and oxygen back into water, carbon dioxide and energy inside the mitochondria."
    assert jaccard(*nd.shingle_sets([a, b])) > 0.9  # character 5-grams: one changed letter costs little
    assert cluster(nd, [a, b, c]).tolist() == [0, 0, 2]
    # word 5-grams only: the one changed word kills 5 of 14 shingles (Jaccard 0.44) and the pair is missed
    words_only = NearDup(min_words=1)
    assert jaccard(*words_only.shingle_sets([a, b])) < 0.5
    assert cluster(words_only, [a, b, c]).tolist() == [0, 1, 2]


def test_very_short_texts_match_exactly():
    nd = NearDup()
    assert cluster(nd, ["Yes.", "yes", "No.", "Yes!"]).tolist() == [0, 0, 2, 0]
