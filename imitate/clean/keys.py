"""What dedup compares: the normal form of a text, a record's turns, and the content guard of its prompt.

Normal form (`normalize`): Unicode NFKC, case folded, whitespace folded -- and nothing else. Digits and punctuation
are content: "23 plus 74" and "24 plus 73", `x + 1` and `x - 1`, are different texts. Two deliberate limits:
  - NFKC leaves alone the characters it would turn into digits that were not digits before (superscripts,
    fractions, circled numbers: "x²" must not become "x2"); full-width and other decimal digits do fold ("１２" = "12").
  - Whitespace: runs of spaces and tabs inside a line become one space, trailing spaces and blank lines go, line
    breaks stay, and so does each line's leading indentation (it is syntax in Python and YAML).

Content guard (`prompt_guard`): near-duplicates are records that ask the same thing. Whatever a shingle similarity
says, two records whose prompts differ in a number (digits, with the operators between them; number words; numeral
characters of other scripts), in a code-like identifier (snake_case, camelCase) or in any code span or fenced code
block are never near-duplicates. The guard is a hash of those tokens, in order, plus the turn roles; near-dedup only
compares records with equal guards.
"""

from __future__ import annotations

import re
import unicodedata

from imitate.clean import minhash
from imitate.clean.minhash import exact_key, stable_hash64
from imitate.records import prompt_messages

# --- normal form -------------------------------------------------------------------------------------------------


def _scan_bmp() -> tuple[str, str]:
    """(characters NFKC would turn into digits that are not digits, numeral characters that are not \\d)."""
    protect, numeral = [], []
    ranges = [range(0x80, 0x10000), range(0x1F100, 0x1F110)]
    for c in (chr(i) for r in ranges for i in r):
        if unicodedata.numeric(c, None) is not None and not c.isdecimal():
            numeral.append(c)
            if any(d.isdecimal() for d in unicodedata.normalize("NFKC", c)):
                protect.append(c)
    return "".join(protect), "".join(numeral)


_PROTECT_CHARS, _NUMERAL_CHARS = _scan_bmp()
_PROTECT_RE = re.compile(f"([{re.escape(_PROTECT_CHARS)}])")


def nfkc(text: str) -> str:
    """NFKC, except for characters it would turn into digits (x² stays x², not x2)."""
    if text.isascii():
        return text
    if not _PROTECT_RE.search(text):
        return unicodedata.normalize("NFKC", text)
    parts = _PROTECT_RE.split(text)  # odd positions: the protected characters themselves
    return "".join(p if k % 2 else unicodedata.normalize("NFKC", p) for k, p in enumerate(parts))


_LINE_BREAK = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")  # what str.splitlines splits on


def normalize(text: str) -> str:
    """The normal form both dedups compare: NFKC (digit-making characters kept), case folded, whitespace folded
    (leading indentation of each line kept). Digits and punctuation are never touched."""
    text = nfkc(text).casefold()
    if text.isascii():  # (a substring test per ASCII line break is ~4x quicker than the regex's search)
        one_line = not ("\n" in text or "\r" in text or "\v" in text or "\f" in text or "\x1c" in text
                        or "\x1d" in text or "\x1e" in text)
    else:
        one_line = not _LINE_BREAK.search(text)
    if one_line:  # one line (most answers): the same result as below, 3x faster
        return " ".join(text.split())
    out = []
    for line in text.strip().splitlines():
        body = line.split()
        if body:
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + " ".join(body))
    return "\n".join(out)


def normalized_messages(record: dict) -> list[tuple[str, str]]:
    """(role, normalized content) of every message: computed once per record, shared by every dedup key."""
    return [(str(m.get("role")), normalize(m.get("content") or "")) for m in record.get("messages") or []]


def split_turns(norm: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str]:
    """(the turns before the final answer, the final answer) -- as `records.prompt_messages` and `assistant_text`."""
    end = len(norm) - 1 if norm and norm[-1][0] == "assistant" else len(norm)
    return norm[:end], next((c for r, c in reversed(norm) if r == "assistant"), "")


def conversation_text(norm: list[tuple[str, str]]) -> str:
    """Normalized turns, role-tagged, as one string: the text of an exact-duplicate key."""
    return "\x1e".join(f"{role}\x1f{content}" for role, content in norm)


# --- what near-dedup compares ------------------------------------------------------------------------------------

NEAR_ON = ("both", "prompt", "answer")


Turns = list[tuple[str, str]]  # (role, normalized content)


def near_turns(record: dict, on: str = "both", norm: Turns | None = None) -> tuple[list[str], list[str]]:
    """(roles, normalized contents) of the turns near-dedup compares: "both" = every turn of the conversation,
    "prompt" = the turns before the final answer, "answer" = the final answer. System turns are left out: one system
    prompt usually serves a whole collect run and says nothing about whether two records are alike.
    norm: the record's `normalized_messages`, if already at hand."""
    prompt, answer = split_turns(normalized_messages(record) if norm is None else norm)
    turns = [(r, c) for r, c in prompt if r != "system"]
    if on != "prompt":
        turns = [("assistant", answer)] if on == "answer" else turns + [("assistant", answer)]
    turns = turns or [("", "")]  # a record always has a turn to compare (an empty one: matches only empty ones)
    return [r for r, _ in turns], [c for _, c in turns]


_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "billion trillion dozen half twice thrice"
).split()
_NUM = rf"[\d{re.escape(_NUMERAL_CHARS)}]+"
_FIRST = "".join(sorted({w[0] for w in _NUMBER_WORDS}))
_GUARD_RE = re.compile(
    r"```.*?(?:```|\Z)"  # a fenced code block, whole
    r"|`[^`\n]+`"  # an inline code span, whole
    rf"|{_NUM}(?:\s*[-+*/×÷^=<>%.,:]\s*{_NUM})*"  # a number, or numbers with the operators between them
    rf"|(?i:\b(?=[{_FIRST}])(?:{'|'.join(_NUMBER_WORDS)})\b)"  # a number word (the look-ahead on first letters
    # skips trying the 40 words at most positions: the guard takes ~30% less time, same matches)
    r"|\b\w*_\w*\b"  # snake_case (any word with an underscore)
    r"|\b\w*[a-z][A-Z]\w*\b",  # camelCase (read before case folding)
    re.S,
)
_GUARD_WORDS = re.compile(rf"\b(?:{'|'.join(_NUMBER_WORDS)})\b", re.I)


def guard_tokens(text: str) -> list[str]:
    """The tokens of a prompt that must be equal for two records to be near-duplicates (see the module docstring)."""
    out = []
    for m in _GUARD_RE.finditer(nfkc(text)):
        tok = m.group(0)
        if tok[0] == "`":
            tok = normalize(tok)
        elif _GUARD_WORDS.fullmatch(tok) or tok[0].isdigit() or tok[0] in _NUMERAL_CHARS:
            tok = "".join(tok.split()).casefold()
        out.append(tok)  # identifiers keep their case: parseDate and parsedate are different names
    return out


def prompt_guard(record: dict, roles: list[str]) -> str:
    """The guard string of a record: the roles of its compared turns, then the guard tokens of its prompt turns
    (system turns left out, as in `near_turns`)."""
    prompt = [m for m in prompt_messages(record) if m.get("role") != "system"]
    toks = [t for m in prompt for t in guard_tokens(m.get("content") or "")]
    return "\x1e".join(roles) + "\x1d" + "\x1f".join(toks)


# --- every key's text of a chunk's records, prompts computed once -------------------------------------------------


class RecordTexts:
    """What the dedup keys read from each record -- the exact key's text, the prompt key, near-dedup's turns and
    guard -- with everything that comes from the prompt (the turns before the final answer) computed once per
    distinct prompt: prompts repeat (n answers per prompt, templates, one system prompt for a run). The same values
    as `conversation_text`, `split_turns`, `near_turns` and `prompt_guard` give; one instance per chunk."""

    def __init__(self, on: str = "both", prompt_key: bool = False, near: bool = True):
        self.on, self.want_prompt, self.want_near = on, prompt_key, near
        self.memo: dict[tuple, tuple[str, int, list[str], int]] = {}

    def many(self, records: list[dict]) -> list[tuple[str, int, list[str], int]]:
        """`[self(r) for r in records]`, with the ASCII answers normalized in one call of the C kernel."""
        if minhash.native is None:
            return [self(r) for r in records]
        answers = []
        for r in records:
            msgs = r.get("messages") or []
            last = msgs[-1] if msgs else None
            answers.append((last.get("content") or "") if last is not None and last.get("role") == "assistant" else "")
        return [self(r, a) for r, a in zip(records, minhash.native.normalize_ascii(answers))]

    def __call__(self, record: dict, answer: str | None = None) -> tuple[str, int, list[str], int]:
        """(text of the exact key, prompt key (0 unless asked for), near-dedup turns, guard hash (0 unless near)).
        answer: the final answer's normal form, when the caller has it."""
        msgs = record.get("messages") or []
        if not msgs or msgs[-1].get("role") != "assistant":  # no final answer (kept with --keep-failed)
            return self._texts(record, normalized_messages(record))
        if answer is None:
            answer = normalize(msgs[-1].get("content") or "")
        key = tuple((m.get("role"), m.get("content") or "") for m in msgs[:-1])
        got = self.memo.get(key)
        if got is None:  # the record's prompt with an empty answer: the answer's slot is the last turn
            stand_in = {"messages": [*msgs[:-1], {"role": "assistant", "content": ""}]}
            conv, pkey, turns, guard = self._texts(stand_in, normalized_messages(stand_in))
            got = self.memo[key] = (conv, pkey, turns[:-1] if self.on != "prompt" else turns, guard)
        head, pkey, turns, guard = got
        return head + answer, pkey, turns + [answer] if self.on != "prompt" else turns, guard

    def _texts(self, record: dict, norm: Turns) -> tuple[str, int, list[str], int]:
        pkey = exact_key(conversation_text(split_turns(norm)[0])) if self.want_prompt else 0
        roles, turns = near_turns(record, self.on, norm)
        guard = stable_hash64(prompt_guard(record, roles)) if self.want_near else 0
        return conversation_text(norm), pkey, turns, guard
