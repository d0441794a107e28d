"""Gated MLPs that keep two of their four wide tensors for backward.

A Llama-shaped MLP computes `down(silu(gate(x)) * up(x))`. Autograd keeps four tensors of the intermediate width for
backward: gate's output (SiLU's input), SiLU's output and up's output (the product's inputs), and the product itself
(the down projection's input, which its weight gradient needs: LoRA's `A` on `down`, or `down` itself in full
fine-tuning). On SmolLM2-135M they are over half of what a LoRA step keeps.

`fuse_gated_mlps` gives each such MLP a training forward that keeps gate's and up's outputs only: SiLU and the
product are recomputed from them in backward (elementwise work, no matrix product), the product through saved-tensor
hooks around the down projection, so whatever the down layer saves of its input is rebuilt when backward asks for it.
Values and gradients are those of the plain forward (tested); evaluation, generation and `no_grad` run the plain
forward. Layers under gradient checkpointing keep theirs: checkpointing already keeps only the layer's input.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up (not SiLU's output)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        gate, up = ctx.saved_tensors
        dtype = torch.promote_types(gate.dtype, torch.float32)  # bf16/fp16 computed in float32, float64 kept
        g, u, d = gate.to(dtype), up.to(dtype), grad.to(dtype)
        sig = torch.sigmoid(g)
        grad_up = (d * g * sig).to(up.dtype) if ctx.needs_input_grad[1] else None
        grad_gate = (d * u * sig * (1 + g * (1 - sig))).to(gate.dtype) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


class _Rebuild:
    """What the autograd graph keeps in place of the product (or a view of it): a recipe over the tensors `_SiluMul`
    keeps anyway, and the view's geometry."""

    __slots__ = ("gate", "up", "size", "stride", "offset")

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, view: torch.Tensor) -> None:
        self.gate, self.up = gate, up
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def build(self) -> torch.Tensor:
        with torch.no_grad():  # the forward's own ops on the same tensors: the same values, the same layout
            product = F.silu(self.gate) * self.up
        return product.as_strided(self.size, self.stride, self.offset)


def _fused_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and torch.is_grad_enabled()):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not (gate.is_contiguous() and up.is_contiguous() and gate.shape == up.shape):
        return self.down_proj(self.act_fn(gate) * up)
    product = _SiluMul.apply(gate, up)
    where = (product.untyped_storage().data_ptr(), product.dtype)
    gate, up = gate.detach(), up.detach()

    def pack(t: torch.Tensor) -> Any:
        if (t.untyped_storage().data_ptr(), t.dtype) == where:  # the product or a view of it: rebuilt on demand
            return _Rebuild(gate, up, t)
        return t

    def unpack(saved: Any) -> torch.Tensor:
        return saved.build() if isinstance(saved, _Rebuild) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(product)


def _is_silu(act: Any) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _is_gated_silu(mlp: Any) -> bool:
    """The module's own forward is down(silu(gate(x)) * up(x)), checked on a random input in evaluation mode and in
    training mode with the same random draws for both (guards against MLPs that add to the pattern: a scale, a bias on
    the product, another order, a dropout that acts only in training). The caller's random state is left as it was."""
    if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) or not _is_silu(mlp.act_fn):
        return False
    width = getattr(mlp.gate_proj, "in_features", None)
    p = next(mlp.parameters(), None)
    if not isinstance(width, int) or p is None or not p.is_floating_point():
        return False
    was = mlp.training
    cuda = [p.device] if p.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
            for training in (False, True):
                mlp.train(training)
                torch.manual_seed(0)
                want = mlp(x)
                torch.manual_seed(0)
                got = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
                if not (isinstance(want, torch.Tensor) and want.shape == got.shape and torch.equal(want, got)):
                    return False
    except Exception:  # noqa: BLE001 - any module this probe cannot run is left as it is
        return False
    finally:
        mlp.train(was)
    return True


def fuse_gated_mlps(model: Any, checkpointed: bool = False) -> int:
    """Give every SiLU-gated MLP (`gate_proj`, `up_proj`, `down_proj`, `act_fn`) outside a checkpointed decoder layer
    the fused training forward; returns how many changed. checkpointed: gradient checkpointing is on (a model whose
    layers are not transformers' GradientCheckpointingLayer is then left alone: which parts recompute is unknown)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if checkpointed and not layers:
        return 0
    skip = {id(m) for layer in layers if getattr(layer, "gradient_checkpointing", False) for m in layer.modules()}
    changed = 0
    for mlp in list(model.modules()):
        if id(mlp) in skip or "forward" in vars(mlp) or not _is_gated_silu(mlp):
            continue
        mlp.forward = types.MethodType(_fused_forward, mlp)
        changed += 1
    return changed
