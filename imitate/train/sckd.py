"""SCKD (Student Customized Knowledge Distillation, Zhu & Wang, ICCV 2021): a per-term, per-step gradient gate.

Over the student's trainable parameters θ, with g_s = ∇θ L_sup and g_i = ∇θ L_i for each distillation term i (the logit
KD term, each feature pair): c_i = cos(g_s, g_i), γ_i = [c_i > φ] (φ = --sckd-threshold, 0 by default), and the update
uses g_s + Σ_i γ_i λ_i g_i. A term whose gradient points against the supervised one this step is left out, and the
weight it had taken from the supervised loss goes back to it (`give_back`): an all-off step is a plain SFT step.

How it runs (`SCKDGate`):
- `accumulate(sup_loss, terms)` once per micro-batch, in place of `loss.backward()`: one `torch.autograd.grad` per loss
  (retain_graph=True until the last one) over the trainable parameters only, summed into one gradient buffer per loss.
  Nothing is backpropagated twice: n terms cost n + 1 gradient computations instead of one backward of the sum.
- `step()` once per optimizer step, before `optimizer.step()`: cosines on the window's summed gradients, the gate, and
  the combined gradient added into `.grad` (added, not assigned, so other gradients already there are kept).

Gradient accumulation: the gate is decided once per optimizer step on the gradients summed over the whole accumulation
window — exactly the gradients of the window's loss, so it is the same decision a single large batch would take. The price
is one extra copy of the trainable gradients per loss (1 + n buffers); for LoRA (a few MB) that is nothing, for full
fine-tuning of a big model it is real memory. Gating each micro-batch separately would need no buffers but would decide
on noisier gradients and let a term count in part of a step only.

Parameters only one term touches (the feature regressors: `term_params`) are left out of the cosine (g_s is zero there)
and get their gradient only when their term is on: an off pair's regressor does not move that step.

Data parallel: each rank's dot products and squared norms are summed across ranks by `reducer` (an all-reduce) before the
cosines are taken, so every rank takes the same decision. The cosine is then computed from Σ_r<g_s^r, g_i^r> and
Σ_r‖g^r‖², an average of the ranks' own alignments, which is cheap (1 + 2n scalars) but not the cosine of the averaged
gradients. Because the gradients are written by this gate and not by `backward()`, DDP's own gradient all-reduce never
fires: run the forward passes under `accelerator.no_sync(model)` and average `.grad` across ranks yourself after `step()`
(for example `accelerator.reduce(p.grad, "mean")` per parameter, or one flat all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

Reducer = Callable[["torch.Tensor"], "torch.Tensor"]


def distributed_sum() -> Reducer | None:
    """An all-reduce SUM over the default process group when torch.distributed is initialised, else None (one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    return reduce


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor], retain: bool) -> list[torch.Tensor]:
    """∇ loss over params, zeros where the loss does not depend on a parameter (or at all)."""
    import torch

    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    got = torch.autograd.grad(loss, list(params), retain_graph=retain, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(got, params)]


class OnRates:
    """How often each gated term was on: [steps on, steps] per term, the one counter behind the gate's, the metrics'
    running `on_rate/<term>` and the run summary's `distill.on_rate`. `from_rows` resumes from logged metrics rows."""

    def __init__(self, names: Sequence[str]):
        self.counts = {name: [0, 0] for name in names}

    @classmethod
    def from_rows(cls, rows: Sequence[dict], names: Sequence[str]) -> OnRates:
        """The counts of metrics rows that logged `on/<term>` (an earlier run's, when resuming)."""
        rates = cls(names)
        for row in rows:
            for name in names:
                if f"on/{name}" in row:
                    rates.add(name, bool(row[f"on/{name}"]))
        return rates

    def add(self, name: str, on: bool) -> float:
        """Count one step of `name`; returns its running on-rate."""
        c = self.counts.setdefault(name, [0, 0])
        c[0], c[1] = c[0] + int(on), c[1] + 1
        return c[0] / c[1]

    def rates(self) -> dict[str, float]:
        return {name: (on / steps if steps else 0.0) for name, (on, steps) in self.counts.items()}


class SCKDGate:
    """Gate the distillation terms of one student; see the module docstring for the rule and its costs.

    params: the student's trainable parameters (LoRA weights), the space in which cosines are taken.
    weights: {term name: λ_i}; the names the `terms` dicts passed to `accumulate` must use (e.g. "logit_kd",
    "feature_s1_t2"). threshold: φ; a term counts when its cosine is strictly greater.
    term_params: {term name: parameters only that term trains} (a feature pair's regressor).
    reducer: sums a 1-D float32 tensor across data-parallel ranks (`distributed_sum()`); None in one process.
    give_back: {term name: r_i}: when term i is off, the supervised gradient is scaled by (1 + Σ_off r_i). A recipe that
    weighs CE by (1 − w) and the logit term by w passes r = w / (1 − w): an off step is then plain SFT at full weight,
    not half of it (which, under Adam, whose second moments still hold the larger on-step gradients, learned far slower
    than SFT: 0.29 vs 0.48 held-out on the several-valid-answers task of benchmarks/quality.py).
    pairs: {term name: group}: compare that term with the supervised gradient of its group only (the micro-batches
    accumulated with that `group`) instead of all of them; on-policy KD is paired so (imitate/train/onpolicy.py). Every
    group's supervised gradient is in the update; an off term gives back to its own group's.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        weights: dict[str, float],
        *,
        threshold: float = 0.0,
        term_params: dict[str, Sequence[torch.Tensor]] | None = None,
        reducer: Reducer | None = None,
        give_back: dict[str, float] | None = None,
        pairs: dict[str, str] | None = None,
    ):
        self.params = [p for p in params if p.requires_grad]
        self.weights = dict(weights)
        self.give_back = dict(give_back or {})
        self.threshold = threshold
        self.term_params = {name: list((term_params or {}).get(name, [])) for name in self.weights}
        self.reducer = reducer
        self.counter = OnRates(list(self.weights))
        self.pairs = {name: (pairs or {}).get(name, "") for name in self.weights}
        self.steps = 0
        self._sup: dict[str, list[torch.Tensor]] = {}  # group -> summed supervised gradient
        self._terms: dict[str, list[torch.Tensor]] = {}

    def accumulate(self, sup_loss: torch.Tensor, terms: dict[str, torch.Tensor], group: str = "") -> None:
        """Add this micro-batch's separate gradients to the window's buffers (use instead of `loss.backward()`).

        sup_loss: the supervised loss as it should enter the update (already normalised, and scaled by (1 − w) if the
        recipe does so); terms: {name: unweighted KD term}, λ comes from `weights`. group: which supervised gradient
        this micro-batch's adds to (see `pairs`).
        """
        if set(terms) != set(self.weights):
            raise ValueError(f"SCKD terms {sorted(terms)} do not match the configured {sorted(self.weights)}")
        names = list(self.weights)
        sup = _grads(sup_loss, self.params, retain=True)
        prev_sup = self._sup.get(group)
        self._sup[group] = sup if prev_sup is None else [a.add_(b) for a, b in zip(prev_sup, sup)]
        for k, name in enumerate(names):
            g = _grads(terms[name], self.params + self.term_params[name], retain=k < len(names) - 1)
            prev = self._terms.get(name)
            self._terms[name] = g if prev is None else [a.add_(b) for a, b in zip(prev, g)]

    def step(self) -> dict[str, dict[str, float | bool]]:
        """Decide each term's gate on the accumulated gradients and add g_s + Σ γ_i λ_i g_i into `.grad`.

        Returns {term name: {"cos": c_i, "on": γ_i}} for metrics.jsonl; the buffers are cleared for the next window.
        """
        import torch

        if not self._sup:
            raise RuntimeError("SCKDGate.step() called before accumulate()")
        names = list(self.weights)
        n_shared = len(self.params)
        groups = sorted(set(self.pairs.values()))  # from the configuration: the same on every rank

        def dot(a, b):  # <a, b> over the shared parameters; a missing buffer (no such micro-batch here) counts as zero
            if a is None or b is None:
                return 0.0
            return sum((x.float() * y.float()).sum() for x, y in zip(a, b))

        # one vector [‖g_s‖² of each group, then <g_s, g_1>, ‖g_1‖², <g_s, g_2>, ‖g_2‖², ...] in float32, reduced
        # across ranks in one call
        stats = [dot(self._sup.get(g), self._sup.get(g)) for g in groups]
        for name in names:
            shared = self._terms[name][:n_shared]
            stats.append(dot(self._sup.get(self.pairs[name]), shared))
            stats.append(dot(shared, shared))
        device = self.params[0].device if self.params else None
        vec = torch.stack([torch.as_tensor(s, dtype=torch.float32, device=device) for s in stats])
        if self.reducer is not None:
            vec = self.reducer(vec)
        norms = {g: vec[k].clamp(min=0).sqrt() for k, g in enumerate(groups)}
        report: dict[str, dict[str, float | bool]] = {}
        off = len(groups)
        for k, name in enumerate(names):
            dot_k, sq = vec[off + 2 * k], vec[off + 1 + 2 * k]
            denom = norms[self.pairs[name]] * sq.clamp(min=0).sqrt()
            cos = float(dot_k / denom) if float(denom) > 0 else 0.0
            report[name] = {"cos": cos, "on": cos > self.threshold}
        combined = None
        for group, buf in self._sup.items():  # the update takes every group's supervised gradient
            scale = 1.0 + sum(self.give_back.get(n, 0.0) for n in names
                              if self.pairs[n] == group and not report[n]["on"])
            buf = buf if scale == 1.0 else [g.mul_(scale) for g in buf]
            combined = buf if combined is None else [c.add_(g) for c, g in zip(combined, buf)]
        for name in names:
            self.counter.add(name, report[name]["on"])
            if report[name]["on"]:
                lam = self.weights[name]
                grads = self._terms[name]
                combined = [c.add_(g, alpha=lam) for c, g in zip(combined, grads[:n_shared])]
                _add_to_grad(self.term_params[name], [g * lam for g in grads[n_shared:]])
        _add_to_grad(self.params, combined)
        self.steps += 1
        self._sup, self._terms = {}, {}
        return report

    def on_rates(self) -> dict[str, float]:
        """Fraction of optimizer steps each term was on (for the run summary)."""
        return self.counter.rates()


def _add_to_grad(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Add into `.grad`; `grads` are buffers the gate is done with, so they become `.grad` where there was none."""
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.to(p.dtype)
        else:
            p.grad.add_(g.to(p.dtype))
