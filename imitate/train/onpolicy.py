"""On-policy distillation (`--on-policy λ`): the student writes the answers, the local teacher grades every token.

Off-policy KD trains the student on the teacher's text only; at generation time the student conditions on its own
tokens and its mistakes compound (exposure bias). Here, for a fraction λ of micro-batches (GKD, Agarwal et al. 2024):
1. the student generates an answer to each record's prompt (`generate`: batched, left-padded, KV cache, no_grad,
   `--on-policy-temperature`, at most `--on-policy-max-tokens`, stopping at the student's end-of-turn token);
2. prompt + the student's tokens become the micro-batch (`onpolicy_example`): targets on the generated tokens only,
   end-of-turn included, so the teacher also grades when the student stops;
3. the KD term (`--kd`, any divergence, chunked like the dataset term) is taken on those tokens against the teacher's
   logits at the same positions. No cross-entropy on the student's tokens: they are not a target to imitate.
   --on-policy-ce (the default) also trains (1 - w)·CE on the same records' collected answers (one more forward of
   those), so every record's supervised signal stays and only KD's sequences change; --no-on-policy-ce is GKD's
   loss, KD only, where λ = 1 never sees the collected answers.
Dataset micro-batches keep CE + KD as without --on-policy.

Which micro-batches: a seeded coin per (seed, step, micro-batch index in the window) with P(on-policy) = λ, none before
`--on-policy-warmup` (a fraction of the steps), so every rank — and a resumed run — takes the same decisions without
talking. Generation is seeded the same way (in a forked RNG, so dropout and the rest of training draw the same numbers
as without it).

The loss denominator (loop.py's token-sum convention): the positions that carry a loss in the window, over all ranks.
An on-policy micro-batch weighs what it would weigh as a dataset micro-batch: with --on-policy-ce (or --sckd) its
records' reference answers count (dataset targets + reference targets), and its KD sum is scaled by reference /
generated tokens (`kd_scale`), so a window of on-policy micro-batches trains (1 - w)·(CE per reference token) + w·(KD
per generated token), the plain GKD step's loss. (Counting the generated tokens in the denominator as well, as
imitate did until #27, halved every on-policy micro-batch's gradient against a dataset one's: the student learned at
about half the rate from the on-policy half-way point on.) With --no-on-policy-ce the generated tokens are the count:
w·(KD per generated token). Generated lengths are known only after generation, so a window with on-policy
micro-batches costs one small all-reduce.

SCKD pairing: each KD kind is its own gated term — `logit_kd` on dataset micro-batches, `onpolicy_kd` on on-policy
ones — and each is compared with the CE gradient of the SAME prompts' collected answers: for `logit_kd` the dataset
micro-batches' own CE (as without --on-policy), for `onpolicy_kd` the CE of the on-policy micro-batches' records (one
extra forward + gradient of the collected answers, --sckd only). Why these pairs: the gate's question is "does the
teacher's signal on these prompts agree with what the data says for these prompts"; against the window's whole CE
the on-policy decision would depend on unrelated prompts. That reference CE is SCKD's supervised term, so it trains
like every g_s, and an off `onpolicy_kd` gives its weight back to it (sckd.py's give_back): an off gate is then SFT
on those prompts at full weight instead of a wasted step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from imitate.train.context import add_onpolicy_views
from imitate.train.data import IGNORE, Example, collate, shift_targets
from imitate.train.distill import ONPOLICY


def divergence_warning(on_policy: float, kd: str) -> str | None:
    """The warning for on-policy KD with reverse KL, or None. On the quality benchmark's `sums` task (issue #27) it
    pulled students below SFT, some seeds collapsing, in imitate and in a plain GKD loop alike, where forward KL on the
    same schedule stayed level with SFT (docs/benchmarks.md#on-policy-divergence). Against a near-deterministic
    teacher, reverse KL charges the student log(1/p) for every bit of mass on a token the teacher all but rules out
    (p ~ e^-15 there), so its loss is set by the teacher's tail, not by the student's mistakes."""
    if not (on_policy > 0 and kd == "reverse-kl"):
        return None
    return ("--kd reverse-kl with --on-policy: in the quality benchmark, reverse KL on the student's own answers "
            "pulled students below an SFT run of the same steps (some seeds collapsed; a plain GKD loop did the same), "
            "where forward-kl (the default) did not. Keep this run only if it beats SFT on held-out prompts; see "
            "docs/benchmarks.md#on-policy-divergence")


def ce_warning(on_policy: float, on_policy_ce: bool, sckd: bool) -> str | None:
    """The warning for λ 1 without the collected answers' CE (and without SCKD, which trains it), or None. In the
    quality benchmark at 10 seeds (issue #27) that loss ended below SFT on `numbers`, `lists` and `dates`, in imitate
    and in the plain GKD reference loop alike; with the CE it did not (docs/benchmarks.md#on-policy-normalisation)."""
    if not (on_policy >= 1.0 and not on_policy_ce and not sckd):
        return None
    return ("--on-policy 1 with --no-on-policy-ce: after the warm-up the student never trains on the collected answers "
            "again; in the quality benchmark that ended below an SFT run of the same steps on 3 of 5 tasks (a plain "
            "GKD loop too), where keeping the CE (the default) did not. Keep this run only if it beats SFT on "
            "held-out prompts; see docs/benchmarks.md#on-policy-normalisation")


def warmup_steps(fraction: float, total_steps: int) -> int:
    """Optimizer steps trained off-policy before the first on-policy micro-batch."""
    return int(fraction * total_steps)


def choose(seed: int, step: int, window: Sequence[Any], lam: float, first_step: int) -> list[bool]:
    """Which micro-batches of the window (global order, all ranks) are on-policy at 0-based `step`: a seeded coin with
    P = lam each; never a padding micro-batch (None) nor a step before `first_step`. Pure: every rank agrees."""
    if lam <= 0 or step < first_step:
        return [False] * len(window)
    return [b is not None and random.Random(f"on-policy {seed} {step} {j}").random() < lam
            for j, b in enumerate(window)]


def prompt_of(ex: Example) -> list[int]:
    """The prompt an example's final answer was written to: its tokens up to the first token of the last run of
    targets (the rendering of the earlier turns plus the assistant header, as `data.assistant_spans` found it)."""
    t = len(ex.labels) - 1
    while t >= 0 and ex.labels[t] == IGNORE:
        t -= 1
    while t >= 0 and ex.labels[t] != IGNORE:
        t -= 1
    return list(ex.input_ids[: t + 2])  # labels[t + 1] is the first target: the token at t + 2 is the first answer token


def onpolicy_example(prompt: list[int], answer: list[int], where: str, max_length: int) -> Example:
    """prompt + the student's answer, targets on the answer tokens only, cut to max_length."""
    ids = (list(prompt) + list(answer))[:max_length]
    mask = ([False] * len(prompt) + [True] * len(answer))[: len(ids)]
    return Example(ids, shift_targets(ids, mask), where + " (on-policy)")


def cut_implausible(distiller: Any, batch: dict, min_p: float) -> int:
    """--on-policy-cut: in an on-policy micro-batch, drop the targets after the first sampled token whose teacher
    probability is below min_p times the teacher's most likely token's at that position (z_token - z_max <
    log min_p, temperature 1). The position that sampled it keeps its target: its prefix is one the teacher
    accepts, and its distribution says what should have come instead. Each answer is a run of targets (packed
    rows hold several), and a cut ends at its run. The teacher's pass stays in the batch for the loss
    (`Distiller.teacher_view`); returns how many sequences were cut."""
    import math

    import torch

    hidden, head, n_vocab = distiller.teacher_view(batch)
    labels = batch["labels"]
    at = (labels != IGNORE).nonzero(as_tuple=True)
    if not at[0].numel():
        return 0
    h = hidden[tuple(i.to(hidden.device) for i in at)]
    tokens = labels[at].to(h.device)
    chunk, gaps = distiller.cfg.kd_chunk_size, []
    with torch.no_grad():
        for a in range(0, h.shape[0], chunk):
            z = head(h[a : a + chunk])[:, :n_vocab].float()
            gaps.append(z.gather(1, tokens[a : a + z.shape[0], None])[:, 0] - z.max(1).values)
    bad = (torch.cat(gaps) < math.log(min_p)).tolist() if min_p > 0 else [False] * len(tokens)
    cut, drop, prev, cutting = 0, [], None, False
    for r, c, b in zip(at[0].tolist(), at[1].tolist(), bad):
        if prev != (r, c - 1):  # a new run of targets: a new answer
            cutting = False
        if cutting:
            drop.append((r, c))
        elif b:
            cutting, cut = True, cut + 1
        prev = (r, c)
    if drop:
        r, c = zip(*drop)
        labels[list(r), list(c)] = IGNORE
    return cut


def generate(model: Any, prompts: list[list[int]], *, pad_id: int, stop_ids: Sequence[int], max_tokens: int,
             temperature: float, seed: int) -> tuple[list[list[int]], list[bool]]:
    """The student's answers to `prompts` (token ids), one batched `generate` call: left-padded, KV cache, no_grad, in
    eval mode (no dropout), seeded in a forked RNG. Returns (answers, hit_cap): each answer ends with its stop token
    when the model wrote one (everything after it is dropped); hit_cap[i] is True when it wrote none within
    max_tokens (or the model's context)."""
    import torch
    from transformers import GenerationConfig

    from imitate.models import left_pad

    input_ids, mask = left_pad(prompts, pad_id)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context:
        max_tokens = max(1, min(max_tokens, context - input_ids.shape[1]))
    sample = temperature > 0
    # explicit values so the model's generation_config (top-k, penalties) cannot leak in: the student's own distribution
    knobs = {"temperature": float(temperature), "top_k": 0, "top_p": 1.0} if sample else {}
    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=sample, repetition_penalty=1.0, **knobs,
                           eos_token_id=list(stop_ids), pad_token_id=pad_id, use_cache=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    finally:
        model.train(was_training)
    stop = set(stop_ids)
    answers, capped = [], []
    for row in out[:, input_ids.shape[1]:].tolist():
        end = next((t for t, tok in enumerate(row) if tok in stop), None)
        answers.append(row if end is None else row[: end + 1])
        capped.append(end is None)
    return answers, capped


COUNTS = ("sequences", "tokens", "capped", "graded", "cut")  # per on-policy micro-batch, summed over ranks and steps


class OnPolicy:
    """The on-policy side of a training run: picks micro-batches, generates, builds their batches, counts.

    Built by loop.run when --on-policy > 0; `kinds` and `batch` are called per window, `denominators` once the window's
    micro-batches exist, `log` per step, `summary` at the end.
    """

    def __init__(self, cfg: Any, tokenizer: Any, total_steps: int, stop_ids: list[int]):
        self.cfg, self.stop_ids = cfg, stop_ids
        self.pad_id = tokenizer.pad_token_id
        self.first_step = warmup_steps(cfg.on_policy_warmup, total_steps)
        # the records' own answers of on-policy prompts take part: as SCKD's paired CE, or as --on-policy-ce's CE
        # (not with --kd-weight 1, where CE weighs nothing)
        self.references = bool(cfg.sckd or (cfg.on_policy_ce and cfg.kd_weight < 1))
        self.totals = {"micro": 0, "onpolicy": 0, **dict.fromkeys(COUNTS, 0), "gen_s": 0.0, "step_s": 0.0}
        self._step: dict = {}
        self._terms: list[str] = []

    def kinds(self, step: int, window: Sequence[Any]) -> list[bool]:
        self._step = {"gen_s": 0.0, "flags": choose(self.cfg.seed, step, window, self.cfg.on_policy,
                                                     self.first_step), "real": sum(b is not None for b in window)}
        return self._step["flags"]

    def batch(self, accelerator: Any, model: Any, examples: list[Example], step: int, j: int,
              distiller: Any = None) -> dict:
        """The on-policy micro-batch for `examples` (micro-batch j of the window at `step`), with the dataset version
        under "reference" when --sckd pairs it or --on-policy-ce trains it (see the module doc). With --on-policy-cut
        the distiller's teacher grades the answers first and the targets after an implausible token are dropped."""
        t0 = time.time()
        prompts = [prompt_of(ex) for ex in examples]
        with accelerator.autocast():
            answers, capped = generate(
                accelerator.unwrap_model(model), prompts, pad_id=self.pad_id, stop_ids=self.stop_ids,
                max_tokens=self.cfg.on_policy_max_tokens, temperature=self.cfg.on_policy_temperature,
                seed=(self.cfg.seed * 1_000_003 + step * 1_009 + j) % 2**63)
        exs = [onpolicy_example(p, a, ex.where, self.cfg.max_length) for p, a, ex in zip(prompts, answers, examples)]
        add_onpolicy_views(exs, examples, answers)  # records with context: the teacher grades with it in front
        out = collate(exs, pad_id=self.pad_id, packing=self.cfg.packing)
        cut = cut_implausible(distiller, out, self.cfg.on_policy_cut) if self.cfg.on_policy_cut and distiller else 0
        out["onpolicy"] = {"sequences": len(answers), "tokens": sum(map(len, answers)), "capped": sum(capped),
                           "graded": int((out["labels"] != IGNORE).sum()), "cut": cut}
        if self.references:
            out["reference"] = collate(examples, pad_id=self.pad_id, packing=self.cfg.packing)
        self._step["gen_s"] += time.time() - t0
        return out

    def denominators(self, accelerator: Any, micro: list[dict], window: Sequence[Any], targets: Sequence[int],
                     terms: list[str]) -> tuple[int, list[float] | None]:
        """(the window's loss denominator, per-term token counts for the logged per-token values: [CE, *terms]); sets
        `kd_scale`. The denominator: dataset targets + the on-policy records' reference targets with references, else
        dataset targets + graded tokens (module docstring).

        Dataset targets come from the batch plan (every rank knows the window); generated tokens are summed over the
        ranks (one all-reduce, only in windows that hold an on-policy micro-batch)."""
        import torch

        flags = self._step["flags"]
        data = sum(targets[i] for b, on in zip(window, flags) if b is not None and not on for i in b)
        self._terms = list(terms)
        self._step["kd_scale"] = 1.0
        if not any(flags):  # today's window: the logged values divide by n_targets as without --on-policy
            self._step["counts"] = [data] + [0 if name == ONPOLICY else data for name in terms]
            return data, None
        ref = sum(targets[i] for b, on in zip(window, flags) if on for i in b) if self.references else 0
        own = [m["onpolicy"] for m in micro if "onpolicy" in m]
        local = torch.tensor([[s[k] for k in COUNTS] for s in own] or [[0] * len(COUNTS)],
                             dtype=torch.float64, device=accelerator.device).sum(0)
        seqs, gen, capped, graded, cut = (int(x) for x in accelerator.reduce(local, reduction="sum").tolist())
        counts = [data + ref] + [graded if name == ONPOLICY else data for name in terms]
        self._step.update(sequences=seqs, tokens=gen, capped=capped, graded=graded, cut=cut, counts=counts)
        if self.references:  # the on-policy records weigh their reference tokens, as dataset records do
            self._step["kd_scale"] = ref / graded if graded else 1.0
            return data + ref, counts
        return data + graded, counts

    @property
    def kd_scale(self) -> float:
        """The factor on this window's on-policy KD sums in the loss (see the module docstring; 1 without
        references). Set by `denominators`."""
        return self._step.get("kd_scale", 1.0)

    def present(self, gates: dict) -> dict:
        """The SCKD gate decisions of the terms this window had micro-batches for (an absent term is no decision)."""
        flags, real = self._step["flags"], self._step["real"]
        has_on, has_data = any(flags), sum(flags) < real
        return {n: g for n, g in gates.items() if (has_on if n == ONPOLICY else has_data)}

    def log(self, row: dict, step_s: float) -> None:
        """This step's on-policy numbers into the metrics row (generation time is this rank's, rank 0 logs); the
        per-token values of terms no micro-batch of the window had (and of CE, when there was none) are dropped."""
        s, t = self._step, self.totals
        counts = s.get("counts")
        if counts is not None:
            for name, n in zip(["loss", *self._terms], counts):
                if not n:
                    row.pop(name, None)
        n_on = sum(s["flags"])
        t["micro"] += s["real"]
        t["onpolicy"] += n_on
        t["gen_s"] += s["gen_s"]
        t["step_s"] += step_s
        row["onpolicy/share"] = n_on / max(s["real"], 1)
        if n_on:
            for k in COUNTS:
                t[k] += s[k]
            row["onpolicy/gen_tokens"] = s["tokens"] / max(s["sequences"], 1)
            row["onpolicy/cap_hit"] = s["capped"] / max(s["sequences"], 1)
            if self.cfg.on_policy_cut:
                row["onpolicy/cut"] = s["cut"] / max(s["sequences"], 1)
        row["gen_s"], row["train_s"] = s["gen_s"], step_s - s["gen_s"]

    def summary(self, rows: list[dict]) -> dict:
        """Run totals (this process; a resumed run's earlier steps from its metrics rows for the share)."""
        t = self.totals
        shares = [r["onpolicy/share"] for r in rows if "onpolicy/share" in r]
        return {"lambda": self.cfg.on_policy, "warmup_steps": self.first_step,
                "temperature": self.cfg.on_policy_temperature, "max_tokens": self.cfg.on_policy_max_tokens,
                "share": sum(shares) / len(shares) if shares else 0.0,
                "mean_gen_tokens": t["tokens"] / t["sequences"] if t["sequences"] else None,
                "cap_hit_rate": t["capped"] / t["sequences"] if t["sequences"] else None,
                "cut": self.cfg.on_policy_cut,
                "cut_rate": t["cut"] / t["sequences"] if t["sequences"] else None,
                "graded_share": t["graded"] / t["tokens"] if t["tokens"] else None,
                "gen_s": t["gen_s"], "train_s": t["step_s"] - t["gen_s"]}
