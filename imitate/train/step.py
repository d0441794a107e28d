"""One optimizer step of `imitate train`: the micro-batches of a window, forward -> loss terms -> combine -> backward,
and the held-out loss through the same CE path. Every loss term is a token SUM; the normalisation of a window is
loop.py's token-sum convention (its module docstring)."""

from __future__ import annotations

from typing import Any

from imitate.train.config import TrainConfig
from imitate.train.data import IGNORE, Example, collate


def compute_losses(model: Any, batch: dict, vocab_size: int | None = None, chunk_size: int = 256) -> tuple[dict, Any]:
    """Forward one micro-batch; return ({"ce": token-SUM cross-entropy}, the model outputs).

    The one CE path (`losses.forward_ce`, shared with KD and evaluation): logits only at target positions, chunk by
    chunk, cut to the real vocabulary `vocab_size` (see `student.student_vocab`)."""
    from imitate.train.losses import forward_ce

    ce, outputs = forward_ce(model, batch, vocab_size=vocab_size, chunk_size=chunk_size)
    return {"ce": ce}, outputs


def combine(terms: dict) -> Any:
    """The training objective from the loss terms (token sums). Plain SFT: the cross-entropy."""
    return terms["ce"]


def backward(accelerator: Any, loss: Any, scale: float) -> None:
    """Backpropagate `loss * scale`. accelerate divides by grad_accum and DDP averages over ranks; `scale` undoes both,
    so the accumulated gradient is d(sum of window token losses)/dθ / (the window's loss denominator)."""
    accelerator.backward(loss * scale)


def accumulate_window(accelerator: Any, model: Any, micro: list[dict], n_targets: int, distiller: Any = None,
                      gate: Any = None, vocab_size: int | None = None, onpolicy_scale: float = 1.0) -> tuple[Any, dict]:
    """Forward + backward this process's micro-batches of one window; the gradients sum up in `.grad` (synchronised
    across processes on the last one). Returns (this process's token sums [CE, then each KD term] as a detached
    float64 vector, the SCKD gate report {term: {"cos", "on"}} or {}).

    n_targets: the loss denominator, the WHOLE window's, all processes: its target tokens (with on-policy
    micro-batches, `OnPolicy.denominators`).
    onpolicy_scale: the factor on on-policy micro-batches' KD sums in the loss (`OnPolicy.kd_scale`); the returned
    sums are unscaled.
    distiller: `imitate.train.distill.Distiller` (KD terms) or None (plain SFT). gate: `imitate.train.sckd.SCKDGate` or None.
    With a gate nothing is backpropagated: the gate takes each loss's gradient separately (`torch.autograd.grad`), so
    the forwards run under `no_sync` and the gradients are averaged over ranks here, after the gate has decided.
    """
    import torch

    from imitate.train.distill import ONPOLICY, average_grads

    world = accelerator.num_processes
    names = ["ce"] + (distiller.terms if distiller is not None else [])
    sums = torch.zeros(len(names), device=accelerator.device, dtype=torch.float64)
    for batch in micro:
        batch = to_device(batch, accelerator.device)
        scale = {ONPOLICY: onpolicy_scale} if "onpolicy" in batch and onpolicy_scale != 1.0 else {}
        if gate is not None:
            # the gate's autograd.grad never fires DDP's gradient hooks: keep DDP from waiting for them
            with accelerator.accumulate(model), accelerator.no_sync(model), accelerator.autocast():
                terms = distiller.losses(model, batch)
                s = world / max(n_targets, 1)  # mean over ranks below turns this into 1 / n_targets of the sum
                gate.accumulate(terms["ce"] * ((1.0 - distiller.w) * s),
                                {n: terms[n] * (s * scale.get(n, 1.0)) for n in distiller.terms},
                                group="onpolicy" if "onpolicy" in batch else "")  # SCKD pairing: see onpolicy.py
        else:
            with accelerator.accumulate(model), accelerator.autocast():
                if distiller is None:
                    terms, _ = compute_losses(model, batch, vocab_size)
                    loss = combine(terms)
                else:
                    terms = distiller.losses(model, batch)
                    loss = distiller.combine({**terms, **{n: terms[n] * k for n, k in scale.items()}})
                backward(accelerator, loss, world * accelerator.gradient_accumulation_steps / max(n_targets, 1))
        sums += torch.stack([terms[n].detach().double().to(sums.device) for n in names])
    report = {}
    if gate is not None:
        report = gate.step()
        average_grads(accelerator, gate.params + [p for ps in gate.term_params.values() for p in ps])
    elif distiller is not None and distiller.regressors is not None:
        average_grads(accelerator, list(distiller.regressors.parameters()))  # not DDP-wrapped: sync them here
    return sums, report


def window_batches(plan: list[list[int]], w: int, per_window: int) -> list[list[int] | None]:
    """Micro-batches of window `w`; a short last window is filled with None (padding micro-batches that carry no
    targets), so every process runs the same number of forward/backward passes and collectives line up."""
    part: list[list[int] | None] = list(plan[w * per_window : (w + 1) * per_window])
    return part + [None] * (per_window - len(part))


def materialize(batch_idx: list[int] | None, examples: list[Example], stand_in: list[int]) -> list[Example]:
    if batch_idx is not None:
        return [examples[i] for i in batch_idx]
    return [Example(examples[i].input_ids, [IGNORE] * len(examples[i].input_ids), "padding") for i in stand_in[:1]]


def to_device(batch: dict, device: Any) -> dict:
    """The batch's tensors on `device`, those of nested batches too (an on-policy micro-batch carries its records'
    collected answers as batch["reference"])."""
    return {k: (v.to(device) if hasattr(v, "to") else to_device(v, device) if isinstance(v, dict) else v)
            for k, v in batch.items()}


def evaluate(accelerator: Any, model: Any, examples: list[Example], cfg: TrainConfig, pad_id: int,
             vocab_size: int | None = None) -> float | None:
    """Mean CE per target token over the held-out examples (all ranks), through the training CE path."""
    import torch

    if not examples:
        return None
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    plan = [order[j : j + cfg.batch_size] for j in range(0, len(order), cfg.batch_size)]
    world, rank = accelerator.num_processes, accelerator.process_index
    plan += [None] * (-len(plan) % world)
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    with torch.no_grad():
        for b in plan[rank::world]:
            batch = collate(materialize(b, examples, order), pad_id=pad_id, packing=False)
            batch = to_device(batch, accelerator.device)
            with accelerator.autocast():
                terms, _ = compute_losses(model, batch, vocab_size, cfg.kd_chunk_size)
            total += torch.tensor([float(terms["ce"]), batch["n_targets"]], device=total.device, dtype=total.dtype)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else None
