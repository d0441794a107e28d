"""The cross-tokenizer KD term (white-box): the teacher's distribution merged onto the student's vocabulary, compared
at the shared boundaries that `imitate.train.xtok` pairs up.

Shapes: N = aligned positions, V_s / V_t = the student's / teacher's real vocabulary, H_s / H_t = hidden widths.

At one position, with p = softmax(teacher / T) and q = softmax(student / T):
- MATCHED mass: every teacher token the projection maps (`xtok.Projector.teacher_map`, plus rule 1: the teacher's own
  next token counts for the student's) adds its p to one student id: p'[s] = Σ p[t → s]. The student tokens that
  receive mass form the image I. Compared as distributions over I ∪ {rest}: teacher (p'[I], p_unmatched), student
  (q[I], 1 − q[I].sum()) with the divergence of `--kd` (forward KL by default; the same β convention as
  `losses.divergence`). It is a KL between coarsened distributions, so ≥ 0 and 0 iff they agree on I and the rest.
- UNMATCHED mass, ULD (Boizard et al. 2024, "Towards cross-tokenization distillation"): the teacher's probabilities
  of the tokens that map nowhere and the student's probabilities of the tokens outside I, each sorted in decreasing
  order (zero-padded to one width), compared by Σ_k |a_k − b_k| — the Wasserstein distance under a uniform cost, which
  needs no correspondence between the two vocabularies.
- The term is MATCHED + ULD_WEIGHT · UNMATCHED. ULD_WEIGHT = 1: the two parts are in comparable units (the rest
  bucket already charges the total unmatched mass in nats; ULD adds its shape, bounded by 2) and with identical
  tokenizers the unmatched part is exactly 0, so the term equals today's logit KD (tested to 1e-6).
Memory: per chunk of c positions, the teacher's [c, V_t] and the student's [c, V_s] logits plus the merged [c, V_s]
(and, only when some mass is unmatched, two sorted copies): about what same-tokenizer KD holds for one chunk.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from imitate.errors import ImitateError

if TYPE_CHECKING:  # pragma: no cover
    import torch

ULD_WEIGHT = 1.0  # weight of the unmatched (ULD) part against the matched (KL) part; see the module doc


def log_divergence(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Divergence between two distributions given as log-probabilities [N, K] (−inf = no mass; rows sum to 1).

    beta = 0: KL(p‖q); beta = 1: KL(q‖p); in between the generalized JSD with mixture m = β p + (1 − β) q
    (`losses.divergence`'s convention). Terms whose weight has no mass are 0."""
    import torch

    def kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        has = la > float("-inf")
        return torch.where(has, la.exp() * (la - torch.where(has, lb, la)), torch.zeros_like(la)).sum(-1)

    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


def sorted_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ULD's distance: Σ_k |sort↓(a)_k − sort↓(b)_k| per row, the shorter row zero-padded. a: [N, A], b: [N, B], both
    ≥ 0. Only the top k of each row is sorted, k = the most nonzero entries a row of `a` has (a few unmatched teacher
    tokens, usually): past them `a` is 0, so the rest of the sum is what `b` holds beyond its own top k. Exact."""
    import torch.nn.functional as F

    k = max(int((a > 0).sum(-1).max()) if a.numel() else 0, 1)
    ta = a.topk(min(k, a.shape[-1]), -1).values
    tb = b.topk(min(k, b.shape[-1]), -1).values
    width = max(ta.shape[-1], tb.shape[-1])
    ta, tb_pad = F.pad(ta, (0, width - ta.shape[-1])), F.pad(tb, (0, width - tb.shape[-1]))
    return (ta - tb_pad).abs().sum(-1) + (b.sum(-1) - tb.sum(-1)).clamp(min=0.0)


def xtok_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t_map: torch.Tensor,
                    s_star: torch.Tensor, t_star: torch.Tensor, *, beta: float = 0.0, temperature: float = 1.0,
                    uld_weight: float = ULD_WEIGHT) -> torch.Tensor:
    """Per-position cross-tokenizer divergence (see the module doc).

    student_logits: [N, V_s]; teacher_logits: [N, V_t] (both cut to the real vocabularies); t_map: [V_t] int64, the
    student id of each teacher id or -1; s_star / t_star: [N] int64, the student's and the teacher's own next token
    at each position (rule 1: t_star's mass counts for s_star). Returns [N] float32.
    """
    import torch

    n, v_s = student_logits.shape
    log_q = torch.log_softmax(student_logits.float() / temperature, -1)
    with torch.no_grad():  # the teacher's side: no graph; its temporaries die with `_merge`
        log_p = torch.log_softmax(teacher_logits.float() / temperature, -1).to(log_q.device)
        log_merged, unmatched = _merge(log_p, t_map.to(log_q.device), s_star.to(log_q.device),
                                       t_star.to(log_q.device), v_s)
    image = log_merged[:, :v_s] > float("-inf")  # student tokens that receive teacher mass
    q_rest = torch.logsumexp(log_q.masked_fill(image, float("-inf")), -1, keepdim=True)
    # every student token receives mass, yet some teacher mass is unmatched: the student has no rest to move, so
    # that bucket adds nothing to the KL (ULD below still compares the unmatched mass)
    q_rest = torch.where(q_rest > float("-inf"), q_rest, log_merged[:, v_s:])
    if beta == 0.0:  # forward KL, the default, written like `losses.divergence` (no masked copy of the student)
        with torch.no_grad():
            p_m = log_merged.exp()
            l_m = log_merged.masked_fill(p_m == 0, 0.0)
        rest = p_m[:, v_s] > 0
        d = (p_m[:, :v_s] * (l_m[:, :v_s] - log_q)).sum(-1) + torch.where(
            rest, p_m[:, v_s] * (l_m[:, v_s] - torch.where(rest, q_rest[:, 0], l_m[:, v_s])), 0.0)
    else:
        d = log_divergence(log_merged, torch.cat([log_q.masked_fill(~image, float("-inf")), q_rest], -1), beta)
    if uld_weight and (unmatched is not None or not bool(image.all())):
        p_un = log_p.exp().masked_fill_(~unmatched, 0.0) if unmatched is not None else log_p.new_zeros((n, 1))
        d = d + uld_weight * sorted_l1(p_un, log_q.exp().masked_fill(image, 0.0))
    return d


def _merge(log_p: torch.Tensor, t_map: torch.Tensor, s_star: torch.Tensor, t_star: torch.Tensor,
           v_s: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's log-probabilities [N, V_t] summed per destination: [N, V_s + 1] log-masses (column V_s = the
    unmatched mass, −inf = none), by a log-sum-exp (exact for a one-to-one map: today's log-probabilities); and the
    [N, V_t] mask of unmatched teacher tokens (None when there are none)."""
    import torch

    n = log_p.shape[0]
    rows = torch.arange(n, device=log_p.device)
    # where each teacher token's mass goes: its student id, or column v_s (unmatched); rule 1 per row
    dest = t_map.masked_fill(t_map < 0, v_s).expand(n, -1).clone()
    dest[rows, t_star] = s_star
    top = torch.full((n, v_s + 1), float("-inf"), device=log_p.device).scatter_reduce_(1, dest, log_p, "amax")
    has = top > float("-inf")
    top.masked_fill_(~has, 0.0)
    sums = torch.zeros_like(top).scatter_add_(1, dest, (log_p - top.gather(1, dest)).exp_())
    log_merged = sums.log_().add_(top).masked_fill_(~has, float("-inf"))
    unmatched = dest == v_s
    return log_merged, (unmatched if bool(unmatched.any()) else None)


def xtok_kd_loss(student_hidden: torch.Tensor, student_head: Any, teacher_hidden: torch.Tensor, teacher_head: Any,
                 s_index: torch.Tensor, t_index: torch.Tensor, s_star: torch.Tensor, t_star: torch.Tensor,
                 t_map: torch.Tensor, *, beta: float = 0.0, temperature: float = 1.0, chunk_size: int = 256,
                 vocab_size: int | None = None, teacher_vocab_size: int | None = None,
                 t2: bool = True) -> tuple[torch.Tensor, int]:
    """The cross-tokenizer KD term summed over aligned positions, chunked like `losses.chunked_kd_loss`.

    student_hidden: [B, L, H_s] (grad flows); teacher_hidden: [B_t, L_t, H_t] (frozen; the teacher's own tokens);
    s_index / t_index: [N] flat row indices into the two hidden states' first two axes (the paired positions);
    s_star / t_star: [N] their target ids; t_map: [V_t] (see `xtok_divergence`). vocab_size / teacher_vocab_size:
    the real vocabularies both heads' logits are cut to. Returns ((T² ·) scalar float32 sum, N).
    """
    import torch

    from imitate.train.losses import _chunked_head_loss, _head_params

    if temperature <= 0:
        raise ImitateError(f"temperature must be > 0, got {temperature}", hint="set --temperature to a positive number")
    rows = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, s_index.to(student_hidden.device))
    with torch.no_grad():
        t_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(
            0, t_index.to(teacher_hidden.device))
    t_weight, t_bias = _head_params(teacher_head)
    t_vocab = teacher_vocab_size or t_weight.shape[0]

    def chunk_loss(s_logits, start, end):
        with torch.no_grad():
            t_logits = torch.nn.functional.linear(t_rows[start:end], t_weight, t_bias)[:, :t_vocab].float()
        return xtok_divergence(s_logits, t_logits, t_map, s_star[start:end], t_star[start:end], beta=beta,
                               temperature=temperature).sum()

    total = _chunked_head_loss(rows, student_head, chunk_loss, chunk_size, vocab_size)
    return (total * temperature**2 if t2 else total), int(s_index.numel())

