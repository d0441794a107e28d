"""Records -> token ids in the student's chat format, with next-token targets on assistant tokens only, and batches.

What is trained: by default the FINAL assistant turn of each record (the teacher's answer, see imitate.records); with
`loss_on="all"` every assistant turn. Everything else (system, user, tool turns, the template's role headers and the
generation prompt) gets target -100. The assistant's end-of-turn marker IS a target, so the student learns to stop.

How the assistant spans are found, without assuming `{% generation %}` markers in the template: for assistant turn i,
render `messages[:i]` with the generation prompt (`before`) and `messages[:i+1]` (`through`) as text. When both are
prefixes of the full rendering, the characters [len(before), len(through)) are that turn's answer plus its end-of-turn
text. Tokens of the full rendering whose first character falls in such a span are targets (offset mapping of a fast
tokenizer; slow tokenizers compare token counts of the prefixes). Templates that rewrite earlier turns (e.g. strip
reasoning from history) fall back to locating the turn's content in the rendering.

Targets are stored SHIFTED: `labels[t]` is the target for the model's output at position t (= the token at t+1, or
-100). Shifting per example keeps packed rows from predicting across example boundaries, and lets the loss pick only the
positions that have a target (`logits_to_keep`), so prompt positions never get a [vocab]-wide logit row.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate.errors import InputError, UsageError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # shifted next-token targets, IGNORE where there is none
    where: str  # "file:line" of the record, for messages
    # gray-box KD only (see imitate.train.distill): the record's collected top-K `logprobs` until aligned,
    # then `topk` = (first row, ids [n, K], log-probs [n, K]) over the aligned rows of `labels`
    logprobs: list | None = None
    teacher: str | None = None
    topk: Any = None
    answer_token_ids: list[int] | None = None  # the record's generated ids (hf teachers), for the round-trip check
    # a record with `context` under white-box KD: the teacher's rendering of context + messages, targets on the same
    # answer tokens (imitate.train.context); None: the teacher reads `input_ids`
    teacher_ids: list[int] | None = None
    teacher_labels: list[int] | None = None
    # cross-tokenizer white-box KD only (imitate/train/xtok.py): the conversation the teacher saw until its own
    # tokenization is made, then that tokenization and the positions paired with the student's (`xtok.TeacherView`)
    messages: list[dict] | None = None
    teacher_view: Any = None

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class DataStats:
    records: int = 0
    truncated: int = 0  # longer than max_length, cut on the right (--overlong truncate)
    dropped_overlong: int = 0  # longer than max_length and dropped (--overlong drop)
    dropped_no_target: int = 0  # no assistant token left inside max_length
    longest: int = 0  # longest rendering in tokens, before truncation
    tokens: int = 0  # tokens kept
    targets: int = 0  # target tokens kept
    examples_overlong: list[str] = field(default_factory=list)  # first few "file:line (N tokens)"

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _render(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict], loss_on: str = "final",
                    first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of the assistant turns to train on (turns from
    index `first` on: a teacher's context in front holds example answers that are not targets)."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
    if loss_on == "final":
        turns = turns[-1:]
    spans: list[tuple[int, int]] = []
    search_from = 0
    for i in turns:
        try:
            before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i > 0 else None
            through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - some templates refuse partial conversations; use the fallback below
            before = through = None
        if before is None and through is not None and i == 0:
            # an opening assistant turn: its header is whatever precedes the content in `through`
            k = through.rfind(messages[i]["content"])
            before = through[:k] if k >= 0 else None
        if before is not None and through is not None and through.startswith(before) and full.startswith(through):
            spans.append((len(before), len(through)))
            search_from = len(through)
            continue
        content = messages[i]["content"]
        k = full.find(content, search_from) if content else -1
        if k < 0:
            continue
        end = k + len(content)
        eos = getattr(tokenizer, "eos_token", None)
        if eos:
            j = full.find(eos, end)
            if j >= 0 and not full[end:j].strip():
                end = j + len(eos)
        spans.append((k, end))
        search_from = end
    return full, spans


def template_separator(tokenizer: Any, messages: list[dict], i: int) -> str:
    """The text the chat template puts between the generation prompt and assistant turn i's content ("" if none or
    unknown). E.g. a template rendering `<|assistant|> {content}` whose generation prompt ends at `<|assistant|>`: " "."""
    content = messages[i]["content"]
    try:
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i > 0 else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that refuses partial conversations: nothing to say
        return ""
    if not through.startswith(before):
        return ""
    k = through.find(content, len(before))
    return through[len(before) : k] if k > len(before) else ""


def without_doubled_separators(tokenizer: Any, messages: list[dict]) -> list[dict]:
    """`messages` with each assistant answer's leading separator removed when the template adds that same separator.

    A teacher answering after the generation prompt writes what comes next, e.g. " March 7" after `<|assistant|>`
    when its template renders `<|assistant|> {content}`; rendering that answer again in the same template would give
    two spaces, text the teacher never produced. The answer's own text is kept; only the template's copy of the
    separator is dropped (by rendering the answer without it), so the rendering continues the generation prompt
    exactly as the teacher did. Answers that do not start with whitespace are never touched.
    """
    out = None
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] != "assistant" or not isinstance(content, str) or not content[:1].isspace():
            continue
        sep = template_separator(tokenizer, messages, i)
        if sep and content.startswith(sep):
            out = out or [dict(x) for x in messages]
            out[i]["content"] = content[len(sep) :]
    return out or messages


def encode(tokenizer: Any, messages: list[dict], loss_on: str = "final",
           first: int = 0) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is an assistant token to train on.

    The answer text is trained as the teacher wrote it: a separator the template would add in front of an answer that
    already starts with it is not doubled (see `without_doubled_separators`)."""
    full, spans = assistant_spans(tokenizer, without_doubled_separators(tokenizer, messages), loss_on, first)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [any(s <= start < e for s, e in spans) and end > start for start, end in enc["offset_mapping"]]
        return ids, mask
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    mask = [False] * len(ids)
    for s, e in spans:
        a = len(tokenizer(full[:s], add_special_tokens=False)["input_ids"])
        b = len(tokenizer(full[:e], add_special_tokens=False)["input_ids"])
        for t in range(a, min(b, len(ids))):
            mask[t] = True
    return ids, mask


def shift_targets(ids: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """labels[t] = ids[t+1] where token t+1 is a target, else IGNORE; the last position has no target."""
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def check_chat_template(tokenizer: Any, student: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"the student {student} has no chat template, so records cannot be formatted for it",
            hint="give one with --chat-template FILE (a Jinja file, e.g. the template of the model's instruct version)",
        )


def load_examples(
    paths: Iterable[str | Path],
    tokenizer: Any,
    *,
    max_length: int,
    overlong: str = "truncate",
    loss_on: str = "final",
    with_logprobs: bool = False,
    teacher_tokenizer: Any = None,
    with_messages: bool = False,
) -> tuple[list[Example], DataStats]:
    """Read records (errors name file:line), tokenize them and apply the --overlong policy.

    The student's tokens are the record's `messages` only, never its `context`.
    with_logprobs: keep each record's `logprobs` and `teacher` on its Example (for gray-box KD).
    teacher_tokenizer: a white-box teacher's tokenizer; records with `context` get the teacher's view of context +
    messages (imitate.train.context.teacher_view, which refuses a record whose answer tokenizes differently there).
    with_messages: keep the conversation the teacher saw (`records.teacher_messages`; cross-tokenizer KD)."""
    from imitate.records import read_records, teacher_messages

    stats = DataStats()
    out: list[Example] = []
    for line in read_records(list(paths), need_assistant=True):
        where = f"{line.path}:{line.lineno}"
        stats.records += 1
        try:
            ids, mask = encode(tokenizer, line.data["messages"], loss_on)
        except Exception as exc:  # jinja errors (e.g. a template that rejects a role order) -> name the record
            raise InputError(f"{where}: the student's chat template failed on this record ({exc})") from None
        stats.longest = max(stats.longest, len(ids))
        if not any(mask):
            raise InputError(
                f"{where}: no assistant tokens found in the rendered conversation",
                hint="the chat template may drop assistant turns; give another one with --chat-template FILE",
            )
        if len(ids) > max_length:
            if len(stats.examples_overlong) < 5:
                stats.examples_overlong.append(f"{where} ({len(ids)} tokens)")
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        labels = shift_targets(ids, mask)
        ex = Example(ids, labels, where, teacher=line.data.get("teacher"),
                     answer_token_ids=line.data.get("answer_token_ids"))
        if with_logprobs and line.data.get("logprobs"):
            ex.logprobs = line.data["logprobs"]
        if with_messages:
            ex.messages = teacher_messages(line.data)
        if ex.n_targets == 0:
            stats.dropped_no_target += 1
            continue
        if teacher_tokenizer is not None and line.data.get("context"):
            from imitate.train.context import teacher_view

            ex.teacher_ids, ex.teacher_labels = teacher_view(teacher_tokenizer, line.data, ex, loss_on)
        stats.tokens += len(ids)
        stats.targets += ex.n_targets
        out.append(ex)
    return out, stats


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded held-out split: (train indices, eval indices); at least one of each when fraction > 0 and n >= 2."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    return sorted(idx[k:]), sorted(idx[:k])


def plan_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, packing: bool, max_length: int
) -> list[list[int]]:
    """This epoch's micro-batches as lists of example indices; the same (seed, epoch) always gives the same plan.

    Padded batches are RANDOM: a fresh seeded shuffle of all examples each epoch, cut into batches of batch_size, as a
    plain PyTorch loop would draw them. There is deliberately no length grouping: when prompts come from a few
    templates, length IS the template, so length-sorted batches each hold one kind of question and the student chases
    whichever kind it saw last (on a 3-template task that cost 0.95 -> 0.12 held-out accuracy, issue #10).

    With packing, whole examples fill a budget of batch_size * max_length tokens per micro-batch, taken in the shuffled
    order (first fit: an example goes into the first open row with room, else opens a row). Rows are a little less
    full than with a length-sorted fit, but what shares a row (and a step) is as random as in padded batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not packing:
        return [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    budget = batch_size * max_length
    bins: list[list[int]] = []
    room: list[int] = []
    open_: list[int] = []  # rows that still have room for a short example (the last few opened)
    for i in order:
        for b in open_:
            if room[b] >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
            open_ = (open_ + [len(bins) - 1])[-8:]  # first fit over a short window keeps it O(n) and the order random
    return bins


def windows(n_batches: int, per_window: int) -> int:
    """How many optimizer steps an epoch of n_batches micro-batches gives (the last window may be short)."""
    return math.ceil(n_batches / per_window) if n_batches else 0


def teacher_written(input_ids: Any, labels: Any, end_ids: Sequence[int]) -> Any:
    """`labels` [B, T] with IGNORE at every target that comes after an end-of-turn token (`end_ids`) within its run of
    targets: the text a chat template writes after a turn has ended (the "\n" of `<|end|>\n`, `<|im_end|>\n`).

    CE trains those tokens (they are the student's template, and cheap), but no teacher ever generated them:
    generation stops at the end-of-turn token, so the teacher's logits there are not its knowledge, only whatever its
    own training put after that token. The KD terms take these labels (imitate.train.distill). Runs are maximal
    stretches of targets, so each assistant turn (and each packed example) is cut on its own."""
    import torch

    has = labels != IGNORE
    if not end_ids or not bool(has.any()):
        return labels
    eot = (torch.isin(input_ids, torch.tensor(list(end_ids), device=input_ids.device)) & has).long()
    idx = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
    starts = has & ~torch.nn.functional.pad(has[:, :-1], (1, 0), value=False)
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # this position's run's first
    seen = eot.cumsum(dim=1)
    before_run = seen.gather(1, run_start) - eot.gather(1, run_start)  # end tokens seen before the run began
    return labels.masked_fill(has & (seen > before_run), IGNORE)


def model_inputs(batch: dict) -> dict[str, Any]:
    """The model's keyword arguments from a `collate` batch (padded: attention_mask; packed: position_ids)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def collate(examples: Sequence[Example], *, pad_id: int, packing: bool) -> dict[str, Any]:
    """Tensors for one micro-batch.

    Padded: input_ids / attention_mask / labels of shape [B, T] (right padding, labels IGNORE on padding).
    Packed: one row [1, N] of concatenated examples with position_ids restarting at 0 for each example and no
    attention_mask; transformers then keeps attention inside each example (block-diagonal causal mask).
    `n_tokens` (real tokens) and `n_targets` are plain ints for throughput and loss normalisation.
    With records that carry a teacher's view (`Example.teacher_ids`), "teacher" holds the teacher's padded rows
    (imitate.train.context.collate_teacher).
    """
    import torch

    n_tokens = sum(len(e.input_ids) for e in examples)
    n_targets = sum(e.n_targets for e in examples)
    extra = {}
    if any(e.teacher_ids is not None for e in examples):  # records with context: the teacher's own rows
        from imitate.train.context import collate_teacher

        extra["teacher"] = collate_teacher(examples, pad_id)
    if packing:
        ids = [t for e in examples for t in e.input_ids]
        labels = [t for e in examples for t in e.labels]
        pos = [p for e in examples for p in range(len(e.input_ids))]
        return {**extra,
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([pos]),
            "labels": torch.tensor([labels]),
            "n_tokens": n_tokens,
            "n_targets": n_targets,
        }
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        attn[r, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "n_tokens": n_tokens, "n_targets": n_targets,
            **extra}
