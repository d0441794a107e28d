"""LoRA dropout that saves a bool mask instead of a float copy (imitate.train.lora_dropout): the same loss and
gradients as peft's own dropout given the same masks, fewer bytes kept for backward, adapters unchanged."""

from __future__ import annotations

import torch

from imitate.train.lora_dropout import _MaskedA, dropped_linear, fuse_lora_dropout, keep_mask


def test_dropped_linear_matches_autograd_through_an_explicit_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5, 7) > 0.3
    up = torch.randn(3, 5, 4, dtype=torch.float64)
    (dropped_linear(x, mask, w, 0.3) * up).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (torch.nn.functional.linear(x * mask / 0.7, w) * up).sum().backward()
    assert torch.allclose(gx, x.grad) and torch.allclose(gw, w.grad)
    assert torch.autograd.gradcheck(lambda a, b: dropped_linear(a, mask, b, 0.3), (x.detach().requires_grad_(),
                                                                                w.detach().requires_grad_()))


def test_keep_mask_keeps_each_element_with_the_asked_probability_and_follows_the_seed():
    n = 2_000_003  # odd: the last int64's second half is not used
    for keep in (0.95, 0.5, 0.1, 1 - 1e-6):
        torch.manual_seed(0)
        m = keep_mask((n,), keep, torch.device("cpu"))
        assert m.dtype == torch.bool and m.shape == (n,)
        sd = (keep * (1 - keep) / n) ** 0.5
        assert abs(m.float().mean().item() - keep) < 5 * sd + 1e-6, keep
    torch.manual_seed(1)
    a = keep_mask((3, 5, 7), 0.7, "cpu")
    torch.manual_seed(1)
    assert torch.equal(a, keep_mask((3, 5, 7), 0.7, "cpu"))  # seeded: the same mask again
    assert not torch.equal(a, keep_mask((3, 5, 7), 0.7, "cpu"))  # and the stream moves on
    assert not keep_mask((1000,), 0.0, "cpu").any() and keep_mask((1000,), 1.0, "cpu").all()
    # both halves of each int64 are used and keep the same share
    torch.manual_seed(2)
    m = keep_mask((n,), 0.5, "cpu")
    assert abs(m[0::2].float().mean().item() - m[1::2].float().mean().item()) < 0.004


def _lora(model_dir, dropout=0.2):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))  # B != 0: A gets grads
    return model


def _grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_model_equals_peft_dropout_with_the_same_masks(tiny_model_dir, monkeypatch):
    """Record the masks the fused layers draw, replay them through peft's own dropout modules: same loss, same
    gradient for every LoRA weight; evaluation is unchanged; the adapter's weights and keys are unchanged."""
    from peft import get_peft_model_state_dict

    ids = torch.randint(0, 300, (2, 12))
    fused, plain = _lora(tiny_model_dir), _lora(tiny_model_dir)
    keys = sorted(get_peft_model_state_dict(fused))
    fused.eval(), plain.eval()
    with torch.no_grad():
        before = fused(input_ids=ids).logits
    n_linear = sum(1 for m in fused.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    assert fuse_lora_dropout(fused) == n_linear > 0
    assert fuse_lora_dropout(fused) == 0  # nothing left to move
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, before)
    assert sorted(get_peft_model_state_dict(fused)) == keys

    masks: list[torch.Tensor] = []
    draw = _MaskedA.draw_mask

    def recording(self, x):
        masks.append(draw(self, x))
        return masks[-1]

    monkeypatch.setattr(_MaskedA, "draw_mask", recording)
    fused.train(), plain.train()
    with torch.no_grad():  # a training-mode forward without autograd drops out too, as peft's does
        torch.manual_seed(3)
        a = fused(input_ids=ids).logits
        torch.manual_seed(3)
        assert torch.equal(a, fused(input_ids=ids).logits) and not torch.equal(a, before)
    masks.clear()
    loss_f, grads_f = _grads(fused, ids)
    assert len(masks) == n_linear and 0.6 < torch.cat([m.flatten() for m in masks]).float().mean() < 0.95

    replay = iter(masks)

    class Replay(torch.nn.Module):  # peft's dropout call site, fed the fused run's masks in call order
        def forward(self, x):
            return x * next(replay) * (1 / 0.8)  # torch dropout scales by 1 / (1 - p)

    for m in plain.modules():
        if hasattr(m, "lora_dropout"):
            for name in list(m.lora_dropout):
                m.lora_dropout[name] = Replay()
    loss_p, grads_p = _grads(plain, ids)
    assert torch.equal(loss_f, loss_p)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_f:
        assert torch.equal(grads_f[name], grads_p[name]), name


def test_fused_dropout_keeps_fewer_bytes_for_backward(tiny_model_dir):
    """What autograd keeps for backward in one training forward shrinks (the dropped copies are gone)."""
    ids = torch.randint(0, 300, (4, 32))

    def saved_bytes(model) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(seen.values())

    plain = saved_bytes(_lora(tiny_model_dir))
    fused_model = _lora(tiny_model_dir)
    fuse_lora_dropout(fused_model)
    fused = saved_bytes(fused_model)
    weights = sum(p.numel() * p.element_size() for p in fused_model.parameters())
    assert fused < plain and (plain - fused) > 0.2 * (plain - weights), (plain, fused, weights)


def test_recompute_under_checkpointing_draws_the_same_masks(tiny_model_dir):
    """Gradient checkpointing runs the forward again in backward: the fused layers must draw the same masks then
    (torch restores the random state), so the gradients equal a run without checkpointing from the same seed."""
    from imitate.train.student import checkpoint_layers

    ids = torch.randint(0, 300, (2, 12))
    runs = []
    for checkpointed in (False, True):
        model = _lora(tiny_model_dir)
        fuse_lora_dropout(model)
        if checkpointed:
            checkpoint_layers(model.base_model.model)
        model.train()
        torch.manual_seed(7)
        runs.append(_grads(model, ids))
    (loss_a, ga), (loss_b, gb) = runs
    assert torch.allclose(loss_a, loss_b)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6), name


def test_no_dropout_moves_only_the_cast_and_trains_as_peft(tiny_model_dir):
    ids = torch.randint(0, 300, (2, 12))
    model, plain = _lora(tiny_model_dir, 0.0), _lora(tiny_model_dir, 0.0)
    assert fuse_lora_dropout(model) > 0
    assert all(m.dropout_p == 0.0 for m in model.modules() if isinstance(m, _MaskedA))
    model.train(), plain.train()
    (loss_a, ga), (loss_b, gb) = _grads(model, ids), _grads(plain, ids)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(ga[n], gb[n]) for n in ga)


def _bf16_lora(model_dir, dropout):
    """A bf16 base with float32 adapters, as `imitate train` builds it for bf16 mixed precision."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM", init_lora_weights=False))


def test_under_autocast_the_input_is_not_copied_to_float32_and_training_is_unchanged(tiny_model_dir, monkeypatch):
    """bf16 base, float32 adapters, bf16 autocast: peft casts each adapted layer's input to float32 and autograd keeps
    that copy; the fused layers take the bf16 input as it is. Same loss and adapter gradients as peft's path with
    the same masks (dropout 0.2) or none (0.0); fewer bytes kept for backward."""
    ids = torch.randint(0, 300, (2, 12))
    draw = _MaskedA.draw_mask
    for p in (0.2, 0.0):
        fused, plain = _bf16_lora(tiny_model_dir, p), _bf16_lora(tiny_model_dir, p)
        assert next(fused.parameters()).dtype == torch.bfloat16
        assert {q.dtype for q in fused.parameters() if q.requires_grad} == {torch.float32}
        fuse_lora_dropout(fused)
        masks: list[torch.Tensor] = []
        monkeypatch.setattr(_MaskedA, "draw_mask", lambda self, x: masks.append(draw(self, x)) or masks[-1])
        replay = iter(masks)

        class Replay(torch.nn.Module):
            def forward(self, x):
                assert x.dtype == torch.float32  # peft's copy
                return x * next(replay) / (1 - p)

        if p:
            for m in plain.modules():
                if hasattr(m, "lora_dropout"):
                    for name in list(m.lora_dropout):
                        m.lora_dropout[name] = Replay()
        fused.train(), plain.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_f, grads_f = _grads(fused, ids)
            loss_p, grads_p = _grads(plain, ids)
        assert torch.equal(loss_f, loss_p), p
        for name in grads_f:
            assert grads_f[name].dtype == torch.float32
            assert torch.equal(grads_f[name], grads_p[name]), (p, name)

    def float32_saved(model) -> int:  # float32 activations kept for backward (the adapters' weights left out)
        weights = {q.untyped_storage().data_ptr() for q in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if t.dtype == torch.float32 and ptr not in weights:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(seen.values())

    model = _bf16_lora(tiny_model_dir, 0.2)
    fuse_lora_dropout(model)
    model.train()
    fused_bytes = float32_saved(model)
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = True  # peft's cast back on: the float32 copies return
    copied_bytes = float32_saved(model)
    hidden = model.config.hidden_size * ids.numel() * 4
    assert copied_bytes - fused_bytes >= 4 * model.config.num_hidden_layers * hidden, (copied_bytes, fused_bytes)


def test_dropped_linear_under_bf16_autocast_matches_the_plain_product():
    """Mixed precision (accelerate's bf16 autocast): the same bf16 output and, within float rounding, the same
    float32 gradients as autocast's own linear over the dropped-out input."""
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    mask = torch.rand(4, 7, 16) > 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, plain = dropped_linear(x, mask, w, 0.1), torch.nn.functional.linear(x * mask / 0.9, w)
    assert fused.dtype == plain.dtype == torch.bfloat16 and torch.equal(fused, plain)
    up = torch.randn(4, 7, 8)
    got = torch.autograd.grad((fused.float() * up).sum(), (x, w))
    want = torch.autograd.grad((plain.float() * up).sum(), (x, w))
    for g, h in zip(got, want):
        assert g.dtype == h.dtype == torch.float32 and torch.allclose(g, h, atol=1e-4)
