"""The repetition filter: Gopher's repetition statistics of an answer, vectorized over many records at once.

The thresholds are those of Gopher (Rae et al. 2021, "Scaling Language Models", Table A1), applied to the answer:
  duplicated lines > 30% of lines or > 20% of line characters; the same for paragraphs (blank-line separated);
  the most frequent 2-, 3-, 4-gram covering > 20%, 18%, 16% of word characters;
  characters inside repeated 5..10-grams (every occurrence after the first) > 15, 14, 13, 12, 11, 10%.
Answers with fewer than `repetition_min_words` words are not checked: these ratios are noise on a few sentences.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from imitate.clean import minhash
from imitate.clean.minhash import ngram_hashes, word_counts, word_tokens
from imitate.records import assistant_text

_ALNUM = re.compile(r"\w")


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier item, fraction of characters in them)."""
    seen: set[str] = set()
    n_dup = chars_dup = chars = 0
    for it in items:
        chars += len(it)
        if it in seen:
            n_dup += 1
            chars_dup += len(it)
        seen.add(it)
    return n_dup / max(1, len(items)), chars_dup / max(1, chars)


def _groups(h: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group equal n-grams of the same text: (order, first index in `order` of each group, group sizes)."""
    key = h ^ (owner.astype(np.uint64) * _GROUP_MUL)
    order = np.argsort(key)  # not stable (2x faster): callers find first occurrences with a min per group
    ks = key[order]
    new = np.ones(len(ks), bool)
    new[1:] = ks[1:] != ks[:-1]
    first = np.flatnonzero(new)
    return order, first, np.diff(np.append(first, len(ks)))


_GROUP_MUL = np.uint64(0xD6E8FEB86659FD93)


def repetition_stats_batch(texts: list[str], *, stop_below: float = 0.0) -> dict[str, np.ndarray]:
    """Gopher repetition statistics of many texts at once, each a [len(texts)] float array (see the module doc).

    top_{n}gram_frac: characters covered by the most frequent repeated n-gram (ties: the longer one), / word characters.
    dup_{n}gram_char_frac: word characters inside any occurrence, after the first, of a repeated n-gram.
    Repeated (n+1)-grams lie inside repeated n-grams, so these fractions only fall with n: texts whose fraction is
    below `stop_below` skip the larger n (reported as 0)."""
    k = len(texts)
    stats: dict[str, np.ndarray] = {name: np.zeros(k) for name in _REP_NAMES}
    for i, text in enumerate(texts):
        if "\n" not in text:  # one line, one paragraph: nothing repeats (the statistics stay 0)
            continue
        lines = [ln.strip() for ln in text.split("\n") if _ALNUM.search(ln)]
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if _ALNUM.search(p)]
        stats["dup_line_frac"][i], stats["dup_line_char_frac"][i] = _dup_fraction(lines)
        stats["dup_para_frac"][i], stats["dup_para_char_frac"][i] = _dup_fraction(paras)
    tokens, lengths, wlen = word_tokens(texts, lengths=True)  # words as in dedup: numpy over the UTF-8 bytes
    stats["words"] = lengths
    if minhash.native is not None:  # the same statistics, a hash table per text and n
        top, dup = np.empty((3, k)), np.empty((6, k))
        minhash.native.repetition(tokens, lengths, wlen, float(stop_below), top, dup)
        for j, n in enumerate((2, 3, 4)):
            stats[f"top_{n}gram_frac"] = top[j]
        for j, n in enumerate(range(5, 11)):
            stats[f"dup_{n}gram_char_frac"] = dup[j]
        return stats
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    seg = np.repeat(np.arange(k), lengths)
    total = np.maximum(np.bincount(seg, weights=wlen, minlength=k), 1)
    csum = np.concatenate(([0], np.cumsum(wlen)))
    for n in (2, 3, 4):
        h, owner, pos = ngram_hashes(tokens, lengths, n)
        order, first, size = _groups(h, owner)
        rep = size > 1
        g = order[first[rep]]  # one occurrence of each repeated n-gram
        chars = (csum[pos[g] + n] - csum[pos[g]]) * size[rep]
        score = size[rep].astype(np.int64) * (1 << 40) + chars  # most frequent first, then most characters
        best = np.zeros(k, np.int64)
        np.maximum.at(best, owner[g], score)
        stats[f"top_{n}gram_frac"] = (best & ((1 << 40) - 1)) / total
    active = np.arange(k)
    for n in range(5, 11):
        if not len(active):
            break
        sub_tokens, sub_wlen, sub_lengths = _select(tokens, wlen, starts, lengths, active)
        h, owner, pos = ngram_hashes(sub_tokens, sub_lengths, n)
        order, first, size = _groups(h, owner)
        pos_sorted = pos[order]
        first_pos = np.minimum.reduceat(pos_sorted, first) if len(first) else first
        p = pos_sorted[pos_sorted != np.repeat(first_pos, size)]  # every occurrence after the first
        edge = np.bincount(p, minlength=len(sub_tokens) + 1) - np.bincount(p + n, minlength=len(sub_tokens) + 1)
        covered = np.cumsum(edge[:-1]) > 0
        sub_seg = np.repeat(np.arange(len(active)), sub_lengths)
        frac = np.bincount(sub_seg, weights=sub_wlen * covered, minlength=len(active)) / total[active]
        stats[f"dup_{n}gram_char_frac"][active] = frac
        active = active[frac >= stop_below] if stop_below > 0 else active
    return stats


def _select(tokens, wlen, starts, lengths, which: np.ndarray):
    """The flat arrays restricted to the segments in `which`."""
    if len(which) == len(starts):
        return tokens, wlen, lengths
    idx = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in which]).astype(np.int64)
    return tokens[idx], wlen[idx], lengths[which]


_REP_NAMES = (
    "dup_line_frac", "dup_line_char_frac", "dup_para_frac", "dup_para_char_frac",
    "top_2gram_frac", "top_3gram_frac", "top_4gram_frac",
    *(f"dup_{n}gram_char_frac" for n in range(5, 11)),
)  # fmt: skip


def repetition_stats(text: str) -> dict[str, float]:
    """Gopher repetition statistics of one text (all of them, no early stop), and its word count."""
    return {name: float(v[0]) for name, v in repetition_stats_batch([text]).items()}


def repetition_batch(
    records: list[dict],
    *,
    min_words: int,
    max_dup_line_frac: float,
    max_dup_line_char_frac: float,
    max_top_ngram_frac: tuple[float, ...],
    max_dup_ngram_frac: tuple[float, ...],
) -> list[str | None]:
    """The repetition filter over many records at once (numpy over all their n-grams together)."""
    limits = {
        "dup_line_frac": max_dup_line_frac,
        "dup_para_frac": max_dup_line_frac,
        "dup_line_char_frac": max_dup_line_char_frac,
        "dup_para_char_frac": max_dup_line_char_frac,
    }
    limits.update({f"top_{n}gram_frac": t for n, t in zip((2, 3, 4), max_top_ngram_frac)})
    limits.update({f"dup_{n}gram_char_frac": t for n, t in zip(range(5, 11), max_dup_ngram_frac)})
    texts = [assistant_text(r) for r in records]
    long = np.flatnonzero(word_counts(texts) >= min_words).tolist()  # only these are checked: only these are read
    stats = repetition_stats_batch([texts[i] for i in long], stop_below=min(max_dup_ngram_frac, default=0.0))
    out: list[str | None] = [None] * len(records)
    names = list(limits)
    over = np.stack([stats[name] > limits[name] for name in names]) if long else np.zeros((len(names), 0), bool)
    for j in np.flatnonzero(over.any(axis=0)).tolist():  # (a text's statistics do not depend on the other texts)
        name = names[int(np.argmax(over[:, j]))]  # the first limit it passes, in the order above
        out[long[j]] = f"{name}={float(stats[name][j]):.2f} > {limits[name]:g}"
    return out


def repetition(record: dict, **limits: Any) -> str | None:
    """Gopher repetition filter on the answer; `limits` as in `repetition_batch`."""
    return repetition_batch([record], **limits)[0]
