"""Quality filters: pure predicates `record -> reason | None` (None keeps the record), in a dict of names.

`build_filters(cfg)` binds each predicate's thresholds from the clean config and returns them cheap-first; filters
that are switched off are left out. A record is removed by the first filter that returns a reason.

The repetition filter (Gopher's thresholds) lives in repetition.py.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from imitate.clean import minhash
from imitate.clean.minhash import WORD_RE, ngram_hashes, word_tokens
from imitate.clean.repetition import repetition, repetition_batch
from imitate.errors import InputError
from imitate.records import assistant_text, content_text, iter_jsonl, prompt_messages
from imitate.resources import data_file

Predicate = Callable[[dict], "str | None"]

DEFAULT_REFUSALS = data_file("refusals.txt")  # the repository's data/refusals.txt
TRUNCATED_REASONS = ("length", "max_tokens", "max_output_tokens")


def _words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def _role_text(record: dict, role: str) -> str:
    """'assistant' is the final answer, 'prompt' everything before it, other roles all turns of that role."""
    if role == "assistant":
        return assistant_text(record)
    msgs = prompt_messages(record)
    if role == "prompt":
        return "\n".join(m.get("content") or "" for m in msgs)
    return "\n".join(m.get("content") or "" for m in msgs if m.get("role") == role)


# --- failed, truncated ------------------------------------------------------------------------------------------------


def failed(record: dict) -> str | None:
    """A request that errored, has no assistant turn, or whose answer is empty."""
    err = record.get("error")
    if err:
        return f"error: {str(err)[:120]}"
    msgs = record.get("messages") or []
    if not msgs or msgs[-1].get("role") != "assistant":
        return "no assistant answer"
    if not (msgs[-1].get("content") or "").strip():
        return "empty answer"
    return None


def truncated(record: dict) -> str | None:
    """The teacher stopped at its token limit, so the answer is cut off."""
    reason = record.get("finish_reason")
    return f"finish_reason={reason}" if reason in TRUNCATED_REASONS else None


# --- length -----------------------------------------------------------------------------------------------------------


def length(record: dict, *, bounds: dict[str, tuple[int | None, int | None, str]]) -> str | None:
    """bounds: role -> (min, max, unit 'chars'|'words'); see `_role_text` for the roles."""
    for key, (lo, hi, unit) in bounds.items():
        role = key.split(":")[0]
        text = _role_text(record, role)
        size = len(text) if unit == "chars" else len(_words(text))
        if lo is not None and size < lo:
            return f"{role} has {size} {unit} < {lo}"
        if hi is not None and size > hi:
            return f"{role} has {size} {unit} > {hi}"
    return None


def ratio(record: dict, *, min_ratio: float | None, max_ratio: float | None) -> str | None:
    """Answer words per prompt word (prompt = every turn before the answer; at least 1 word)."""
    r = len(_words(assistant_text(record))) / max(1, len(_words(_role_text(record, "prompt"))))
    if min_ratio is not None and r < min_ratio:
        return f"answer/prompt words {r:.3g} < {min_ratio:g}"
    if max_ratio is not None and r > max_ratio:
        return f"answer/prompt words {r:.3g} > {max_ratio:g}"
    return None


# --- refusals ---------------------------------------------------------------------------------------------------------


def load_patterns(paths: Iterable[Path]) -> list[re.Pattern]:
    """The phrases of the pattern files as one trie-shaped regex, then each `re:` regex (format: data/refusals.txt).

    Kept as separate patterns on purpose: `re` only skips ahead quickly when a pattern starts with a literal, and a
    combined alternation loses that (2x slower). Everything is matched against the lowercased answer."""
    return load_refusals(paths)[0]


def load_refusals(paths: Iterable[Path]) -> tuple[list[re.Pattern], tuple | None]:
    """`load_patterns`, and the phrase trie flattened for the C search (`phrase_trie`; None without phrases)."""
    parts: list[str] = []
    phrases: list[list[str]] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such refusal pattern file", hint="check --refusals")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start + 1})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("re:"):
                try:
                    re.compile(line[3:])
                except re.error as exc:
                    raise InputError(f"{path}:{lineno}: bad regular expression ({exc})") from None
                parts.append(f"(?:{line[3:]})")  # matched against the lowercased answer
            else:
                phrases.append(line.lower().split())
    if phrases:
        parts.insert(0, _trie_regex(phrases))
    # no IGNORECASE (3x slower in `re`): texts are lowercased instead
    return [re.compile(p) for p in parts], phrase_trie(phrases) if phrases else None


def phrase_trie(phrases: list[list[str]]) -> tuple | None:
    """The trie of `_trie_regex` as the arrays of the C search (imitate/clean/_native.c, phrase_search): per node
    its edges (from edge_start[i]), in the regex's order (sorted words), whether a phrase ends there; per edge its
    word (bytes from word_start[e]) and child node. None when a word is not ASCII (the regex searches then)."""
    if not all(w.isascii() for words in phrases for w in words):
        return None
    trie = _trie(phrases)
    nodes, edge_start, end, word_start, child, words_out = [trie], [0], [], [0], [], bytearray()
    i = 0
    while i < len(nodes):  # breadth first: every child is numbered after its parent
        node = nodes[i]
        end.append("" in node)
        for w in sorted(k for k in node if k):
            words_out += w.encode("ascii")
            word_start.append(len(words_out))
            child.append(len(nodes))
            nodes.append(node[w])
        edge_start.append(len(child))
        i += 1
    return (np.array(edge_start, np.int64), np.array(end, np.uint8), np.array(word_start, np.int64),
            np.array(child, np.int64), bytes(words_out))  # fmt: skip


def _trie(phrases: list[list[str]]) -> dict:
    """word -> subtrie; the key "" marks the end of a phrase."""
    trie: dict = {}
    for words in phrases:
        node = trie
        for w in words:
            node = node.setdefault(w, {})
        node[""] = {}
    return trie


def _trie_regex(phrases: list[list[str]]) -> str:
    """One regex for many phrases, factored by shared leading words ("i cannot help" | "i cannot assist" ->
    i\\s+cannot\\s+(?:assist|help)). A flat alternation of ~100 phrases costs ~1 ms per answer in `re`; the trie
    fails fast at each position and is ~30x quicker."""
    trie = _trie(phrases)

    def emit(node: dict) -> str:
        alts = []
        for w in sorted(k for k in node if k):
            child, piece = node[w], re.escape(w)
            if any(child):
                piece += r"(?:\s+" + emit(child) + ")" + ("?" if "" in child else "")
            alts.append(piece)
        return "(?:" + "|".join(alts) + ")"

    return emit(trie)


@functools.lru_cache(maxsize=256)
def required_run(pattern: re.Pattern) -> str | None:
    """Characters that every match of `pattern` contains in a row (its longest run of plain characters outside any
    group, alternative or repeat; 3 or more), or None: a substring test that skips the search where it would fail.
    `re` skips ahead quickly only to a literal a pattern starts with; "(?:trained|made) by ..." does not."""
    if pattern.flags & re.IGNORECASE:
        return None
    try:
        from re import _constants as c  # (sre_parse: the parser `re.compile` itself runs)
        from re import _parser

        items = list(_parser.parse(pattern.pattern, pattern.flags))
    except Exception:  # noqa: BLE001  (a private module: without it, every text is searched)
        return None
    while len(items) == 1 and items[0][0] is c.SUBPATTERN and not items[0][1][1] and not items[0][1][2]:
        items = list(items[0][1][3])  # a group around the whole pattern, without flags of its own
    best, run = "", ""
    for op, arg in items:
        run = run + chr(arg) if op is c.LITERAL else ""
        best = max(best, run, key=len)
    return best if len(best) >= 3 else None


def refusal(
    record: dict, *, patterns: list[re.Pattern], runs: list[str | None] | None = None, trie: tuple | None = None
) -> str | None:
    """runs: `required_run` of each pattern (build_filters computes them once: hashing a compiled pattern for the
    cache costs as much as a search). trie: for `refusal_batch` (patterns[0] as arrays)."""
    return _refusal_in(_refusal_text(record), patterns, runs or [required_run(p) for p in patterns])


def _refusal_text(record: dict) -> str:
    # curly apostrophes are folded here, once, so phrases and `re:` lines alike match "I’m" as "I'm"
    text = assistant_text(record).lower()
    return text if text.isascii() else text.replace("\u2019", "'")  # (isascii: a flag of the string, free)


def refusal_batch(
    records: list[dict], *, patterns: list[re.Pattern], runs: list[str | None] | None = None, trie: tuple | None = None
) -> list[str | None]:
    """`refusal` of many records: the phrase trie (patterns[0], given as `trie`) searched by the C kernel in the
    ASCII answers -- the same leftmost match as the regex -- and the regex everywhere else."""
    runs = runs or [required_run(p) for p in patterns]
    texts = [_refusal_text(r) for r in records]
    if trie is None or minhash.native is None:
        return [_refusal_in(t, patterns, runs) for t in texts]
    hits = np.empty((len(texts), 2), np.int64)
    minhash.native.phrase_search(texts, *trie, hits)
    out: list[str | None] = []
    for text, (a, b) in zip(texts, hits.tolist()):
        if a >= 0:
            out.append(f"matched {text[a:b]!r}")
        else:  # -1: no phrase, the `re:` patterns next; -2: not ASCII, the regex for all
            out.append(_refusal_in(text, patterns[1:], runs[1:]) if a == -1 else _refusal_in(text, patterns, runs))
    return out


def _refusal_in(text: str, patterns: list[re.Pattern], runs: list[str | None]) -> str | None:
    for pattern, run in zip(patterns, runs):
        if run is not None and run not in text:
            continue
        m = pattern.search(text)
        if m:
            return f"matched {m.group(0)!r}"
    return None


# --- language ---------------------------------------------------------------------------------------------------------


def language_detector() -> tuple[str, Callable[[str], str]] | None:
    """(name, text -> ISO 639-1 code) from a dependency-light detector if one is importable, else None."""
    try:
        import langid  # type: ignore[import-not-found]

        return "langid", lambda text: langid.classify(text)[0]
    except ImportError:
        pass
    try:
        import langdetect  # type: ignore[import-not-found]

        langdetect.DetectorFactory.seed = 0  # deterministic

        def detect(text: str) -> str:
            try:
                return langdetect.detect(text).split("-")[0]
            except Exception:  # noqa: BLE001  (LangDetectException on text without letters)
                return "unknown"

        return "langdetect", detect
    except ImportError:
        return None


def language(record: dict, *, detect: Callable[[str], str], allowed: frozenset[str]) -> str | None:
    text = assistant_text(record)
    if len(_words(text)) < 3:  # too short to tell
        return None
    lang = detect(text[:2000])
    return None if lang in allowed else f"language {lang}"


# --- decontamination --------------------------------------------------------------------------------------------------

EVAL_TEXT_FIELDS = (
    "prompt", "question", "input", "instruction", "query", "problem", "context",
    "answer", "answers", "reference", "references", "output", "target", "completion", "response", "solution",
)  # fmt: skip


def eval_texts(row: Any) -> list[str]:
    """The prompt and answer texts of one eval row: a record (`messages`), or a row with prompt/reference fields."""
    if not isinstance(row, dict):
        return [row] if isinstance(row, str) else []
    out: list[str] = []
    for m in row.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), (str, list)):
            out.append(content_text(m["content"]))
    for key in EVAL_TEXT_FIELDS:
        v = row.get(key)
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, str):
                out.append(x)
    return out


class EvalIndex:
    """Every word n-gram of the eval prompts and answers, as sorted 64-bit hashes with the eval row of each.

    Eval texts shorter than `ngram` words but at least `min_words` long count as one n-gram of their own length
    (so a short eval question still matches a record that quotes it); shorter ones are ignored (one-word answers
    like "Paris" would match everything)."""

    def __init__(self, paths: list[Path], ngram: int = 13, min_words: int = 8):
        self.ngram = ngram
        per_k: dict[int, list[tuple[np.ndarray, int]]] = {}
        self.rows: list[str] = []
        for path in paths:
            for line in iter_jsonl(path):
                row_id = len(self.rows)
                self.rows.append(f"{line.path.name}:{line.lineno}")
                for text in eval_texts(line.data):
                    tokens = self._tokens(text)
                    k = min(ngram, len(tokens))
                    if k < min(min_words, ngram):
                        continue
                    h = ngram_hashes(tokens, np.array([len(tokens)]), k)[0]
                    per_k.setdefault(k, []).append((h, row_id))
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k, parts in sorted(per_k.items()):
            h = np.concatenate([p[0] for p in parts])
            rid = np.concatenate([np.full(len(p[0]), p[1], np.int64) for p in parts])
            order = np.argsort(h, kind="stable")
            self.tables[k] = (h[order], rid[order])

    @staticmethod
    def _tokens(text: str) -> np.ndarray:
        return word_tokens([text])[0]

    def __len__(self) -> int:
        return sum(len(t[0]) for t in self.tables.values())

    def match(self, text: str) -> str | None:
        """The eval row (file:line) sharing an n-gram with `text`, or None."""
        tokens = self._tokens(text)
        for k, (table, rid) in self.tables.items():
            if len(tokens) < k:
                continue
            h = ngram_hashes(tokens, np.array([len(tokens)]), k)[0]
            pos = np.searchsorted(table, h).clip(0, len(table) - 1)
            hit = np.flatnonzero(table[pos] == h)
            if len(hit):
                return self.rows[int(rid[pos[hit[0]]])]
        return None


def contaminated(record: dict, *, index: EvalIndex) -> str | None:
    text = "\n".join(m.get("content") or "" for m in record.get("messages") or [])
    row = index.match(text)
    return f"shares a {index.ngram}-gram with eval row {row}" if row else None


# --- the dict of names ---

BATCH: dict[Callable, Callable] = {repetition: repetition_batch, refusal: refusal_batch}  # a many-records twin


def apply(predicate: Predicate, records: list[dict]) -> list[str | None]:
    """`[predicate(r) for r in records]`, through the vectorized twin when the predicate has one."""
    if isinstance(predicate, functools.partial) and predicate.func in BATCH:
        return BATCH[predicate.func](records, *predicate.args, **predicate.keywords)
    return [predicate(r) for r in records]


# -------------------------------------------------------------------------------------------------


def build_filters(cfg: Any, notes: list[str] | None = None) -> dict[str, Predicate]:
    """name -> predicate with the thresholds of `cfg` (a CleanConfig), cheap first; filters switched off are left out.
    `notes` collects what was skipped and why (e.g. no language detector)."""
    notes = notes if notes is not None else []
    out: dict[str, Predicate] = {}
    if cfg.drop_failed:
        out["failed"] = failed
    if cfg.drop_truncated:
        out["truncated"] = truncated
    bounds = {}
    for unit in ("chars", "words"):
        lows, highs = getattr(cfg, f"min_{unit}"), getattr(cfg, f"max_{unit}")
        for role in sorted(set(lows) | set(highs)):
            bounds[f"{role}:{unit}"] = (lows.get(role), highs.get(role), unit)
    if bounds:
        out["length"] = functools.partial(length, bounds=bounds)
    if cfg.min_ratio is not None or cfg.max_ratio is not None:
        out["ratio"] = functools.partial(ratio, min_ratio=cfg.min_ratio, max_ratio=cfg.max_ratio)
    if cfg.drop_refusals:
        files = ([DEFAULT_REFUSALS] if cfg.default_refusals else []) + list(cfg.refusals)
        patterns, trie = load_refusals(files)
        out["refusal"] = functools.partial(refusal, patterns=patterns, runs=[required_run(p) for p in patterns],
                                           trie=trie)  # fmt: skip
    if cfg.drop_repetitive:
        out["repetition"] = functools.partial(
            repetition,
            min_words=cfg.repetition_min_words,
            max_dup_line_frac=cfg.max_dup_line_frac,
            max_dup_line_char_frac=cfg.max_dup_line_char_frac,
            max_top_ngram_frac=tuple(cfg.max_top_ngram_frac),
            max_dup_ngram_frac=tuple(cfg.max_dup_ngram_frac),
        )
    if cfg.language:
        found = language_detector()
        if found is None:
            notes.append(
                "language filter skipped: no dependency-light detector importable (pip install langid or langdetect)"
            )
        else:
            name, detect = found
            notes.append(f"language filter uses {name}")
            out["language"] = functools.partial(language, detect=detect, allowed=frozenset(cfg.language))
    if cfg.decontaminate:
        index = EvalIndex(list(cfg.decontaminate), cfg.decontaminate_ngram, cfg.decontaminate_min_words)
        out["decontaminate"] = functools.partial(contaminated, index=index)
    return out
