"""Teacher/student vocabulary: the same-tokenizer check, the real vocab size behind padded embeddings, and the alignment
of collected top-K log-probabilities with a tokenized example.

White-box KD compares the two models' distributions id by id, so both must use the same tokenizer. `check_tokenizers`
runs on tokenizers only, before any weights load (cheap things first). Output heads are often padded past the tokenizer
(to a multiple of 64 or 128 rows for speed); those rows are not tokens, so logits are cut to `real_vocab_size`, never
zero-padded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imitate.errors import ImitateError
from imitate.train.data import IGNORE

if TYPE_CHECKING:  # pragma: no cover
    import torch

BLACK_BOX_HINT = (
    "white-box KD needs the teacher's tokenizer to be the student's; distill black-box instead: "
    "`imitate collect --teacher hf:TEACHER` to write its answers as records, then `imitate train` on them without --teacher"
)

# A fixed sample encoded by both tokenizers: letters, digits, punctuation, unicode, whitespace runs, special-looking text.
SAMPLE_TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Write 347 in words: three hundred forty-seven. 3.14159 + 2 = 5.14159",
    "  leading spaces\tand\ttabs\nnew lines\n\n",
    "naïve café, Straße, 日本語のテキスト, emoji 🙂, ∑ x² dx",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code",
    "<|user|> not a special token when typed as text? </s> <s>",
)


def _special_tokens(tok: Any) -> dict[str, Any]:
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    out: dict[str, Any] = {n: getattr(tok, n, None) for n in names}
    # no pad token means imitate's default, the end-of-sequence token (student.load_tokenizer sets it on the student
    # before this check; a teacher's tokenizer is compared as loaded): padding is masked, never a target or a text
    out["pad_token"] = out["pad_token"] or out["eos_token"]
    out["all_special"] = sorted((str(t), tok.convert_tokens_to_ids(t)) for t in getattr(tok, "all_special_tokens", []))
    return out


def check_tokenizers(student_tok: Any, teacher_tok: Any, *, teacher: str = "the teacher") -> None:
    """Raise ImitateError unless the two tokenizers map text to the same ids.

    Compares the vocabularies (token -> id, added tokens included), the special tokens, and the encodings of a fixed
    sample of texts (which also catches different normalisers or pre-tokenizers over an identical vocabulary).
    Call with tokenizers only, before loading any weights.
    """
    problems = []
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s, only_t = len(s_vocab.keys() - t_vocab.keys()), len(t_vocab.keys() - s_vocab.keys())
        moved = sum(1 for k in s_vocab.keys() & t_vocab.keys() if s_vocab[k] != t_vocab[k])
        problems.append(
            f"vocabularies differ (student {len(s_vocab)} tokens, teacher {len(t_vocab)}; "
            f"{only_s} only in the student, {only_t} only in the teacher, {moved} with different ids)"
        )
    s_special, t_special = _special_tokens(student_tok), _special_tokens(teacher_tok)
    if s_special != t_special:
        diff = [k for k in s_special if s_special[k] != t_special[k]]
        problems.append(f"special tokens differ ({', '.join(diff)})")
    for text in SAMPLE_TEXTS:
        if student_tok.encode(text, add_special_tokens=False) != teacher_tok.encode(text, add_special_tokens=False):
            problems.append(f"they encode {text[:30]!r} differently")
            break
    if problems:
        raise ImitateError(
            f"{teacher} does not share the student's tokenizer: " + "; ".join(problems), hint=BLACK_BOX_HINT
        )


def real_vocab_size(tokenizer: Any, student_width: int, teacher_width: int) -> int:
    """The number of real token ids: len(tokenizer). Both output heads must have at least that many rows.

    Rows past it are embedding padding (no token maps there) and are cut from the logits. A head narrower than the
    tokenizer cannot score every token: refuse rather than pad.
    """
    n = len(tokenizer)
    for who, width in (("student", student_width), ("teacher", teacher_width)):
        if width < n:
            raise ImitateError(
                f"the {who}'s output head has {width} rows but the tokenizer has {n} tokens",
                hint="the checkpoint and its tokenizer do not belong together; check the model directory",
            )
    return n


def _token_id(entry: dict, tokenizer: Any, vocab: dict[str, int]) -> int | None:
    """Student id of one logprob entry: its `id` when given, else its token string as a vocab piece or as exactly one
    token of text; None when it cannot be mapped."""
    if entry.get("id") is not None:
        return int(entry["id"])
    token = entry.get("token")
    if not isinstance(token, str):
        return None
    if token in vocab:
        return vocab[token]
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def align_logprobs(
    logprobs: list[dict], labels: torch.Tensor, tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Turn a record's `logprobs` (see imitate.records) into top-K tensors aligned with `labels`.

    labels: [L] int64, the example's targets in the alignment the loss uses (for `sparse_topk_kd`: aligned with the
    hidden states, as `data.shift_targets` makes them); -100 = no target. The record's tokens are matched in order to the
    target tokens; row p of the result holds the teacher's distribution for the token `labels[p]`: the sampled token and
    its `top` alternatives (deduplicated), ids mapped through `_token_id`.
    Matching stops at the first generated token that cannot be mapped or differs from the target (the teacher's text
    re-tokenized differently); the rest of the answer then trains on CE only. Unmappable `top` entries are dropped
    (their mass lands in the rest bucket of `sparse_topk_divergence`).
    Returns (ids [L, K] int64 with -1 = empty, logprobs [L, K] float32, counts {"aligned", "unaligned", "unmapped_top"}).
    """
    import torch

    vocab = tokenizer.get_vocab()
    positions = (labels != IGNORE).nonzero().squeeze(-1).tolist()
    rows: dict[int, list[tuple[int, float]]] = {}
    unmapped_top = 0
    for k, entry in enumerate(logprobs[: len(positions)]):
        sampled = _token_id(entry, tokenizer, vocab)
        if sampled is None or sampled != int(labels[positions[k]]):
            break
        pairs = {sampled: float(entry["logprob"])}
        for alt in entry.get("top") or []:
            alt_id = _token_id(alt, tokenizer, vocab)
            if alt_id is None:
                unmapped_top += 1
            else:
                pairs.setdefault(alt_id, float(alt["logprob"]))
        rows[positions[k]] = sorted(pairs.items(), key=lambda kv: -kv[1])
    width = max((len(r) for r in rows.values()), default=1)
    ids = torch.full((labels.shape[0], width), -1, dtype=torch.long)
    lps = torch.zeros((labels.shape[0], width), dtype=torch.float32)
    for p, pairs in rows.items():
        ids[p, : len(pairs)] = torch.tensor([i for i, _ in pairs])
        lps[p, : len(pairs)] = torch.tensor([lp for _, lp in pairs])
    counts = {"aligned": len(rows), "unaligned": len(positions) - len(rows), "unmapped_top": unmapped_top}
    return ids, lps, counts


def pad_topk(rows: list[torch.Tensor], fill: float, length: int | None = None) -> torch.Tensor:
    """Stack per-example [L_i, K_i] tensors into [B, L, K] (L = `length` or max L_i, K = max K_i), right-padding with
    `fill` (-1 for ids, 0 for log-probabilities) — the same right padding as the labels they align with."""
    import torch

    length = length or max(r.shape[0] for r in rows)
    width = max(r.shape[-1] for r in rows)
    out = torch.full((len(rows), length, width), fill, dtype=rows[0].dtype)
    for b, r in enumerate(rows):
        out[b, : r.shape[0], : r.shape[-1]] = r
    return out
