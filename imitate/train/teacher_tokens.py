"""The records' teacher tokens against the student's, settled once when the records are read (before any weights).

- The round-trip check (`check_teacher_tokens`, `refuse_token_mismatch`): records of an hf teacher carry the ids it
  generated; the student's chat template must reproduce them, else logit KD would grade text the teacher never wrote.
- Gray-box alignment (`prepare_graybox`, `graybox_tensors`): collected top-K log-probs -> rows aligned with the
  examples' targets, for `losses.sparse_topk_kd`; token by token for the student's own tokenizer, by text
  (imitate/train/xtok.py) for any other.
Both need to know whether a record's teacher shares the student's tokenizer (`_teacher_tokenizer`, one loader and
check for both).
"""

from __future__ import annotations

from typing import Any

from imitate.errors import ImitateError, InputError
from imitate.train.data import IGNORE

# ---------------------------------------------------------------------------------------------------------------------
# gray-box: collected log-probabilities -> top-K rows aligned with the examples' targets
# ---------------------------------------------------------------------------------------------------------------------


def _final_run(labels: list[int]) -> list[int]:
    """Labels with only the LAST contiguous run of targets kept: the final assistant turn, the one the logprobs of a
    record describe (with --loss-on all, earlier assistant turns are targets too but have no logprobs)."""
    out = [IGNORE] * len(labels)
    t = len(labels) - 1
    while t >= 0 and labels[t] == IGNORE:
        t -= 1
    while t >= 0 and labels[t] != IGNORE:
        out[t] = labels[t]
        t -= 1
    return out


def _teacher_tokenizer(spec: str | None, tokenizer: Any, cache: dict) -> tuple[bool, str | None]:
    """(at hand, why not the student's) for a record's teacher: an hf teacher whose directory (or cached hub id) is
    here is loaded once and checked with `check_tokenizers`; other teachers are not at hand (why = None)."""
    if spec not in cache:
        at_hand, why = False, None
        from imitate.models import model_refs, resolve_model, split_ref

        provider, model = split_ref(spec or "")
        if provider == "hf" and model:
            from transformers import AutoTokenizer

            from imitate.train import vocab

            try:
                t_tok = AutoTokenizer.from_pretrained(model_refs(resolve_model(model))[2])
                at_hand = True
                cache[("tok", spec)] = t_tok
                vocab.check_tokenizers(tokenizer, t_tok, teacher=spec)
            except ImitateError as exc:
                why = exc.message if at_hand else None
            except (OSError, ValueError):
                pass  # not at hand here
        cache[spec] = (at_hand, why)
    return cache[spec]


MAX_TOKEN_MISMATCH = 0.03  # KD refuses above this fraction of checked records whose answer tokens differ


def check_teacher_tokens(examples: list, tokenizer: Any, max_length: int | None = None) -> dict:
    """Round-trip check: does the student's chat template reproduce the tokens the teacher generated?

    For every example whose record carries `answer_token_ids` (hf teachers) from a teacher with the student's
    tokenizer, the answer's target tokens (the final assistant turn, end-of-turn marker excluded) must equal those ids.
    Where the text is the same but its tokens are not (a real model often samples a tokenization that re-tokenizing
    its text does not give back: 8% of SmolLM2-135M's greedy answers in examples/smollm2.toml), the teacher's ids
    replace the student's in the example (`retokenized`): the trained tokens are then the ones the teacher wrote.
    What is left is a mismatch: the trained text is not what the teacher wrote (a separator the template adds, a
    template that rewrites the answer, special tokens dropped from the text); CE can still learn it, but the teacher's
    logits on a sequence it would never write pull a KD student away from it.
    Returns {"checked", "mismatched", "retokenized", "unchecked" (other or unavailable tokenizer), "first"
    ("file:line" ...)}.
    """
    report: dict[str, Any] = {"checked": 0, "mismatched": 0, "retokenized": 0, "unchecked": 0, "first": []}
    cache: dict = {}
    for ex in examples:
        if ex.answer_token_ids is None:
            continue
        if not _same_tokenizer(ex.teacher, tokenizer, cache):
            report["unchecked"] += 1
            continue
        report["checked"] += 1
        got = [t for t in _final_run(ex.labels) if t != IGNORE]
        want = list(ex.answer_token_ids)
        n = min(len(want), len(got))  # a record truncated by --max-length is compared as far as it goes
        if got[:n] == want[:n]:
            continue
        if _use_teacher_ids(ex, tokenizer, got, want, max_length):
            report["retokenized"] += 1
            continue
        report["mismatched"] += 1
        if len(report["first"]) < 3:
            report["first"].append(f"{ex.where} (teacher {tokenizer.decode(want[:n])!r}, "
                                   f"student template {tokenizer.decode(got[:n])!r})")
    report["mismatch_fraction"] = report["mismatched"] / report["checked"] if report["checked"] else 0.0
    return report


def _use_teacher_ids(ex: Any, tokenizer: Any, got: list[int], want: list[int], max_length: int | None) -> bool:
    """Put the teacher's answer ids in place of the student's tokens of the same text (see check_teacher_tokens).

    got: the final assistant turn's target tokens (answer, then the template's end-of-turn tokens). The student's
    answer is the shortest prefix of `got` that decodes to the teacher's text; what follows it (the end-of-turn
    marker) stays. False when no prefix decodes to it (the texts differ) or the result would pass max_length."""
    text = tokenizer.decode(want)
    k = next((k for k in range(1, len(got)) if tokenizer.decode(got[:k]) == text), None)
    if k is None:
        return False
    final = _final_run(ex.labels)
    first = next(t for t, x in enumerate(final) if x != IGNORE)  # label position of the answer's first token
    start = first + 1  # its input position
    ids = ex.input_ids[:start] + want + ex.input_ids[start + k :]
    if max_length is not None and len(ids) > max_length:
        return False
    from imitate.train.data import shift_targets

    mask = [False] * len(ids)
    for t in range(start, start + len(want) + len(got) - k):
        mask[t] = True
    for t, x in enumerate(ex.labels[:first]):  # earlier assistant turns (--loss-on all) keep their targets
        if x != IGNORE:
            mask[t + 1] = True
    ex.input_ids, ex.labels = ids, shift_targets(ids, mask)
    return True


def _same_tokenizer(spec: str | None, tokenizer: Any, cache: dict) -> bool:
    """Whether the record's teacher is an hf model at hand whose tokenizer is the student's."""
    at_hand, why = _teacher_tokenizer(spec, tokenizer, cache)
    return at_hand and why is None


def refuse_token_mismatch(report: dict) -> None:
    """Logit KD on text the teacher did not write: refuse above MAX_TOKEN_MISMATCH, with the fix."""
    if report["checked"] and report["mismatch_fraction"] > MAX_TOKEN_MISMATCH:
        raise InputError(
            f"{report['mismatched']} of {report['checked']} records from an hf teacher do not tokenize back to the "
            f"tokens the teacher generated ({report['mismatch_fraction']:.0%}; first: {'; '.join(report['first'])}): "
            "KD would score the teacher on text it never wrote",
            hint="give the student the teacher's chat template (--chat-template FILE, the teacher's template as a Jinja "
            "file), or re-collect with a teacher whose template matches the student's; SFT without --teacher is "
            "less affected",
        )


def prepare_graybox(examples: list, tokenizer: Any) -> dict:
    """Align every example's collected logprobs with its targets (sets `Example.topk`, drops `Example.logprobs`).

    A teacher known to share the student's tokenizer (an hf teacher at hand that passes `check_tokenizers`) is
    aligned token by token (`vocab.align_logprobs`); so is a teacher not at hand whose tokens all match the student's.
    Any other record (an hf teacher of another family, an API whose tokens differ) is aligned by TEXT
    (`xtok.graybox_rows`): each collected entry grades the student's token that starts at the same byte offset of
    the answer. Returns the report for the summary: records with logprobs, aligned / unaligned target tokens,
    coverage (overall and per record), how many records went by text.
    """
    import torch

    from imitate.train import vocab, xtok

    report: dict[str, Any] = {"records_with_logprobs": 0, "aligned": 0, "unaligned": 0, "unmapped_top": 0,
                              "by_text": 0, "text_mismatch": 0}
    cache: dict = {}
    proj = None
    taught, targets, where = [], [], []
    for ex in examples:
        if not ex.logprobs:
            continue
        report["records_with_logprobs"] += 1
        labels = _final_run(ex.labels)
        at_hand, why = _teacher_tokenizer(ex.teacher, tokenizer, cache)
        counts = None
        if why is None:
            ids, lps, counts = vocab.align_logprobs(ex.logprobs, torch.tensor(labels), tokenizer)
            if not at_hand and counts["aligned"] < len(ex.logprobs):  # not the student's tokens: go by text
                counts = None
        if counts is None:
            proj = proj or xtok.Projector(tokenizer)
            entries = _with_teacher_bytes(ex.logprobs, cache.get(("tok", ex.teacher)))
            rows, counts = xtok.graybox_rows(entries, labels, proj)
            report["by_text"] += 1
            report["text_mismatch"] += int(not rows)
            ids, lps = _rows_to_tensors(rows, len(labels))
        ex.logprobs = None
        for k in ("aligned", "unaligned", "unmapped_top"):
            report[k] += counts[k]
        taught.append(counts["aligned"])
        targets.append(xtok.answer_targets(labels, xtok.end_ids(tokenizer)))
        where.append(ex.where)
        rows_at = (ids >= 0).any(-1).nonzero().squeeze(-1)
        if rows_at.numel():
            a, b = int(rows_at[0]), int(rows_at[-1]) + 1
            ex.topk = (a, ids[a:b].clone(), lps[a:b].clone())
    total = report["aligned"] + report["unaligned"]
    report["aligned_fraction"] = report["aligned"] / total if total else 0.0
    report.update(xtok.coverage_report(taught, targets, where))
    if report["records_with_logprobs"] and not report["aligned"]:
        report["note"] = ("no collected log-prob could be aligned with the student's tokens (the records' text does "
                          "not match the student's rendering of the answers): trained on CE only")
    return report


def _with_teacher_bytes(entries: list[dict], t_tok: Any) -> list[dict]:
    """Entries (and their `top` alternatives) with `bytes` filled in from the teacher's tokenizer, when it is at hand
    and the entry has an id but no bytes (records of hf teachers written before `bytes` was stored)."""
    if t_tok is None:
        return entries
    from imitate.train.xtok import cached_token_bytes

    table = cached_token_bytes(t_tok)

    def fill(e: dict) -> dict:
        i = e.get("id")
        if e.get("bytes") or i is None or not 0 <= int(i) < len(table) or table[int(i)] is None:
            return e
        return {**e, "bytes": list(table[int(i)])}

    return [{**fill(e), "top": [fill(a) for a in e.get("top") or []]} for e in entries]


def _rows_to_tensors(rows: dict, length: int) -> tuple[Any, Any]:
    """{label position: [(id, log p), ...]} -> ids [L, K] (-1 = empty) and log-probs [L, K]."""
    import torch

    width = max((len(r) for r in rows.values()), default=1)
    ids = torch.full((length, width), -1, dtype=torch.long)
    lps = torch.zeros((length, width), dtype=torch.float32)
    for p, pairs in rows.items():
        ids[p, : len(pairs)] = torch.tensor([i for i, _ in pairs])
        lps[p, : len(pairs)] = torch.tensor([lp for _, lp in pairs])
    return ids, lps


def graybox_tensors(examples: list, batch: dict) -> tuple[Any, Any]:
    """[B, L, K] top-K ids (-1 = none) and log-probs for a collated micro-batch (padded rows or one packed row)."""
    import torch

    width = max((ex.topk[1].shape[1] for ex in examples if ex.topk is not None), default=1)
    rows = batch["input_ids"].shape[0]
    length = batch["input_ids"].shape[1]
    ids = torch.full((rows, length, width), -1, dtype=torch.long)
    lps = torch.zeros((rows, length, width), dtype=torch.float32)
    packed = "position_ids" in batch and "attention_mask" not in batch
    offset = 0
    for r, ex in enumerate(examples):
        row, base = (0, offset) if packed else (r, 0)
        if ex.topk is not None:
            a, t_ids, t_lps = ex.topk
            ids[row, base + a : base + a + t_ids.shape[0], : t_ids.shape[1]] = t_ids
            lps[row, base + a : base + a + t_ids.shape[0], : t_lps.shape[1]] = t_lps
        offset += len(ex.input_ids)
    return ids, lps
