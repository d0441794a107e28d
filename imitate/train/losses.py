"""Pure loss functions for training: divergences, chunked CE / logit KD, gray-box top-K KD, feature MSE.

Shapes: N = number of target tokens, V = (real) vocabulary size, H = hidden width, B×L = batch × sequence, K = top-K width.

Memory: an LLM's float32 logits are the biggest tensors of a training step (N × V × 4 bytes: 8k tokens × 128k vocab = 4 GiB,
twice that with a teacher, twice again for the gradient). The chunked losses below therefore take *hidden states* and the
output head, and project to logits `chunk_size` tokens at a time inside one autograd Function that computes each chunk's
gradient right away (see `_chunked_head_function`): at no time, forward or backward, do more than one chunk's logits exist.

Sums, not means: every loss returns `(sum over target tokens, number of target tokens)` so the caller can divide by the
number of target tokens of the whole accumulation window (one normalisation for all micro-batches, as if it were one batch).

torch is imported inside functions so that `import imitate.train.losses` stays light.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from imitate.errors import ImitateError
from imitate.train.data import IGNORE

if TYPE_CHECKING:  # pragma: no cover
    import torch


# name -> beta of `divergence`; the `--kd` choices. The JSD entry's beta is replaced by --jsd-beta.
DIVERGENCES = {"forward-kl": 0.0, "reverse-kl": 1.0, "jsd": 0.5}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] labels -> [B, L] labels aligned with the positions that predict them.

    A causal LM's hidden state at position t predicts the token at t+1, so the target of position t is `labels[:, t+1]`;
    the last position has no target (-100). Every chunked loss here expects labels aligned this way.
    """
    import torch.nn.functional as F

    return F.pad(labels, (0, 1), value=IGNORE)[:, 1:]


def divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.0, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token divergence between teacher and student distributions at `temperature`.

    student_logits, teacher_logits: [..., V] (any dtype; computed in float32). Returns [...] float32 (one value per token).

    With p = softmax(teacher_logits / T), q = softmax(student_logits / T):
      beta = 0:      forward KL(p‖q) = Σ p (log p − log q)    (mode-covering; what classic KD minimises)
      beta = 1:      reverse KL(q‖p) = Σ q (log q − log p)    (mode-seeking)
      0 < beta < 1:  generalized JSD(β) = β·KL(p‖m) + (1−β)·KL(q‖m) with the mixture m = β·p + (1−β)·q
                     (as in GKD, Agarwal et al. 2024). Symmetric in p, q at β = 0.5, where it is the usual JSD (≤ log 2).
                     The mixture form tends to 0 at both ends, so β = 0 and β = 1 are defined as the two KLs above.
    The T² factor is NOT applied here (see `chunked_kd_loss`). Logits must be finite (cut padded columns first).
    """
    import torch
    import torch.nn.functional as F

    if not 0.0 <= beta <= 1.0:
        raise ImitateError(f"JSD beta must be in [0, 1], got {beta}", hint="set --jsd-beta between 0 and 1")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    # log m computed stably from the log-probabilities: log(β p + (1−β) q)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def sparse_topk_divergence(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Forward KL from a teacher known only by its top-K log-probabilities, with an explicit "rest" bucket.

    student_logits: [N, V]; topk_ids: [N, K] int64 (-1 = empty slot); topk_logprobs: [N, K] (teacher log p, any slot
    value where the id is -1). Returns [N] float32.

    Missing mass: the K known teacher probabilities p_1..p_K sum to P ≤ 1; the rest of the vocabulary holds 1 − P,
    spread over ids we do not know. We compare two distributions over K+1 outcomes — the K ids plus one "rest" bucket —
    teacher (p_1..p_K, 1 − P) and student (q_1..q_K, 1 − Q), where q is the student's full softmax at those ids:
        D = Σ_k p_k (log p_k − log q_k) + (1 − P)(log(1 − P) − log(1 − Q)).
    Why this and not renormalising the top-K: renormalising throws away how confident the teacher is (a flat teacher and a
    peaked one look alike after renormalising) and lets the student put any mass outside the K ids for free; the rest
    bucket keeps both, is a true KL (≥ 0, = 0 iff the student matches the teacher on the K ids and on the total of the rest),
    and it is a lower bound of the full KL(p‖q) (coarsening can only lose information). Teacher ids dropped because they
    could not be mapped simply fall into the rest bucket. No temperature: softening the teacher needs its full normaliser,
    which top-K log-probabilities do not give.
    """
    import torch
    import torch.nn.functional as F

    log_q_all = F.log_softmax(student_logits.float(), dim=-1)
    valid = topk_ids >= 0
    log_q = log_q_all.gather(-1, topk_ids.clamp(min=0))  # [N, K]
    log_p = topk_logprobs.float().clamp(max=0.0)
    p = torch.where(valid, log_p.exp(), torch.zeros_like(log_p))
    known = torch.where(valid, p * (log_p - log_q), torch.zeros_like(log_p)).sum(-1)
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_sum = torch.where(valid, log_q.exp(), torch.zeros_like(log_q)).sum(-1)
    # log(1 − Q) from log-probabilities without cancellation when Q → 1: log1p(−Q), floored so 0·log 0 stays finite
    log_q_rest = torch.log1p(-q_sum.clamp(max=1.0 - 1e-7))
    log_p_rest = torch.log(p_rest.clamp(min=1e-30))
    rest = torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), torch.zeros_like(p_rest))
    return known + rest


@functools.cache
def _chunked_head_function():
    """The autograd Function behind the chunked losses (built on first use, so torch is imported lazily).

    forward(hidden [N, H], weight [V', H], bias [V'] | None, chunk_loss, chunk_size, vocab_size, needs_grad) -> scalar:
    Σ over chunks of `chunk_loss(float32 logits [c, vocab_size], start, end)` (a `_WritesGrad` loss writes its own
    gradient instead: `_chunk_in_place`). When a gradient is needed, each chunk is
    differentiated right away (a local graph over that chunk's logits only) and just the gradient with respect to the
    chunk's hidden rows ([c, H], small) is kept, plus the head's weight gradient when the head is trainable. The chunk's
    logits are freed before the next chunk starts, so the peak is one chunk's logits (+ softmax and gradient), forward
    and backward alike, and the backward is one multiply by the incoming scalar: no recompute, unlike checkpointing.
    Backward may run several times (retain_graph=True, as the SCKD gate does). Double backward is not supported.
    """
    import torch

    class ChunkedHeadLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, chunk_loss, chunk_size, vocab_size, needs_grad):
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grads = [
                torch.zeros_like(t, dtype=torch.float32) if need else None
                for t, need in zip((hidden, weight, bias), needs_grad)
            ]
            for start in range(0, hidden.shape[0], chunk_size):
                end = min(start + chunk_size, hidden.shape[0])
                if isinstance(chunk_loss, _WritesGrad):
                    loss, local = _chunk_in_place(hidden[start:end].detach(), weight.detach(),
                                                  bias.detach() if bias is not None else None,
                                                  chunk_loss, start, end, vocab_size, needs_grad)
                else:
                    with torch.enable_grad():
                        h = hidden[start:end].detach().requires_grad_(needs_grad[0])
                        w = weight.detach().requires_grad_(needs_grad[1])
                        b = bias.detach().requires_grad_(needs_grad[2]) if bias is not None else None
                        loss = chunk_loss(torch.nn.functional.linear(h, w, b)[:, :vocab_size].float(), start, end)
                        wanted = [t for t, need in zip((h, w, b), needs_grad) if need]
                        local = list(torch.autograd.grad(loss, wanted)) if wanted else []
                total += loss.detach()
                del loss  # drops the chunk's graph, and with it the chunk's logits
                if needs_grad[0]:
                    grads[0][start:end] = local.pop(0)
                for k in (1, 2):
                    if needs_grad[k]:
                        grads[k] += local.pop(0)
            ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
            ctx.needs = needs_grad
            ctx.dtypes = tuple(t.dtype if t is not None else None for t in (hidden, weight, bias))
            return total

        @staticmethod
        def backward(ctx, grad_out):
            out = [
                (g * grad_out).to(dt) if need else None for g, need, dt in zip(ctx.saved_tensors, ctx.needs, ctx.dtypes)
            ]
            return out[0], out[1], out[2], None, None, None, None

    return ChunkedHeadLoss


class _WritesGrad:
    """A chunk loss that needs no autograd: `fn(z, start, end, grad)` gets the chunk's float32 logits [c, vocab] (its
    own buffer), returns the chunk's loss sum and, when `grad`, leaves d loss / d z in `z`."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn


def _chunk_in_place(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, loss: _WritesGrad, start: int,
                    end: int, vocab_size: int, needs_grad: tuple) -> tuple[torch.Tensor, list]:
    """One chunk of a `_WritesGrad` loss: its sum and its gradients [w.r.t. h, w, b as `needs_grad` asks]. The chunk
    holds the float32 logits buffer (the loss may add buffers of its own) and one copy of the gradient in the head's
    compute dtype; autograd would keep the logits, each intermediate and the gradient. The products run in the dtype
    of the forward's logits (under autocast the same lower precision as autograd's backward of the linear)."""
    import torch

    logits = torch.nn.functional.linear(h, w, b)[:, :vocab_size]
    dtype = logits.dtype
    z = logits.float()
    del logits
    total = loss.fn(z, start, end, any(needs_grad))
    if not any(needs_grad):
        return total, []
    g = z.to(dtype)
    del z
    local = []
    if needs_grad[0]:
        local.append(g @ w[:vocab_size].to(dtype))
    if needs_grad[1]:
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        gw[:vocab_size] = g.T @ h.to(dtype)
        local.append(gw)
    if needs_grad[2]:
        gb = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
        gb[:vocab_size] = g.float().sum(0)
        local.append(gb)
    return total, local


def _ce_writer(targets: torch.Tensor) -> _WritesGrad:
    """Cross-entropy against `targets` [N]: d CE / d z = softmax(z) − one-hot, written over z."""
    import torch

    def fn(z: torch.Tensor, start: int, end: int, grad: bool) -> torch.Tensor:
        t = targets[start:end]
        lse = torch.logsumexp(z, dim=-1)
        total = (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
        if grad:
            z.sub_(lse[:, None]).exp_()
            z[torch.arange(z.shape[0], device=z.device), t] -= 1.0
        return total

    return _WritesGrad(fn)


def _forward_kl_writer(teacher_logits: Callable, temperature: float) -> _WritesGrad:
    """Σ KL(p‖q) with p = softmax(teacher/T), q = softmax(z/T) (`divergence` at beta 0, before any T² factor);
    d / d z = (q − p) / T, written over z. teacher_logits(start, end, device) -> a float32 tensor the loss may
    overwrite. Three float32 [c, vocab] buffers at most: z, the teacher's, and log p − log q while the sum is taken."""
    import torch

    def fn(z: torch.Tensor, start: int, end: int, grad: bool) -> torch.Tensor:
        t = teacher_logits(start, end, z.device)
        if temperature != 1.0:
            z.div_(temperature)
            t.div_(temperature)
        t.sub_(torch.logsumexp(t, dim=-1, keepdim=True))  # log p
        z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # log q
        gap = t - z
        t.exp_()  # p
        total = gap.mul_(t).sum()
        del gap
        if grad:
            z.exp_().sub_(t)  # q − p
            if temperature != 1.0:
                z.div_(temperature)
        return total

    return _WritesGrad(fn)


def _head_params(head: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] | None) of an output head given as a weight tensor or an nn.Linear-like module."""
    import torch

    if isinstance(head, torch.Tensor):
        return head, None
    if hasattr(head, "base_layer"):
        raise ImitateError(
            "the output head (lm_head) is wrapped by an adapter; the chunked loss needs a plain linear head",
            hint="leave lm_head out of --target-modules, or train it fully (--full)",
        )
    return head.weight, getattr(head, "bias", None)


def _chunked_head_loss(
    hidden: torch.Tensor, head: Any, chunk_loss: Callable | _WritesGrad, chunk_size: int, vocab_size: int | None
) -> torch.Tensor:
    """Run `_chunked_head_function` on [N, H] rows; grads flow to `hidden` and to the head when they require grad.
    chunk_loss: a function of (float32 logits, start, end) differentiated by autograd, or a `_WritesGrad` loss
    (cross-entropy, forward KL) that writes its own gradient over the logits: a fraction of autograd's peak."""
    import torch

    weight, bias = _head_params(head)
    if chunk_size < 1:
        raise ImitateError(
            f"chunk size must be >= 1, got {chunk_size}", hint="set --kd-chunk-size to a positive number"
        )
    vocab_size = vocab_size or weight.shape[0]
    if vocab_size > weight.shape[0]:
        raise ImitateError(f"vocab size {vocab_size} is larger than the output head's {weight.shape[0]} rows")
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    # with no gradient wanted (eval, or under no_grad) the Function only sums the chunks' losses
    return _chunked_head_function().apply(hidden, weight, bias, chunk_loss, chunk_size, vocab_size, needs)


def _target_rows(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, H] hidden + [B, L] bool mask -> ([N, H] rows where mask is True, [N] flat row indices)."""
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx.to(hidden.device)), idx


def chunked_ce(
    hidden: torch.Tensor, head: Any, labels: torch.Tensor, *, chunk_size: int = 256, vocab_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over target tokens, projecting `hidden` to logits chunk by chunk.

    hidden: [B, L, H] final hidden states (what the output head reads); head: [V', H] weight or nn.Linear;
    labels: [B, L] targets aligned with `hidden` (as `data.shift_targets` / `shift_labels` make them), -100 = no target.
    Returns (scalar float32 sum of −log q(label), number of target tokens).
    """
    rows, idx = _target_rows(hidden, labels != IGNORE)
    targets = labels.reshape(-1)[idx].to(hidden.device)
    return _chunked_head_loss(rows, head, _ce_writer(targets), chunk_size, vocab_size), int(idx.numel())


def forward_ce(
    model: Any, batch: dict, *, vocab_size: int | None = None, chunk_size: int = 256
) -> tuple[torch.Tensor, Any]:
    """THE cross-entropy of training, evaluation and KD: forward one batch, return (CE summed over target tokens, the
    model outputs with `hidden_states`).

    batch: `data.collate` output (labels [B, L] already shifted). The model builds no [tokens × vocab] logits
    (`logits_to_keep=1`); `chunked_ce` projects the final hidden states of the target positions through the output head
    chunk by chunk, cut to `vocab_size` (the real vocabulary: padded head rows, which no token maps to, never enter the
    softmax). SFT, KD's CE term, the held-out loss of `imitate train` and `imitate eval`'s answer NLL all come from here,
    so their numbers compare.
    """
    from imitate.train.data import model_inputs
    from imitate.train.distill import takes_logits_to_keep, unwrap

    extra = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    out = model(**model_inputs(batch), **extra, output_hidden_states=True, use_cache=False)
    head = unwrap(model).get_output_embeddings()
    ce, _ = chunked_ce(out.hidden_states[-1], head, batch["labels"], chunk_size=chunk_size, vocab_size=vocab_size)
    return ce, out


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_head: Any,
    teacher_hidden: torch.Tensor,
    teacher_head: Any,
    labels: torch.Tensor,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int = 256,
    vocab_size: int | None = None,
    t2: bool = True,
) -> tuple[torch.Tensor, int]:
    """Logit KD term summed over target tokens: (T² ·) Σ_tokens divergence(student/T, teacher/T, beta).

    student_hidden: [B, L, Hs] (grad flows); student_head: [V_s, Hs] weight or nn.Linear;
    teacher_hidden: [B, L, Ht] (frozen; may sit on another device/dtype); teacher_head: [V_t, Ht] weight or nn.Linear;
    labels: [B, L] aligned with the hidden states (`data.shift_targets`); only positions with a target (≠ −100) count.
    vocab_size: the real vocabulary (`imitate.train.vocab.real_vocab_size`): both heads' logits are cut to it, so widths that
    differ only by embedding padding compare the same tokens. Never zero-padded.
    t2: multiply by T² (Hinton et al. 2015) so the gradient's scale does not shrink as 1/T² when T grows; on by default.
    Returns (scalar float32 sum, number of target tokens).
    """
    import torch

    if temperature <= 0:
        raise ImitateError(f"temperature must be > 0, got {temperature}", hint="set --temperature to a positive number")
    rows, idx = _target_rows(student_hidden, labels != IGNORE)
    with torch.no_grad():
        t_rows = (
            teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, idx.to(teacher_hidden.device))
        )
    t_weight, t_bias = _head_params(teacher_head)
    vocab = vocab_size or min(t_weight.shape[0], _head_params(student_head)[0].shape[0])

    def teacher_logits(start, end, device):
        with torch.no_grad():
            t_logits = torch.nn.functional.linear(t_rows[start:end], t_weight, t_bias)[:, :vocab]
            return t_logits.to(device=device, dtype=torch.float32)

    total = _chunked_head_loss(rows, student_head, kd_chunk_loss(teacher_logits, beta, temperature), chunk_size, vocab)
    return (total * temperature**2 if t2 else total), int(idx.numel())


def kd_chunk_loss(teacher_logits: Callable, beta: float, temperature: float) -> Callable | _WritesGrad:
    """The chunk loss of a logit-KD term (for `_chunked_head_loss`) against `teacher_logits(start, end, device)`, a
    float32 [c, vocab] tensor the loss may overwrite: forward KL (beta 0, the default) writes its gradient by hand
    (`_forward_kl_writer`); the other divergences go through autograd."""
    if beta == 0.0:
        return _forward_kl_writer(teacher_logits, temperature)

    def chunk_loss(s_logits, start, end):
        return divergence(s_logits, teacher_logits(start, end, s_logits.device), beta, temperature).sum()

    return chunk_loss


def sparse_topk_kd(
    student_hidden: torch.Tensor,
    student_head: Any,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    chunk_size: int = 256,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Gray-box KD term from collected teacher top-K log-probabilities, summed over positions that have them.

    student_hidden: [B, L, H]; student_head: [V, H] weight or nn.Linear;
    topk_ids: [B, L, K] int64 aligned with the hidden positions (row t = the teacher's distribution for the token that
    position t predicts; -1 = empty slot; a row of all -1 = no teacher data there, e.g. prompt tokens);
    topk_logprobs: [B, L, K] float. Build both with `align_logprobs`. Missing mass: see `sparse_topk_divergence`.
    Returns (scalar float32 sum, number of positions with teacher data).
    """
    rows, idx = _target_rows(student_hidden, (topk_ids >= 0).any(-1))
    ids = topk_ids.reshape(-1, topk_ids.shape[-1])[idx].to(student_hidden.device)
    lps = topk_logprobs.reshape(-1, topk_logprobs.shape[-1])[idx].to(student_hidden.device)

    def chunk_loss(logits, start, end):
        return sparse_topk_divergence(logits, ids[start:end], lps[start:end]).sum()

    return _chunked_head_loss(rows, student_head, chunk_loss, chunk_size, vocab_size), int(idx.numel())


def feature_mse(
    student_h: torch.Tensor, teacher_h: torch.Tensor, regressor: Callable, mask: torch.Tensor, *, normalize: bool = True
) -> tuple[torch.Tensor, int]:
    """FitNets hint loss: Σ over masked tokens of mean_d (regressor(student_h) − target)², in float32.

    student_h: [B, L, Hs] (grad flows); teacher_h: [B, L, Ht] (detached; moved to the student's device);
    regressor: maps [..., Hs] -> [..., Ht] (a `FeatureRegressors` entry); mask: [B, L] bool, True = count this token.
    normalize: the target is the teacher state standardised per token (zero mean, unit variance over its Ht features,
    no affine). Raw hidden states of deep layers have norms in the tens, so an unnormalised MSE starts near 30+ and
    swamps the CE at any useful weight; standardised, it starts near 1 and the regressor learns the scale it needs.
    Returns (scalar float32 sum of per-token MSE, number of tokens).
    """
    import torch.nn.functional as F

    s, idx = _target_rows(student_h, mask)
    t = teacher_h.detach().reshape(-1, teacher_h.shape[-1]).index_select(0, idx.to(teacher_h.device))
    mapped = regressor(s.to(_param_dtype(regressor, s.dtype))).float()
    t = t.to(device=mapped.device, dtype=mapped.dtype)
    if normalize:
        t = F.layer_norm(t, t.shape[-1:])
    diff = mapped - t
    return diff.pow(2).mean(-1).sum(), int(idx.numel())


def _param_dtype(module: Any, default):
    for p in getattr(module, "parameters", list)():
        return p.dtype
    return default
