"""Pure scoring of an answer against accepted references (`imitate eval --match`) and ROUGE-L; no model, no I/O.

Match modes: exact (equal after `normalize`), contains (the normalised reference inside the normalised answer), regex
(the reference searched in the raw answer). imitate.evaluate documents what is scored against what.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

MATCH_MODES = ("exact", "contains", "regex")


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed and trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _exact(answer: str, ref: str) -> bool:
    return normalize(answer) == normalize(ref)


def _contains(answer: str, ref: str) -> bool:
    return normalize(ref) in normalize(answer)


def _regex(answer: str, ref: str) -> bool:
    return re.search(ref, answer) is not None


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 over words: the longest common subsequence of the two word lists (normalised, punctuation
    split off), 2PR / (P + R). 1.0 for equal texts, 0.0 when no word is shared; two empty texts score 1.0."""
    a, b = _WORD.findall(normalize(answer)), _WORD.findall(normalize(reference))
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:  # one row of the LCS table at a time: O(len(b)) memory
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


_WORD = re.compile(r"\w+|[^\w\s]")


MATCHERS: dict[str, Callable[[str, str], bool]] = {"exact": _exact, "contains": _contains, "regex": _regex}


def score(answer: str, references: list[str], match: str) -> int:
    """1 when the answer matches any accepted reference under `match`, else 0."""
    fn = MATCHERS[match]
    return int(any(fn(answer, r) for r in references))
