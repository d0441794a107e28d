"""Several local teachers in `imitate train`: their names, their shares of the KD weight, and the mixture loss.

`--teacher hf:A --teacher hf:B` (same tokenizer as the student) gives one logit KD term per teacher, `logit_kd/NAME`,
with λ = w · share (shares from `--teacher-weight`, normalized to sum 1; equal by default). Under `--sckd` each term
has its own gate, so the student takes from each teacher only on the steps its gradient agrees with CE's
(`cos/logit_kd/NAME`, `on_rate/logit_kd/NAME` in the metrics). `--teacher-mix mean` is the usual ensemble baseline
instead: one `logit_kd` term against the share-weighted average of the teachers' distributions at temperature T.

A teacher's NAME is its model directory's (or hub id's) last part; two with the same one get -2, -3 ... in order.
"""

from __future__ import annotations

import re
from typing import Any

from imitate.errors import UsageError

LOGIT = "logit_kd"


def names(specs: list[str]) -> list[str]:
    """Short names of teacher specs: 'hf:runs/big/' -> 'big'; duplicates numbered in order."""
    out: list[str] = []
    for spec in specs:
        ref = spec.split(":", 1)[-1].rstrip("/\\")
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", re.split(r"[/\\]", ref)[-1].removesuffix(".gguf")) or "teacher"
        name, k = base, 1
        while name in out:
            k += 1
            name = f"{base}-{k}"
        out.append(name)
    return out


def term_names(cfg: Any) -> list[str]:
    """The logit KD terms of a run: ['logit_kd'] for one teacher or --teacher-mix mean, else one per teacher."""
    if len(cfg.teachers) > 1 and cfg.teacher_mix == "separate":
        return [f"{LOGIT}/{n}" for n in names(cfg.teachers)]
    return [LOGIT]


def is_logit(term: str) -> bool:
    return term == LOGIT or term.startswith(LOGIT + "/")


def shares(cfg: Any) -> list[float]:
    """Each teacher's share of the KD weight, in --teacher order, summing to 1."""
    got = names(cfg.teachers)
    raw = [cfg.teacher_weight.get(n, cfg.teacher_weight.get(s)) for n, s in zip(got, cfg.teachers)]
    if not cfg.teacher_weight:
        raw = [1.0] * len(got)
    total = sum(raw)
    return [r / total for r in raw]


def check_team(cfg: Any) -> None:
    """The options of a run with several teachers (or --teacher-weight), checked when the config is built."""
    specs = cfg.teachers
    if len(specs) < 2:
        raise UsageError("--teacher-weight needs several teachers (--teacher hf:A --teacher hf:B)")
    if len(set(specs)) < len(specs):
        raise UsageError("a teacher is given twice", hint="name each --teacher once; --teacher-weight sets shares")
    got = names(specs)
    if cfg.teacher_weight:
        unknown = [k for k in cfg.teacher_weight if k not in got and k not in specs]
        if unknown:
            raise UsageError(f"--teacher-weight {unknown[0]}: no such teacher",
                             hint=f"the teachers' names are {', '.join(got)}")
        missing = [n for n, s in zip(got, specs) if n not in cfg.teacher_weight and s not in cfg.teacher_weight]
        if missing:
            raise UsageError(f"--teacher-weight gives no share for {missing[0]}",
                             hint="give every teacher a share, e.g. " + ",".join(f"{n}=1" for n in got))
        values = list(cfg.teacher_weight.values())
        if any(v < 0 for v in values) or sum(values) <= 0:
            raise UsageError("--teacher-weight shares must be >= 0 and not all 0")
    for flag, on in (("--feature-kd", cfg.feature_kd), ("--on-policy", cfg.on_policy)):
        if on:
            raise UsageError(f"{flag} takes one teacher; several teachers give logit KD terms only",
                             hint="drop the flag, or distil from one --teacher")


def mixture_kd_loss(
    student_hidden: Any, student_head: Any, teachers: list[tuple[Any, Any, float]], labels: Any, *, beta: float = 0.0,
    temperature: float = 1.0, chunk_size: int = 256, vocab_size: int | None = None, t2: bool = True,
) -> tuple[Any, int]:
    """`losses.chunked_kd_loss` against the share-weighted mean of several teachers' distributions.

    teachers: [(teacher_hidden [B, L, Ht], teacher_head, share)], shares summing to 1. At temperature T the target is
    p = Σ_k share_k · softmax(t_k / T); it enters the divergence (`losses.kd_chunk_loss`) as the logits T · log p,
    whose softmax at T is p itself.
    Returns (scalar float32 sum over target tokens, number of target tokens).
    """
    import math

    import torch

    from imitate.train.data import IGNORE
    from imitate.train.losses import _chunked_head_loss, _head_params, _target_rows, kd_chunk_loss

    rows, idx = _target_rows(student_hidden, labels != IGNORE)
    parts = []
    with torch.no_grad():
        for hidden, head, share in teachers:
            t_rows = hidden.detach().reshape(-1, hidden.shape[-1]).index_select(0, idx.to(hidden.device))
            parts.append((t_rows, *_head_params(head), math.log(share) if share > 0 else -math.inf))
    vocab = vocab_size or min([_head_params(student_head)[0].shape[0], *(p[1].shape[0] for p in parts)])

    def mixed_logits(start: int, end: int, device: Any) -> Any:
        with torch.no_grad():
            logs = [torch.log_softmax(torch.nn.functional.linear(r[start:end], w, b)[:, :vocab].to(
                device=device, dtype=torch.float32) / temperature, dim=-1) + log_share
                for r, w, b, log_share in parts]
            return torch.logsumexp(torch.stack(logs), dim=0) * temperature

    total = _chunked_head_loss(rows, student_head, kd_chunk_loss(mixed_logits, beta, temperature), chunk_size, vocab)
    return (total * temperature**2 if t2 else total), int(idx.numel())
