"""Loss functions against naive references (F.kl_div, F.cross_entropy, hand formulas) and identities."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from imitate.errors import ImitateError
from imitate.train.losses import (
    chunked_ce,
    chunked_kd_loss,
    divergence,
    feature_mse,
    shift_labels,
    sparse_topk_divergence,
    sparse_topk_kd,
)

V, HS, HT = 37, 8, 12


def _logits(n=6, v=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def _naive_forward_kl(s, t, temp=1.0):
    # F.kl_div(input=log q, target=log p, log_target=True) = Σ p (log p − log q) = KL(p‖q)
    return F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), reduction="none", log_target=True).sum(-1)


def test_forward_and_reverse_kl_match_f_kl_div():
    s, t = _logits(seed=1), _logits(seed=2)
    torch.testing.assert_close(divergence(s, t, 0.0), _naive_forward_kl(s, t).float())
    torch.testing.assert_close(divergence(s, t, 1.0), _naive_forward_kl(t, s).float())
    torch.testing.assert_close(divergence(s, t, 0.0, temperature=2.5), _naive_forward_kl(s, t, 2.5).float())
    assert not torch.allclose(divergence(s, t, 0.0), divergence(s, t, 1.0))  # the two KLs differ


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_divergence_of_identical_distributions_is_zero(beta):
    s = _logits(seed=3)
    assert divergence(s, s.clone(), beta).abs().max() < 1e-5
    assert (divergence(s, _logits(seed=4), beta) > 1e-3).all()


def test_jsd_symmetric_at_half_and_matches_hand_formula():
    s, t = _logits(seed=5), _logits(seed=6)
    torch.testing.assert_close(divergence(s, t, 0.5), divergence(t, s, 0.5))
    assert (divergence(s, t, 0.5) <= math.log(2) + 1e-6).all()
    assert not torch.allclose(divergence(s, t, 0.3), divergence(t, s, 0.3))
    beta = 0.3
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = beta * p + (1 - beta) * q
    hand = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(divergence(s, t, beta), hand.float())


def test_divergence_rejects_bad_beta():
    with pytest.raises(ImitateError):
        divergence(_logits(), _logits(), 1.5)


def _setup(seed=0, b=3, seq=7, vs=V, vt=V, head_grad=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, seq, HS, generator=g, requires_grad=True)
    ht = torch.randn(b, seq, HT, generator=g)
    ws = (torch.randn(vs, HS, generator=g) * 0.5).requires_grad_(head_grad)
    wt = torch.randn(vt, HT, generator=g) * 0.5
    labels = torch.randint(0, V, (b, seq), generator=g)
    labels[0, :3] = -100  # a masked prompt
    labels[2, 5:] = -100  # padding
    return hs, ws, ht, wt, labels


def _naive_kd(hs, ws, ht, wt, labels, beta, temp, vocab=V, t2=True):
    mask = labels != -100
    s_logits = (hs @ ws.T)[..., :vocab][mask]
    t_logits = (ht @ wt.T)[..., :vocab][mask]
    d = divergence(s_logits, t_logits, beta, temp).sum()
    return d * temp**2 if t2 else d


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_kd_equals_unchunked_values_and_gradients(beta, chunk):
    hs, ws, ht, wt, labels = _setup(head_grad=True)
    ref = _naive_kd(hs, ws, ht, wt, labels, beta, 2.0)
    ref_gh, ref_gw = torch.autograd.grad(ref, [hs, ws])
    got, n = chunked_kd_loss(hs, ws, ht, wt, labels, beta=beta, temperature=2.0, chunk_size=chunk)
    gh, gw = torch.autograd.grad(got, [hs, ws])
    assert n == int((labels != -100).sum())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-6)


def test_chunked_kd_accepts_linear_modules_and_scales_upstream_gradient():
    hs, _, ht, _, labels = _setup()
    s_head = torch.nn.Linear(HS, V, bias=True)
    t_head = torch.nn.Linear(HT, V, bias=True).requires_grad_(False)
    mask = labels != -100
    ref = 3.0 * divergence(s_head(hs)[mask], t_head(ht)[mask], 0.0, 1.0).sum()
    ref_g = torch.autograd.grad(ref, [hs, s_head.bias])
    got = 3.0 * chunked_kd_loss(hs, s_head, ht, t_head, labels, temperature=1.0, chunk_size=5)[0]
    g = torch.autograd.grad(got, [hs, s_head.bias])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_ce_matches_f_cross_entropy():
    hs, ws, _, _, labels = _setup(head_grad=True)
    ref = F.cross_entropy((hs @ ws.T).reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    ref_g = torch.autograd.grad(ref, [hs, ws])
    got, n = chunked_ce(hs, ws, labels, chunk_size=3)
    g = torch.autograd.grad(got, [hs, ws])
    assert n == int((labels != -100).sum())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_masked_positions_contribute_nothing():
    hs, ws, ht, wt, labels = _setup()
    base, _ = chunked_kd_loss(hs, ws, ht, wt, labels, chunk_size=4)
    (grad,) = torch.autograd.grad(base, [hs])
    assert grad[labels == -100].abs().max() == 0
    assert grad[labels != -100].abs().max() > 0
    ht2, hs2 = ht.clone(), hs.detach().clone()
    ht2[labels == -100] = 100.0  # garbage at masked positions
    hs2[labels == -100] = -100.0
    changed, _ = chunked_kd_loss(hs2, ws, ht2, wt, labels, chunk_size=4)
    torch.testing.assert_close(changed, base.detach())


def test_vocab_cut_drops_padding_rows_instead_of_padding():
    hs, ws, ht, wt, labels = _setup()
    pad_s = torch.cat([ws, torch.full((3, HS), 5.0)])  # student embedding padded to V+3 with junk rows
    pad_t = torch.cat([wt, torch.full((11, HT), -7.0)])  # teacher padded differently
    ref, _ = chunked_kd_loss(hs, ws, ht, wt, labels, chunk_size=4)
    got, _ = chunked_kd_loss(hs, pad_s, ht, pad_t, labels, chunk_size=4, vocab_size=V)
    torch.testing.assert_close(got, ref)
    uncut, _ = chunked_kd_loss(hs, pad_s, ht, pad_t, labels, chunk_size=4)  # falls back to the narrower head: V+3
    assert not torch.allclose(uncut, ref)
    with pytest.raises(ImitateError):
        chunked_kd_loss(hs, ws, ht, wt, labels, vocab_size=V + 1)


def test_t2_factor_on_by_default():
    hs, ws, ht, wt, labels = _setup()
    on, _ = chunked_kd_loss(hs, ws, ht, wt, labels, temperature=3.0)
    off, _ = chunked_kd_loss(hs, ws, ht, wt, labels, temperature=3.0, t2=False)
    torch.testing.assert_close(on, off * 9.0)
    torch.testing.assert_close(off, _naive_kd(hs, ws, ht, wt, labels, 0.0, 3.0, t2=False))


def test_backward_can_run_twice_with_retain_graph():
    hs, ws, ht, wt, labels = _setup()
    loss, _ = chunked_kd_loss(hs, ws, ht, wt, labels, chunk_size=2)
    (g1,) = torch.autograd.grad(2 * loss, [hs], retain_graph=True)
    (g2,) = torch.autograd.grad(loss, [hs])
    torch.testing.assert_close(g1, 2 * g2)


def test_no_grad_call_returns_value_without_graph():
    hs, ws, ht, wt, labels = _setup()
    with torch.no_grad():
        loss, _ = chunked_kd_loss(hs, ws, ht, wt, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _naive_kd(hs, ws, ht, wt, labels, 0.0, 1.0).detach())


def test_shift_labels_aligns_targets_with_predicting_positions():
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    assert shift_labels(labels).tolist() == [[-100, 5, 6, 7, -100]]


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op creates: the logits' N × V if they are ever materialised."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunking_bounds_the_largest_tensor_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    vocab, n_tok, chunk = 4000, 256, 16
    hs = torch.randn(2, n_tok // 2, HS, generator=g, requires_grad=True)
    ht = torch.randn(2, n_tok // 2, HT, generator=g)
    ws, wt = torch.randn(vocab, HS, generator=g), torch.randn(vocab, HT, generator=g)
    labels = torch.randint(0, vocab, (2, n_tok // 2), generator=g)
    with _LargestTensor() as chunked:
        loss, _ = chunked_kd_loss(hs, ws, ht, wt, labels, beta=0.5, chunk_size=chunk)
        loss.backward()
    # JSD stacks teacher and student log-probs: 2 × chunk × vocab, far below the n_tok × vocab logits
    assert chunked.largest <= 2 * chunk * vocab
    with _LargestTensor() as naive:
        _naive_kd(hs, ws, ht, wt, labels, 0.5, 1.0).backward()
    assert naive.largest >= n_tok * vocab  # the reference does materialise them, so the check has teeth


def test_sparse_topk_divergence_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]])
    ids = torch.tensor([[3, 0, -1]])  # two known teacher ids, one empty slot
    lps = torch.tensor([[math.log(0.6), math.log(0.25), 0.0]])
    q = [math.exp(x) for x in s[0].tolist()]
    q = [x / sum(q) for x in q]
    p3, p0, rest = 0.6, 0.25, 0.15
    hand = p3 * math.log(p3 / q[3]) + p0 * math.log(p0 / q[0]) + rest * math.log(rest / (1 - q[3] - q[0]))
    torch.testing.assert_close(sparse_topk_divergence(s, ids, lps), torch.tensor([hand]))


def test_sparse_topk_with_whole_vocab_is_forward_kl_and_a_lower_bound_otherwise():
    s, t = _logits(n=4, seed=7).float(), _logits(n=4, seed=8).float()
    log_p = F.log_softmax(t, -1)
    full_ids = torch.arange(V).expand(4, V)
    torch.testing.assert_close(sparse_topk_divergence(s, full_ids, log_p), divergence(s, t, 0.0), rtol=1e-4, atol=1e-5)
    top = log_p.topk(5, -1)
    partial = sparse_topk_divergence(s, top.indices, top.values)
    assert (partial <= divergence(s, t, 0.0) + 1e-6).all() and (partial > 0).all()
    matched = sparse_topk_divergence(t, top.indices, top.values)  # student == teacher
    assert matched.abs().max() < 1e-5


def test_sparse_topk_kd_chunked_matches_rows_and_skips_positions_without_data():
    hs, ws, _, _, _ = _setup(head_grad=True)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, V, (3, 7, 4), generator=g)
    lps = torch.log_softmax(torch.randn(3, 7, 5, generator=g), -1)[..., :4]
    ids[0, :3] = -1  # no teacher data on the prompt
    ids[1, 2, 2:] = -1  # fewer than K entries
    has = (ids >= 0).any(-1)
    ref = sparse_topk_divergence((hs @ ws.T)[has], ids[has], lps[has]).sum()
    ref_g = torch.autograd.grad(ref, [hs, ws])
    got, n = sparse_topk_kd(hs, ws, ids, lps, chunk_size=4)
    g_got = torch.autograd.grad(got, [hs, ws])
    assert n == 18
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert g_got[0][0, :3].abs().max() == 0


def test_feature_mse_matches_hand_formula_and_masks():
    g = torch.Generator().manual_seed(10)
    sh = torch.randn(2, 5, HS, generator=g, requires_grad=True)
    th = torch.randn(2, 5, HT, generator=g)
    reg = torch.nn.Linear(HS, HT)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    total, n = feature_mse(sh, th, reg, mask, normalize=False)
    hand = sum(((reg(sh[b, t]) - th[b, t]) ** 2).mean() for b in range(2) for t in range(5) if mask[b, t])
    assert n == 6
    torch.testing.assert_close(total, hand)
    # default: the teacher target is standardised per token (zero mean, unit variance, no affine)
    total, n = feature_mse(sh, th * 40 + 3, reg, mask)

    def std(x):
        return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)

    hand = sum(((reg(sh[b, t]) - std(th[b, t] * 40 + 3)) ** 2).mean() for b in range(2) for t in range(5) if mask[b, t])
    torch.testing.assert_close(total, hand)
    (grad,) = torch.autograd.grad(total, [sh])
    assert grad[~mask].abs().max() == 0


def test_teacher_in_another_dtype_is_upcast_per_chunk():
    hs, ws, ht, wt, labels = _setup()
    ht16, wt16 = ht.bfloat16(), wt.bfloat16()
    got, _ = chunked_kd_loss(hs, ws, ht16, wt16, labels, chunk_size=4)
    mask = labels != -100
    ref = divergence((hs @ ws.T)[mask], (ht16 @ wt16.T).float()[mask], 0.0, 1.0).sum()
    torch.testing.assert_close(got, ref)


def test_kd_on_tiny_models_with_a_padded_teacher_head(tmp_path, tiny_tokenizer_dir, tiny_model_dir):
    """Real models: the final hidden states + lm_head reproduce the models' own logits, cut to the real vocab."""
    from tiny import make_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imitate.train.vocab import real_vocab_size

    make_model(tmp_path / "t", tokenizer_dir=tiny_tokenizer_dir, hidden_size=48, num_layers=3, pad_vocab_to=448, seed=3)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "t").requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    vocab = real_vocab_size(tok, student.lm_head.weight.shape[0], teacher.lm_head.weight.shape[0])
    assert (vocab, teacher.lm_head.weight.shape[0]) == (len(tok), 448)
    ids = torch.tensor([tok.encode("What is the capital of France? Paris")])
    labels = shift_labels(ids.masked_fill(torch.arange(ids.shape[1]) < 4, -100))
    s_out = student(ids, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    got, n = chunked_kd_loss(
        s_out.hidden_states[-1],
        student.lm_head,
        t_out.hidden_states[-1],
        teacher.lm_head,
        labels,
        beta=0.5,
        temperature=2.0,
        chunk_size=3,
        vocab_size=vocab,
    )
    mask = labels != -100
    ref = 4.0 * divergence(s_out.logits[mask][:, :vocab], t_out.logits[mask][:, :vocab], 0.5, 2.0).sum()
    assert n == int(mask.sum()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    ce, _ = chunked_ce(s_out.hidden_states[-1], student.lm_head, labels, vocab_size=vocab)
    ref_ce = F.cross_entropy(s_out.logits[mask][:, :vocab], labels[mask], reduction="sum")
    torch.testing.assert_close(ce, ref_ce, rtol=1e-4, atol=1e-5)


def test_importing_the_modules_leaves_torch_out():
    import subprocess
    import sys

    code = "import sys, imitate.train.losses, imitate.train.sckd, imitate.train.features, imitate.train.vocab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _LiveBytes(TorchDispatchMode):
    """The most bytes held at once by the storages of tensors that ops created (counted once per storage, while a
    tensor on it lives; no autograd graph keeps them: the chunked losses run their forward outside the recorded graph)."""

    def __init__(self, at_least: int):
        super().__init__()
        self.at_least, self.live, self.peak, self.refs = at_least, 0, 0, {}

    def _drop(self, key, n):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.at_least:
                key, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += n
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key, n)
        return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cut", [None, V - 5])
def test_chunked_ce_gradients_with_bias_head_grad_and_vocab_cut(bias, cut):
    hs, ws, _, _, labels = _setup(head_grad=True)
    labels = labels.clamp(max=(cut or V) - 1).masked_fill(labels == -100, -100)
    head = torch.nn.Linear(HS, V, bias=bias)
    head.weight.data.copy_(ws.detach())
    wanted = [hs, head.weight] + ([head.bias] if bias else [])
    logits = head(hs)[..., : cut or V]
    ref = F.cross_entropy(logits.reshape(-1, cut or V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    ref_g = torch.autograd.grad(ref, wanted)
    got, _ = chunked_ce(hs, head, labels, chunk_size=4, vocab_size=cut)
    g = torch.autograd.grad(got * 2.0, wanted)  # the upstream gradient scales the kept one
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, 2.0 * b, rtol=1e-4, atol=1e-5)


def test_chunked_ce_holds_one_float32_chunk_of_logits_at_a_time():
    g = torch.Generator().manual_seed(0)
    vocab, n_tok, chunk = 4000, 256, 16
    hs = torch.randn(1, n_tok, HS, generator=g, requires_grad=True)
    ws = torch.randn(vocab, HS, generator=g)
    labels = torch.randint(0, vocab, (1, n_tok), generator=g)
    one = chunk * vocab * 4
    with _LiveBytes(chunk * vocab) as ce:
        chunked_ce(hs, ws, labels, chunk_size=chunk)[0].backward()
    assert 0 < ce.peak <= one
    with _LiveBytes(chunk * vocab) as generic:  # the autograd path through a loss callable keeps more at once
        from imitate.train.losses import _chunked_head_loss, _target_rows

        rows, idx = _target_rows(hs, labels != -100)
        t = labels.reshape(-1)[idx]
        _chunked_head_loss(rows, ws, lambda z, a, b: F.cross_entropy(z, t[a:b], reduction="sum"), chunk, None).backward()
    assert generic.peak >= 2 * one


def _kd_through_autograd(hs, head, ht, wt, labels, temperature, vocab, chunk_size=4):
    """chunked_kd_loss's forward KL taken through autograd (the generic chunk path), for comparison."""
    from imitate.train.losses import _chunked_head_loss, _target_rows

    rows, idx = _target_rows(hs, labels != -100)
    t_rows = ht.reshape(-1, ht.shape[-1])[idx]

    def chunk_loss(z, a, b):
        return divergence(z, (t_rows[a:b] @ wt.T)[:, :vocab].float(), 0.0, temperature).sum()

    return _chunked_head_loss(rows, head, chunk_loss, chunk_size, vocab) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_kl_written_by_hand_equals_autograd(temperature, bias):
    hs, ws, ht, wt, labels = _setup(head_grad=True)
    cut = V - 3
    head = torch.nn.Linear(HS, V, bias=bias)
    head.weight.data.copy_(ws.detach())
    wanted = [hs, head.weight] + ([head.bias] if bias else [])
    ref = _kd_through_autograd(hs, head, ht, wt, labels, temperature, cut)
    ref_g = torch.autograd.grad(ref, wanted)
    got, _ = chunked_kd_loss(hs, head, ht, wt, labels, beta=0.0, temperature=temperature, chunk_size=4,
                             vocab_size=cut)
    g = torch.autograd.grad(got, wanted)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "forward-kl"])
def test_gradients_written_by_hand_under_bf16_autocast_match_autograd_of_the_same_ops(loss):
    """Under autocast the hand-written gradient (bf16 products) equals what autograd computes for the same ops (the
    path it replaced: linear -> float -> loss), to bf16 rounding."""
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(1, 40, HS, generator=g, dtype=torch.bfloat16, requires_grad=True)
    ws = torch.randn(V, HS, generator=g, dtype=torch.bfloat16)
    ht, wt = torch.randn(1, 40, HT, generator=g, dtype=torch.bfloat16), torch.randn(V, HT, generator=g).bfloat16()
    labels = torch.randint(0, V, (1, 40), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if loss == "ce":
            ref = F.cross_entropy(F.linear(hs[0], ws).float(), labels[0], reduction="sum")
            got, _ = chunked_ce(hs, ws, labels, chunk_size=16)
        else:
            ref = _kd_through_autograd(hs, ws, ht, wt, labels, 1.5, V)
            got, _ = chunked_kd_loss(hs, ws, ht, wt, labels, temperature=1.5, chunk_size=4)
        (ref_g,) = torch.autograd.grad(ref, [hs])
        (got_g,) = torch.autograd.grad(got, [hs])
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert got_g.dtype == torch.bfloat16
    torch.testing.assert_close(got_g, ref_g, rtol=2e-2, atol=2e-2)


def test_forward_kl_holds_at_most_three_float32_chunks_of_logits():
    g = torch.Generator().manual_seed(0)
    vocab, n_tok, chunk = 4000, 256, 16
    hs = torch.randn(1, n_tok, HS, generator=g, requires_grad=True)
    ht = torch.randn(1, n_tok, HT, generator=g)
    ws, wt = torch.randn(vocab, HS, generator=g), torch.randn(vocab, HT, generator=g)
    labels = torch.randint(0, vocab, (1, n_tok), generator=g)
    one = chunk * vocab * 4
    with _LiveBytes(chunk * vocab) as kd:
        chunked_kd_loss(hs, ws, ht, wt, labels, temperature=2.0, chunk_size=chunk)[0].backward()
    assert 0 < kd.peak <= 3 * one
    with _LiveBytes(chunk * vocab) as generic:  # the same loss through autograd keeps more at once
        _kd_through_autograd(hs, ws, ht, wt, labels, 2.0, vocab, chunk).backward()
    assert generic.peak >= 5 * one, generic.peak / one
