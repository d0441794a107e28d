"""Cross-tokenizer alignment: a teacher whose tokenizer is not the student's, matched to the student by TEXT.

Both tokenizations of the same answer are laid over its UTF-8 bytes. Where both have a token starting at the same
byte offset (a SHARED BOUNDARY), both models predict the next token from the same text, so the teacher's next-token
distribution can grade the student's there; positions without a shared boundary (a student token starting inside a
teacher token) get CE only. Bytes, not characters: byte-level BPE (GPT-2's `Ġ` alphabet) and SentencePiece's byte
fallback (`<0xE2>`) both split one emoji or CJK character over several tokens, and those pieces line up as bytes.

Leading space: a token that carries whitespace in front of the answer (SentencePiece's `▁` dummy prefix, a template's
" " between role and content, byte-level `Ġ`) counts as starting where the answer's text does, so `▁March` and
`ĠMarch` and `March` all start at offset 0 of "March 7".

Projection of a teacher token onto the student's vocabulary (`Projector`), in this order:
1. at a shared boundary, the teacher's own next token (the one its tokenization of the answer has there) counts for
   the student's own next token: both are prefixes of the same continuation, and the student token that continuation
   begins with is the student's token there (so identical tokenizers give the identity map, and the student's label
   always receives the teacher's mass on the text that follows);
2. a teacher token whose bytes are exactly a student token's (the same text) counts for that token;
3. any other text counts for the LONGEST student token its bytes begin with (GOLD-style merging: the mass of
   " help", " hello" and " hel" lands on the student's " hel" when that is the longest student prefix);
4. special tokens: the teacher's end-of-turn token counts for the student's; a special token the student has under
   the same name counts for it; others (and text the student cannot spell) are UNMATCHED.
The KD term then compares the merged distributions (see xtok_loss.py: KL over matched student tokens plus a rest
bucket, and ULD's sorted-probability distance over the unmatched mass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from imitate.train.data import IGNORE

COVERAGE_FLOOR = 0.5  # below this share of answer tokens with a teacher distribution, `imitate train` warns


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as in a byte-level BPE vocabulary
    (printable Latin-1 bytes stand for themselves, the other 68 bytes take the code points from 256 on)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in out.values():
            out[chr(256 + extra)] = b
            extra += 1
    return out


def _decoder_types(tokenizer: Any) -> set[str]:
    """The types of the fast tokenizer's decoder (and of the decoders of a Sequence decoder)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    stack, kinds = [json.loads(backend.to_str()).get("decoder")], set()
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            kinds.add(d.get("type"))
            stack += d.get("decoders") or []
    return kinds


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The UTF-8 bytes each token id stands for (index = id, len(tokenizer) entries); None for special tokens.

    Byte-level vocabularies are read through GPT-2's alphabet; SentencePiece-style ones turn `▁` into a space and
    `<0xAB>` byte-fallback pieces into that byte; other vocabularies (character-level, word-level) are decoded one
    token at a time."""
    kinds = _decoder_types(tokenizer)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    specials |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if t.special}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_level = "ByteLevel" in kinds
    table = _byte_decoder() if byte_level else {}
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in specials or piece is None:
            out.append(None)
        elif byte_level and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif "▁" in piece or "Metaspace" in kinds:
            out.append(piece.replace("▁", " ").encode("utf-8"))
        else:
            out.append(tokenizer.convert_tokens_to_string([piece]).encode("utf-8"))
    return out


_TABLES: dict[int, tuple[Any, list[bytes | None]]] = {}


def cached_token_bytes(tokenizer: Any) -> list[bytes | None]:
    """`token_bytes`, computed once per tokenizer object (a 150k vocabulary takes a second or two)."""
    hit = _TABLES.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = _TABLES[id(tokenizer)] = (tokenizer, token_bytes(tokenizer))
    return hit[1]


def end_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's end-of-turn ids: its eos token (the chat templates' end marker in every model we load)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if eos is not None else []


# ---------------------------------------------------------------------------------------------------------------------
# boundaries
# ---------------------------------------------------------------------------------------------------------------------


def answer_starts(pieces: list[bytes | None], text: bytes) -> tuple[list[int | None], bool]:
    """Where each token of an answer starts in `text` (the answer's bytes without leading whitespace).

    pieces: the bytes of the tokens covering the answer, in order (None = a special token: the pieces end there).
    The tokens may carry text in front of the answer (a template's separator, a dummy-prefix space): the smallest
    lead for which the rest of the joined pieces is a prefix of `text` is skipped; a token reaching over the lead
    starts at 0, tokens wholly in front get None. Returns (starts, complete: the pieces spell the whole text).
    A truncated answer (cut by --max-length) is a prefix of `text`; pieces that do not spell a prefix give all None.
    """
    if None in pieces:
        pieces = pieces[: pieces.index(None)]
    joined = b"".join(pieces)  # type: ignore[arg-type]
    lead = next((k for k in range(len(joined) + 1) if text.startswith(joined[k:])), None)
    if lead is None or lead == len(joined) and text:
        return [None] * len(pieces), False
    starts: list[int | None] = []
    pos = -lead
    for p in pieces:
        end = pos + len(p)  # type: ignore[arg-type]
        starts.append(max(pos, 0) if end > 0 and p else None)
        pos = end
    return starts, joined[lead:] == text


def shared_boundaries(s_starts: list[int | None], t_starts: list[int | None]) -> list[tuple[int, int]]:
    """(student token k, teacher token m) pairs whose tokens start at the same byte offset of the answer."""
    first: dict[int, int] = {}
    for m, o in enumerate(t_starts):
        if o is not None and o not in first:
            first[o] = m
    seen: set[int] = set()
    out = []
    for k, o in enumerate(s_starts):
        if o is not None and o in first and o not in seen:
            seen.add(o)
            out.append((k, first[o]))
    return out


def final_run(labels: list[int]) -> list[int]:
    """Label positions of the last contiguous run of targets (the final assistant turn), in order."""
    t = len(labels) - 1
    while t >= 0 and labels[t] == IGNORE:
        t -= 1
    run = []
    while t >= 0 and labels[t] != IGNORE:
        run.append(t)
        t -= 1
    return run[::-1]


def answer_targets(labels: list[int], end: list[int]) -> int:
    """Target tokens of the final assistant turn up to and including its end-of-turn token: what a teacher could
    grade (the text a template writes after the end token is no teacher's). The denominator of the coverage."""
    run = final_run(labels)
    k = next((i for i, p in enumerate(run) if labels[p] in end), len(run) - 1)
    return k + 1


def answer_text(messages: list[dict]) -> bytes:
    """The final assistant turn's bytes without leading whitespace: the text both tokenizations are laid over."""
    last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    return last.lstrip().encode("utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# projection of teacher tokens onto the student's vocabulary
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Projector:
    """Maps teacher tokens (bytes, or a special token's name) to student ids; see the module doc for the rules."""

    student: Any  # the student's tokenizer
    table: list[bytes | None] = field(init=False)
    by_bytes: dict[bytes, int] = field(init=False)
    specials: dict[str, int] = field(init=False)
    longest: int = field(init=False)
    end: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.table = cached_token_bytes(self.student)
        self.by_bytes = {}
        for i, b in enumerate(self.table):
            if b:
                self.by_bytes.setdefault(b, i)
        names = self.student.convert_ids_to_tokens(list(range(len(self.student))))
        self.specials = {names[i]: i for i, b in enumerate(self.table) if b is None and names[i] is not None}
        self.longest = max((len(b) for b in self.by_bytes), default=1)
        self.end = end_ids(self.student)

    def text(self, data: bytes) -> int | None:
        """Rules 2 and 3: the student token with exactly these bytes, else the longest one they begin with."""
        if data in self.by_bytes:
            return self.by_bytes[data]
        for n in range(min(len(data), self.longest), 0, -1):
            if data[:n] in self.by_bytes:
                return self.by_bytes[data[:n]]
        return None

    def special(self, name: str | None, is_end: bool) -> int | None:
        """Rule 4: the teacher's end token -> the student's; a special token the student has by name -> it."""
        if is_end and self.end:
            return self.end[0]
        return self.specials.get(name) if name else None

    def teacher_map(self, teacher: Any) -> list[int]:
        """Student id (or -1: unmatched) for every teacher id, rules 2-4 (rule 1 depends on the position)."""
        t_table = cached_token_bytes(teacher)
        t_names = teacher.convert_ids_to_tokens(list(range(len(teacher))))
        t_end = set(end_ids(teacher))
        out = []
        for i, b in enumerate(t_table):
            s = self.text(b) if b else self.special(t_names[i], i in t_end)
            out.append(-1 if s is None else s)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# gray-box: collected log-probs (token strings / bytes) -> top-K rows over student ids
# ---------------------------------------------------------------------------------------------------------------------


def entry_bytes(entry: dict) -> bytes | None:
    """The text of one collected log-prob entry: its `bytes` (OpenAI, hf teachers) when given, else its token
    string as UTF-8; None for an entry without either."""
    raw = entry.get("bytes")
    if isinstance(raw, list) and raw:
        return bytes(raw)
    token = entry.get("token")
    return token.encode("utf-8") if isinstance(token, str) and token else None


def graybox_rows(logprobs: list[dict], labels: list[int], proj: Projector) -> tuple[dict[int, list[tuple[int, float]]], dict[str, int]]:
    """Align a record's collected `logprobs` with the student's tokens by text.

    labels: the example's shifted labels. The teacher's text is the concatenation of its entries'
    bytes; the student's answer tokens (final run, up to its end token) are laid over it. At each shared boundary
    the teacher's entry becomes a row over student ids: the sampled token counts for the student's token there
    (rule 1), each `top` alternative for the student token its text begins with (rules 2-3); alternatives with the
    sampled token's text are the same token and are not counted twice; mass merged onto one student id is summed.
    Returns ({label position: [(student id, log p), ...] sorted by p}, counts {"aligned", "unaligned",
    "unmapped_top"}) — `aligned` + `unaligned` = the answer's target tokens (end marker and template tail included).
    """
    import math

    run = final_run(labels)
    s_pieces = [proj.table[labels[p]] if labels[p] not in proj.end else None for p in run]
    t_pieces = [entry_bytes(e) or b"" for e in logprobs]
    text = b"".join(t_pieces)
    stripped = text.lstrip()
    t_starts, _ = answer_starts(t_pieces, stripped)
    s_starts, _ = answer_starts(s_pieces, stripped)
    rows: dict[int, list[tuple[int, float]]] = {}
    unmapped = 0
    for k, m in shared_boundaries(s_starts, t_starts):
        entry = logprobs[m]
        pos, s_star = run[k], labels[run[k]]
        sampled = t_pieces[m]
        mass: dict[int, float] = {s_star: math.exp(min(float(entry["logprob"]), 0.0))}
        for alt in entry.get("top") or []:
            data = entry_bytes(alt)
            if data == sampled:
                continue
            s = proj.text(data) if data else proj.special(alt.get("token"), False)
            if s is None:
                unmapped += 1
                continue
            mass[s] = mass.get(s, 0.0) + math.exp(min(float(alt["logprob"]), 0.0))
        rows[pos] = sorted(((s, math.log(min(p, 1.0))) for s, p in mass.items() if p > 0), key=lambda kv: -kv[1])
    counts = {"aligned": len(rows), "unaligned": len(run) - len(rows), "unmapped_top": unmapped}
    return rows, counts


# ---------------------------------------------------------------------------------------------------------------------
# white-box: the teacher's own tokenization of the conversation, and the pairs of positions it grades
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TeacherView:
    """One example as the teacher reads it: its ids and the (student label position, teacher label position,
    student target id, teacher target id) of every shared boundary of the answer, the end boundary included."""

    input_ids: list[int]
    pairs: list[tuple[int, int, int, int]]


def teacher_view(messages: list[dict], ex: Any, teacher: Any, t_table: list[bytes | None],
                 s_table: list[bytes | None], s_end: list[int], max_length: int) -> TeacherView:
    """Tokenize the conversation the teacher saw (`records.teacher_messages`) with the teacher's tokenizer and chat
    template, and pair its answer positions with the student example's by text."""
    from imitate.train.data import encode, shift_targets

    t_ids, mask = encode(teacher, messages)
    t_ids, mask = t_ids[:max_length], mask[:max_length]
    t_labels = shift_targets(t_ids, mask)
    t_run, s_run = final_run(t_labels), final_run(ex.labels)
    t_end = set(end_ids(teacher))
    text = answer_text(messages)
    t_pieces = [t_table[t_labels[p]] if t_labels[p] not in t_end else None for p in t_run]
    s_pieces = [s_table[ex.labels[p]] if ex.labels[p] not in s_end else None for p in s_run]
    t_starts, t_done = answer_starts(t_pieces, text)
    s_starts, s_done = answer_starts(s_pieces, text)
    pairs = [(s_run[k], t_run[m], ex.labels[s_run[k]], t_labels[t_run[m]])
             for k, m in shared_boundaries(s_starts, t_starts)]
    # the end boundary: both answers complete and followed by their end-of-turn tokens
    if t_done and s_done and None in t_pieces and None in s_pieces:
        k, m = s_pieces.index(None), t_pieces.index(None)
        if ex.labels[s_run[k]] in s_end and t_labels[t_run[m]] in t_end:
            pairs.append((s_run[k], t_run[m], ex.labels[s_run[k]], t_labels[t_run[m]]))
    return TeacherView(t_ids, pairs)


@dataclass
class WhiteBox:
    """The cross-tokenizer part of a white-box plan (`distill.Plan.xtok`): settled from tokenizers, no weights."""

    tokenizer: Any  # the teacher's, with its own chat template (the student's when it has none)
    vocab_size: int  # the teacher's real vocabulary: its logits are cut to it
    why: str  # how the two tokenizers differ (vocab.check_tokenizers' message)
    t_map: Any = None  # [V_t] int64: student id of each teacher id, -1 unmatched (Projector.teacher_map)
    report: dict = field(default_factory=dict)  # coverage (see coverage_report) and the template note


def prepare_whitebox(examples: list, student: Any, plan: WhiteBox, max_length: int) -> dict:
    """Give every example its `TeacherView` (from `Example.messages`, the conversation the teacher saw, which is
    dropped here) and build the teacher -> student map. Returns the coverage report."""
    import torch

    proj = Projector(student)
    plan.t_map = torch.tensor(proj.teacher_map(plan.tokenizer), dtype=torch.long)
    t_table = cached_token_bytes(plan.tokenizer)
    taught, targets, where = [], [], []
    for ex in examples:
        ex.teacher_view = teacher_view(ex.messages, ex, plan.tokenizer, t_table, proj.table, proj.end, max_length)
        ex.messages = None
        taught.append(len(ex.teacher_view.pairs))
        targets.append(answer_targets(ex.labels, proj.end))
        where.append(ex.where)
    report = coverage_report(taught, targets, where)
    report["matched_teacher_tokens"] = int((plan.t_map >= 0).sum())
    report["teacher_tokens"] = int(plan.t_map.numel())
    return {**plan.report, **report}


def batch_tensors(examples: list, batch: dict, pad_id: int) -> dict:
    """The teacher's micro-batch (its own tokens, right-padded) and the paired positions, for `xtok_loss.xtok_kd_loss`:
    xtok_input_ids / xtok_attention_mask [B, L_t]; xtok_s_index / xtok_t_index [N] flat indices into the student's
    [rows × L] and the teacher's [B × L_t] positions; xtok_s_star / xtok_t_star [N] their targets. The student's
    batch may be padded or one packed row (`data.collate`)."""
    import torch

    views = [getattr(ex, "teacher_view", None) for ex in examples]
    width = max((len(v.input_ids) for v in views if v is not None), default=1)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    s_len = batch["input_ids"].shape[1]
    packed = "position_ids" in batch and "attention_mask" not in batch
    s_idx, t_idx, s_star, t_star = [], [], [], []
    offset = 0
    for r, (ex, v) in enumerate(zip(examples, views)):
        base = offset if packed else r * s_len
        offset += len(ex.input_ids)
        if v is None or not v.pairs:
            continue
        ids[r, : len(v.input_ids)] = torch.tensor(v.input_ids)
        mask[r, : len(v.input_ids)] = 1
        for sp, tp, ss, ts in v.pairs:
            s_idx.append(base + sp)
            t_idx.append(r * width + tp)
            s_star.append(ss)
            t_star.append(ts)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return {"xtok_input_ids": ids, "xtok_attention_mask": mask, "xtok_s_index": as_long(s_idx),
            "xtok_t_index": as_long(t_idx), "xtok_s_star": as_long(s_star), "xtok_t_star": as_long(t_star)}


def coverage_report(taught: list[int], targets: list[int], where: list[str]) -> dict:
    """Share of answer tokens (`answer_targets`: through the end-of-turn token) that receive a teacher distribution:
    overall, and per record (the spread and the lowest few records)."""
    total, got = sum(targets), sum(taught)
    per = sorted((t / n if n else 0.0, w) for t, n, w in zip(taught, targets, where))
    shares = [s for s, _ in per]
    out: dict[str, Any] = {"coverage": got / total if total else 0.0, "taught_tokens": got, "answer_tokens": total,
                           "records": len(per)}
    if per:
        out["per_record"] = {"min": shares[0], "median": shares[len(shares) // 2], "max": shares[-1],
                             "lowest": [f"{w} ({s:.0%})" for s, w in per[:3]]}
    return out


def low_coverage(report: dict, floor: float = COVERAGE_FLOOR) -> str | None:
    """The warning for a run whose teacher grades less than `floor` of the answer tokens, or None."""
    cov = report.get("coverage")
    if cov is None or not report.get("answer_tokens") or cov >= floor:
        return None
    return (f"the teacher's distribution covers only {cov:.0%} of the answer tokens (floor {floor:.0%}): the two "
            "tokenizers split the answers too differently for their token boundaries to meet, so most answer tokens "
            f"train on CE only (lowest: {', '.join(report.get('per_record', {}).get('lowest', []))})")
