"""Gated MLPs that keep gate's and up's outputs only (imitate.train.fused_mlp): the plain forward's loss and
gradients (LoRA, full fine-tuning, bf16 autocast), less memory held between forward and backward, left alone where
the pattern does not hold or the layer is checkpointed."""

from __future__ import annotations

import ctypes

import pytest
import torch

from imitate.train.fused_mlp import _SiluMul, fuse_gated_mlps


def test_silu_mul_gradients_match_autograd():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SiluMul.apply, (gate, up))
    torch.testing.assert_close(_SiluMul.apply(gate, up), torch.nn.functional.silu(gate) * up)
    d = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(_SiluMul.apply(gate, up), (gate, up), d)
    want = torch.autograd.grad(torch.nn.functional.silu(gate) * up, (gate, up), d)
    for a, b in zip(got, want):  # float64 stays float64 (gradcheck's tolerance would not see float32 rounding)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _model(model_dir, lora: bool, dtype=torch.float32, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    if lora:
        from imitate.train.lora_dropout import fuse_lora_dropout

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
        fuse_lora_dropout(model)
    return model.train()


def _grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora,dropout", [(True, 0.0), (True, 0.2), (False, 0.0)])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_mlps_train_as_the_plain_forward(tiny_teacher_dir, lora, dropout, autocast):
    """float32: the plain forward's loss and gradients. bf16 autocast: the same loss, and gradients as close to a
    float32 run's as the plain forward's are (the two round differently: the fused backward computes in float32)."""
    ids = torch.randint(0, 300, (2, 12))
    dtype = torch.bfloat16 if autocast and lora else torch.float32  # imitate's bf16 LoRA base; full FT stays float32
    plain, fused = _model(tiny_teacher_dir, lora, dtype, dropout), _model(tiny_teacher_dir, lora, dtype, dropout)
    state = torch.random.get_rng_state()
    assert fuse_gated_mlps(fused) == fused.config.num_hidden_layers
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe leaves the seeded random stream alone
    assert fuse_gated_mlps(fused) == 0  # already fused
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(1)  # the same dropout masks for both (LoRA's A layers draw them in the same order)
        loss_p, gp = _grads(plain, ids)
        torch.manual_seed(1)
        loss_f, gf = _grads(fused, ids)
    assert torch.equal(loss_f, loss_p)
    assert gp.keys() == gf.keys() and len(gp) > 0
    if not autocast:
        for name in gp:
            torch.testing.assert_close(gf[name], gp[name], rtol=1e-5, atol=1e-6, msg=name)
    else:
        reference = _model(tiny_teacher_dir, lora, torch.float32, dropout)
        torch.manual_seed(1)
        _, ref = _grads(reference, ids)

        def error(g):  # relative distance of all the gradients together from the float32 run's
            diff = torch.cat([(g[n].float() - ref[n]).flatten() for n in ref])
            return (diff.norm() / torch.cat([ref[n].flatten() for n in ref]).norm()).item()

        assert error(gf) <= 1.5 * error(gp) + 1e-3, (error(gf), error(gp))
        assert error(gf) < 0.2
    fused.eval()
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)


def _allocated() -> int:
    class MI2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MI2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.parametrize("lora", [True, False])
def test_fused_mlps_hold_two_fewer_wide_tensors_until_backward(tiny_teacher_dir, lora):
    """Memory held between forward and backward (glibc's count of allocated bytes): two [tokens, intermediate]
    float32 tensors less per layer (SiLU's output and the product)."""
    try:
        _allocated()
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")
    ids = torch.randint(0, 300, (8, 128))

    def held(model) -> int:
        before = _allocated()
        loss = model(input_ids=ids, labels=ids).loss
        kept = _allocated() - before
        loss.backward()
        return kept

    plain, fused = _model(tiny_teacher_dir, lora), _model(tiny_teacher_dir, lora)
    fuse_gated_mlps(fused)
    held(plain), held(fused)  # warm-up: first-call allocations
    wide = ids.numel() * plain.config.intermediate_size * 4
    saved = held(plain) - held(fused)
    assert saved >= 1.8 * wide * plain.config.num_hidden_layers, (saved, wide)


def test_mlps_that_are_not_the_pattern_or_are_checkpointed_are_left_alone(tiny_teacher_dir):
    from imitate.train.student import checkpoint_layers

    model = _model(tiny_teacher_dir, lora=False)
    checkpoint_layers(model, every=2)  # layer 0 recomputed, layer 1 keeps its activations
    assert fuse_gated_mlps(model, checkpointed=True) == 1
    mlps = [layer.mlp for layer in model.model.layers]
    assert "forward" not in vars(mlps[0]) and "forward" in vars(mlps[1])

    other = _model(tiny_teacher_dir, lora=False)
    for layer in other.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()  # not SiLU
    other.model.layers[0].mlp.act_fn = torch.nn.SiLU()

    class Scaled(type(other.model.layers[0].mlp)):  # the pattern and then some: the probe sees the difference
        def forward(self, x):
            return 2 * super().forward(x)

    other.model.layers[0].mlp.__class__ = Scaled
    assert fuse_gated_mlps(other) == 0

    dropped = _model(tiny_teacher_dir, lora=False)

    class DropsInTraining(type(dropped.model.layers[0].mlp)):  # as SeedOss's MLP: the same in evaluation only
        def forward(self, x):
            return torch.nn.functional.dropout(super().forward(x), 0.5, self.training)

    for layer in dropped.model.layers:
        layer.mlp.__class__ = DropsInTraining
    assert fuse_gated_mlps(dropped) == 0
