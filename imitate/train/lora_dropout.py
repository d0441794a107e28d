"""LoRA dropout that keeps a 1-byte mask for backward instead of a float copy of the layer's input.

peft computes a LoRA branch as `lora_B(lora_A(dropout(x)))`. Autograd then keeps, for every adapted linear layer, the
dropped-out input (the tensor `lora_A` needs for its weight gradient: 4 bytes an element in float32) and dropout's mask
(1 byte). q, k and v read the same `x` but drop it out separately, so a decoder layer of a Llama-shaped model keeps
seven float copies of its inputs. On SmolLM2-135M with r 16 on every linear layer and dropout 0.05, that is 0.66 GB of
a batch of 800 tokens' 1.6 GB of saved activations (measured with autograd's saved-tensor hooks).

`fuse_lora_dropout` gives each LoRA `A` of a peft model with dropout p > 0 a forward that draws a Bernoulli mask of
the same distribution, keeps `x` itself (shared by the layers that read it) and the mask as bool, and recomputes
`x * mask / (1 - p)` in backward. Given the same masks, the loss and the gradients are those of peft's dropout, bit for
bit (tested by replaying the masks through peft's own call site). On a GPU the masks are torch's dropout's own draw;
on CPU they come from a cheaper draw (`keep_mask`), so a seeded CPU run follows another random stream than peft's.
Weights, adapter files and merging are untouched: only `forward` changes, and only in training with p > 0
(evaluation is a plain linear layer, as before). What it saves on that 20-step run is modest in peak RSS (75 MB of
3.1 GB: on CPU, glibc's heap keeps freed blocks, so the peak follows fragmentation more than live tensors); on a GPU,
whose caching allocator reuses blocks, the saving in saved activations is what counts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


class _DroppedLinear(torch.autograd.Function):
    """y = (x * mask * scale) @ weight.T, saving x, the bool mask and the weight (not the dropped-out copy).

    x: [..., in]; mask: bool, x's shape; weight: [out, in]; scale: 1 / (1 - p). Returns [..., out]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, mask, weight)
        ctx.scale = scale
        return F.linear(x.mul(mask).mul_(scale), weight)  # the dropped copy lives only for this product

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, mask, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype).mul_(mask).mul_(ctx.scale)  # in x's dtype, as autograd
        if ctx.needs_input_grad[2]:
            dropped = x.mul(mask).mul_(ctx.scale).reshape(-1, x.shape[-1])
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ dropped.to(grad.dtype)).to(weight.dtype)
        return grad_x, None, grad_w, None


def dropped_linear(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """`F.linear(x * mask / (1 - p), weight)` with x and the bool mask saved for backward instead of the product."""
    return _DroppedLinear.apply(x, mask, weight, 1.0 / (1.0 - p))


class _MaskedA(torch.nn.Linear):
    """A LoRA `A` layer (its class swapped in place, weights untouched) that applies its dropout itself, and peft's
    cast of the input to the adapter's dtype only where it is needed: outside autocast. Under autocast (mixed
    precision: a bf16 base, float32 adapters) the product runs in bf16 whatever the input's dtype, so peft's float32
    copy of the input changed nothing but the memory: every adapted layer kept one for backward (q, k and v each
    their own). The input stays as it comes; the outputs and gradients are those of peft's path, bit for bit
    (tested)."""

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)  # peft's `_cast_input_dtype`, turned off on the layer for this
        if not (self.training and self.dropout_p > 0):
            return super().forward(x)
        return dropped_linear(x, self.draw_mask(x), self.weight, self.dropout_p)  # without autograd: nothing kept

    def draw_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Keep each element with probability 1 - p (under gradient checkpointing the recompute draws the same mask:
        torch restores the random state). See `keep_mask`."""
        return keep_mask(x.shape, 1.0 - self.dropout_p, x.device)


def keep_mask(shape: torch.Size | tuple, keep: float, device: torch.device) -> torch.Tensor:
    """A bool mask, each element True with probability `keep`, from the default generator of `device`.

    On CUDA, torch's `bernoulli_` (one Philox kernel). On CPU, 32 uniform bits an element compared with
    round(keep * 2^32): `bernoulli_` there cost 2.5x as much (4.6 against 1.9 ms for [8, 80, 1536] on 2 cores) and
    was 18 % of a LoRA step's CPU time on SmolLM2-135M. Each element's probability is `keep` to within 2^-33 (a
    float32 uniform, as `torch.rand(...) < keep`, resolves 2^-24). The masks are not the ones `bernoulli_` would
    draw from the same seed: the same distribution, another stream."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(keep).bool()
    n = math.prod(shape)
    # int32 compare: r < t keeps (t + 2^31) of the 2^32 values r takes, each with probability 2^-32
    t = round(keep * 2**32) - 2**31
    if t >= 2**31:
        return torch.ones(shape, dtype=torch.bool)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # every int64 equally likely
    return bits.view(torch.int32)[:n].view(shape) < t


def fuse_lora_dropout(model: Any) -> int:
    """Move every plain LoRA linear layer's dropout (p > 0) and its input cast into its `A` layer (see the module's
    docstring and `_MaskedA`); returns how many layers changed. Layers of other kinds (embeddings, convolutions, DoRA
    and other variants) are left as peft made them."""
    from peft.tuners.lora import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        moved = 0
        for name, dropout in list(module.lora_dropout.items()):
            a = module.lora_A[name] if name in module.lora_A else None
            p = getattr(dropout, "p", 0.0) if isinstance(dropout, torch.nn.Dropout) else 0.0
            if (type(dropout) not in (torch.nn.Dropout, torch.nn.Identity) or type(a) is not torch.nn.Linear
                    or a.bias is not None or name in getattr(module, "lora_variant", {})):
                continue
            a.__class__ = _MaskedA
            a.dropout_p = float(p)
            module.lora_dropout[name] = torch.nn.Identity()
            moved += 1
        if moved and moved == len(module.lora_A):  # every adapter casts for itself now (peft reads this flag)
            module.cast_input_dtype_enabled = False
        changed += moved
    return changed
