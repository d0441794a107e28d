"""The teacher's view of a record with `context` (imitate.records): what a white-box teacher reads in `imitate train`.

The student trains on `messages` alone (data.py). The teacher produced the answer after `context + messages`, so it
grades the same answer tokens after that: its own chat template over `records.teacher_messages(record)`. The answer
tokens are the same ids in both renderings (checked per record: if the teacher's template tokenizes the answer
differently, KD would compare different tokens, and the run is refused); only the tokens in front differ. The student's
and the teacher's target positions are therefore paired in order: the k-th target of an example in the student's
rendering is the k-th target in the teacher's.

A micro-batch then carries `batch["teacher"]` = {input_ids, attention_mask, labels} (padded, one row per example in the
micro-batch's order, also when the student's rows are packed), and `realign` moves the teacher's hidden states to the
student's target positions, so the KD and feature terms (losses.chunked_kd_loss, features.FeatureRegressors) run
unchanged. Records without context keep the old behaviour: the teacher reads the student's own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imitate.errors import InputError, UsageError
from imitate.train.data import IGNORE, encode, shift_targets

HINT = ("the answer must be the same tokens after the context as without it (same tokenizer, a chat template that "
        "renders the assistant turn the same way); train without --teacher (SFT on the records), or give a teacher "
        "whose chat template matches the student's")


def targets(labels: Sequence[int]) -> list[int]:
    return [t for t in labels if t != IGNORE]


def teacher_view(t_tok: Any, record: dict, ex: Any, loss_on: str = "final") -> tuple[list[int], list[int]]:
    """(teacher input ids, teacher labels) of a record with context, for its student Example `ex`: the teacher's chat
    template over context + messages up to the final answer, then the student's own tokens from there (`splice`):
    targets on the answer tokens of `messages` only (never on the context's example answers), as many as the student
    kept (--max-length truncates the student's side only). Raises InputError naming the record when the answer's
    tokens differ between the two renderings."""
    where, student_labels = ex.where, ex.labels
    context = list(record.get("context") or [])
    if not getattr(t_tok, "chat_template", None):
        raise UsageError("the teacher's tokenizer has no chat template, so it cannot read the records' context",
                         hint="give a teacher with a chat template, or train without --teacher")
    try:
        ids, mask = encode(t_tok, context + list(record["messages"]), loss_on, first=len(context))
    except Exception as exc:  # noqa: BLE001 - a template that rejects the role order, named by record
        raise InputError(f"{where}: the teacher's chat template failed on context + messages ({exc})") from None
    labels = shift_targets(ids, mask)
    want, got = targets(student_labels), targets(labels)
    if got[: len(want)] != want:
        k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise InputError(
            f"{where}: the answer's tokens differ after the context in the teacher's chat template (from answer token "
            f"{k}: student {want[k:k + 5]}, teacher {got[k:k + 5]}); logit KD would compare different tokens",
            hint=HINT)
    return splice(ids, labels, ex.input_ids, ex.labels)


def splice(t_ids: list[int], t_labels: list[int], ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """The teacher's tokens up to the student's last run of targets (the final answer), then the student's tokens from
    there on. The answer tokens are the same in both renderings (checked by `teacher_view`), so this is the teacher's
    rendering with the answer exactly as the student trains it: cut where --max-length cut the student, and with the
    teacher's generated ids where `teacher_tokens.check_teacher_tokens` put them in (`resplice`)."""
    pos = [t for t, x in enumerate(labels) if x != IGNORE]
    first = pos[-1]
    while first - 1 >= 0 and labels[first - 1] != IGNORE:  # back to the start of the last run
        first -= 1
    before = pos.index(first)  # targets in front of the final answer (earlier turns with --loss-on all)
    t_first = [t for t, x in enumerate(t_labels) if x != IGNORE][before]
    return t_ids[: t_first + 1] + ids[first + 1 :], t_labels[:t_first] + labels[first:]


def resplice(examples: Sequence[Any]) -> None:
    """After `teacher_tokens.check_teacher_tokens` replaced some students' answers with the teacher's generated ids:
    give the teacher views the same answer tokens again."""
    for ex in examples:
        if ex.teacher_ids is not None:
            ex.teacher_ids, ex.teacher_labels = splice(ex.teacher_ids, ex.teacher_labels, ex.input_ids, ex.labels)


def onpolicy_view(teacher_ids: Sequence[int], teacher_labels: Sequence[int], answer: Sequence[int],
                  kept: int) -> tuple[list[int], list[int]]:
    """The teacher's input for a student-written answer: the teacher's prompt (its rendering of context + the
    record's prompt, up to the answer) + the first `kept` answer tokens (as many as the student's example kept)."""
    from imitate.train.data import Example
    from imitate.train.onpolicy import prompt_of

    prompt = prompt_of(Example(list(teacher_ids), list(teacher_labels), ""))
    ids = prompt + list(answer[:kept])
    return ids, shift_targets(ids, [False] * len(prompt) + [True] * kept)


def add_onpolicy_views(new: Sequence[Any], examples: Sequence[Any], answers: Sequence[Sequence[int]]) -> None:
    """Give each on-policy example (`new`, prompt + the student's answer, written WITHOUT the context) the teacher's
    view of the same answer tokens WITH the record's context in front, where its record (`examples`) has one."""
    for e, src, answer in zip(new, examples, answers):
        if src.teacher_ids is not None:
            e.teacher_ids, e.teacher_labels = onpolicy_view(src.teacher_ids, src.teacher_labels, answer, e.n_targets)


def collate_teacher(examples: Sequence[Any], pad_id: int) -> dict:
    """The teacher's padded rows for a micro-batch: the teacher's view where an example has one, else its own tokens."""
    import torch

    rows = [(e.teacher_ids or e.input_ids, e.teacher_labels or e.labels) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, : len(i)], labels[r, : len(i)], attn[r, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


class Realigned(Sequence):
    """A teacher's hidden states moved to the student's target positions: layer i is [B_s, L_s, H] with the teacher's
    vector for the k-th target wherever the student has its k-th target (zeros elsewhere; no loss reads those)."""

    def __init__(self, hidden_states: Sequence[Any], teacher_labels: Any, student_labels: Any):
        self.states, self.shape = hidden_states, student_labels.shape
        dev = hidden_states[-1].device
        self.s_idx = (student_labels != IGNORE).reshape(-1).nonzero().squeeze(1).to(dev)
        self.t_idx = (teacher_labels != IGNORE).reshape(-1).nonzero().squeeze(1).to(dev)
        if len(self.s_idx) != len(self.t_idx):
            raise RuntimeError(f"student and teacher target counts differ ({len(self.s_idx)} != {len(self.t_idx)})")
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        i = i % len(self.states)
        if i not in self._cache:
            h = self.states[i]
            out = h.new_zeros(self.shape[0] * self.shape[1], h.shape[-1])
            out[self.s_idx] = h.reshape(-1, h.shape[-1]).index_select(0, self.t_idx)
            self._cache[i] = out.view(*self.shape, h.shape[-1])
        return self._cache[i]


def realign(t_out: Any, batch: dict) -> Any:
    """The teacher's outputs with `hidden_states` at the student's positions (see the module doc)."""
    from types import SimpleNamespace

    return SimpleNamespace(hidden_states=Realigned(t_out.hidden_states, batch["teacher"]["labels"], batch["labels"]))
