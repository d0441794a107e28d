"""The SCKD gate on constructed gradients (linear losses whose gradients are known exactly) and on real chunked losses."""

from __future__ import annotations

import math

import pytest
import torch

from imitate.train.losses import chunked_ce, chunked_kd_loss
from imitate.train.sckd import SCKDGate, distributed_sum


def _lin(theta, direction):
    """A loss whose gradient with respect to theta is exactly `direction`."""
    return (theta * torch.as_tensor(direction, dtype=theta.dtype)).sum()


def test_aligned_term_on_opposed_term_off_and_grad_is_the_formula():
    theta = torch.zeros(3, requires_grad=True)
    gate = SCKDGate([theta], {"kd": 0.5, "feat": 2.0})
    gate.accumulate(_lin(theta, [1, 0, 0]), {"kd": _lin(theta, [1, 1, 0]), "feat": _lin(theta, [-1, 0, 1])})
    report = gate.step()
    assert report["kd"]["on"] and not report["feat"]["on"]
    assert report["kd"]["cos"] == pytest.approx(1 / math.sqrt(2))
    assert report["feat"]["cos"] == pytest.approx(-1 / math.sqrt(2))
    # g_s + 0.5 · g_kd; the opposed term (λ = 2) contributes nothing
    torch.testing.assert_close(theta.grad, torch.tensor([1.5, 0.5, 0.0]))


def test_threshold_is_strict_and_configurable():
    theta = torch.zeros(2, requires_grad=True)
    gate = SCKDGate([theta], {"kd": 1.0}, threshold=0.6)
    gate.accumulate(_lin(theta, [1, 0]), {"kd": _lin(theta, [1, math.sqrt(3)])})  # cos = 0.5
    assert gate.step()["kd"] == {"cos": pytest.approx(0.5), "on": False}
    torch.testing.assert_close(theta.grad, torch.tensor([1.0, 0.0]))
    zero = SCKDGate([theta], {"kd": 1.0})  # orthogonal: cos 0 is not > 0
    zero.accumulate(_lin(theta, [1, 0]), {"kd": _lin(theta, [0, 1])})
    assert zero.step()["kd"]["on"] is False


def test_adds_to_existing_grad_and_gates_on_the_window_sum():
    theta = torch.zeros(2, requires_grad=True)
    theta.grad = torch.tensor([10.0, 10.0])  # something already there stays
    gate = SCKDGate([theta], {"kd": 1.0})
    gate.accumulate(_lin(theta, [1, 0]), {"kd": _lin(theta, [3, 0])})  # micro-batch 1: aligned
    gate.accumulate(_lin(theta, [1, 0]), {"kd": _lin(theta, [-1, 0.5])})  # micro-batch 2: opposed on its own
    report = gate.step()  # window sums: g_s = (2, 0), g_kd = (2, 0.5) -> aligned
    assert report["kd"]["on"]
    torch.testing.assert_close(theta.grad, torch.tensor([10.0 + 2 + 2, 10.0 + 0.5]))
    assert gate.on_rates() == {"kd": 1.0}
    gate.accumulate(_lin(theta, [1, 0]), {"kd": _lin(theta, [-1, 0])})
    assert not gate.step()["kd"]["on"]
    assert gate.on_rates() == {"kd": 0.5}


def test_term_only_params_move_only_when_their_term_is_on():
    theta = torch.zeros(2, requires_grad=True)
    reg_on, reg_off = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    gate = SCKDGate([theta], {"a": 1.0, "b": 3.0}, term_params={"a": [reg_on], "b": [reg_off]})
    term_a = _lin(theta, [1, 0]) + (reg_on * theta.detach().add(1)).sum()  # regressor gradient: theta + 1 = (1, 1)
    term_b = _lin(theta, [-1, 0]) + (reg_off * 2).sum()
    gate.accumulate(_lin(theta, [1, 1]), {"a": term_a, "b": term_b})
    report = gate.step()
    assert report["a"]["on"] and not report["b"]["on"]
    torch.testing.assert_close(reg_on.grad, torch.tensor([1.0, 1.0]))
    assert reg_off.grad is None
    torch.testing.assert_close(theta.grad, torch.tensor([2.0, 1.0]))


def test_reducer_gets_dots_and_norms_and_its_sum_decides():
    theta = torch.zeros(2, requires_grad=True)
    seen = []
    other_rank = torch.tensor([1.0, -5.0, 25.0])  # another rank whose term gradient is (-5, 0) against g_s = (1, 0)

    def reducer(vec):
        seen.append(vec.clone())
        return vec + other_rank

    gate = SCKDGate([theta], {"kd": 1.0}, reducer=reducer)
    gate.accumulate(_lin(theta, [1, 0]), {"kd": _lin(theta, [2, 0])})
    report = gate.step()
    # [‖g_s‖², <g_s, g_kd>, ‖g_kd‖²] of this rank
    assert len(seen) == 1 and seen[0].tolist() == [1.0, 2.0, 4.0]
    assert report["kd"]["cos"] == pytest.approx((2 - 5) / (math.sqrt(2) * math.sqrt(29)))
    assert not report["kd"]["on"]  # aligned here, but all ranks together say no
    torch.testing.assert_close(theta.grad, torch.tensor([1.0, 0.0]))


def test_no_reducer_without_process_group():
    assert distributed_sum() is None


def test_gate_on_real_chunked_losses_matches_separate_backward_passes():
    torch.manual_seed(0)
    vocab, h = 29, 6
    body = torch.nn.Linear(h, h)
    head = torch.nn.Linear(h, vocab, bias=False).requires_grad_(False)
    t_hidden, t_head = torch.randn(2, 5, 7), torch.randn(vocab, 7)
    x, labels = torch.randn(2, 5, h), torch.randint(0, vocab, (2, 5))
    labels[0, :2] = -100
    params = list(body.parameters())

    def losses():
        hs = body(x)
        ce, n = chunked_ce(hs, head, labels, chunk_size=3)
        kd, _ = chunked_kd_loss(hs, head, t_hidden, t_head, labels, temperature=2.0, chunk_size=3)
        return ce / n, kd / n

    ce, kd = losses()
    g_s = torch.autograd.grad(ce, params, retain_graph=True)
    g_kd = torch.autograd.grad(kd, params)
    flat_s, flat_kd = torch.cat([g.flatten() for g in g_s]), torch.cat([g.flatten() for g in g_kd])
    cos = float(flat_s @ flat_kd / (flat_s.norm() * flat_kd.norm()))
    gate = SCKDGate(params, {"logit_kd": 0.7}, threshold=cos - 1e-3)  # just below: on
    ce, kd = losses()
    gate.accumulate(ce, {"logit_kd": kd})
    report = gate.step()
    assert report["logit_kd"]["on"] and report["logit_kd"]["cos"] == pytest.approx(cos, abs=1e-5)
    for p, a, b in zip(params, g_s, g_kd):
        torch.testing.assert_close(p.grad, a + 0.7 * b)
    for p in params:
        p.grad = None
    gate.threshold = cos + 1e-3  # just above: off, only the supervised gradient remains
    ce, kd = losses()
    gate.accumulate(ce, {"logit_kd": kd})
    assert not gate.step()["logit_kd"]["on"]
    for p, a in zip(params, g_s):
        torch.testing.assert_close(p.grad, a)


def test_mismatched_term_names_are_refused():
    theta = torch.zeros(2, requires_grad=True)
    gate = SCKDGate([theta], {"kd": 1.0})
    with pytest.raises(ValueError, match="do not match"):
        gate.accumulate(_lin(theta, [1, 0]), {"other": _lin(theta, [1, 0])})


@pytest.mark.parametrize("threshold", [-1.0, 1.0])  # every term on / every term off
def test_gate_over_lora_student_with_feature_terms(tiny_model_dir, tiny_teacher_dir, threshold):
    """The components wired as the training loop will: LoRA student, frozen teacher, logit KD + feature pairs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from imitate.train.features import FeatureRegressors, parse_pairs, term_name
    from imitate.train.losses import shift_labels

    torch.manual_seed(0)
    student = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    pairs = parse_pairs("auto", 2, 3)
    regs = FeatureRegressors(pairs, 32, 48)
    reg_params = {term_name(p): list(regs.maps[term_name(p)].parameters()) for p in pairs}
    weights = {"logit_kd": 0.5, **{term_name(p): 0.1 for p in pairs}}
    ids = torch.randint(0, 300, (2, 10))
    labels = shift_labels(ids.masked_fill(torch.arange(10) < 4, -100))
    head = student.get_output_embeddings()

    def losses():
        s = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        with torch.no_grad():
            t = teacher(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        ce, n = chunked_ce(s.hidden_states[-1], head, labels, chunk_size=4)
        kd, _ = chunked_kd_loss(s.hidden_states[-1], head, t.hidden_states[-1], teacher.lm_head, labels, chunk_size=4)
        feats = regs.terms(s.hidden_states, t.hidden_states, labels != -100)
        return ce / n, {"logit_kd": kd / n, **{k: v / c for k, (v, c) in feats.items()}}

    sup, terms = losses()
    g_s = torch.autograd.grad(sup, params, retain_graph=True)
    g_terms = {
        k: torch.autograd.grad(v, params + reg_params.get(k, []), retain_graph=True, materialize_grads=True)
        for k, v in terms.items()
    }
    gate = SCKDGate(params, weights, term_params=reg_params, threshold=threshold)
    gate.accumulate(*losses())
    report = gate.step()
    assert set(report) == set(weights) and all(r["on"] == (threshold < 0) for r in report.values())
    for j, p in enumerate(params):
        expected = g_s[j] + sum(weights[k] * g[j] for k, g in g_terms.items() if report[k]["on"])
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7)
    for k, reg in reg_params.items():
        for j, p in enumerate(reg):
            if report[k]["on"]:
                torch.testing.assert_close(p.grad, weights[k] * g_terms[k][len(params) + j], rtol=1e-4, atol=1e-7)
            else:
                assert p.grad is None


def test_one_on_rate_counter_for_gate_metrics_and_summary():
    """The gate's own rates, the running metrics rates and the summary (read back from metrics rows) agree."""
    from imitate.train.distill import on_rates
    from imitate.train.sckd import OnRates

    steps = [{"a": True, "b": False}, {"a": False, "b": False}, {"a": True, "b": True}, {"a": True, "b": False}]
    live = OnRates(["a", "b"])
    rows = []
    for gates in steps:
        rows.append({**{f"on/{n}": on for n, on in gates.items()},
                     **{f"on_rate/{n}": live.add(n, on) for n, on in gates.items()}})
    assert live.rates() == {"a": 0.75, "b": 0.25} == on_rates(rows, ["a", "b"])
    assert rows[1]["on_rate/a"] == 0.5 and rows[2]["on_rate/b"] == 1 / 3
    resumed = OnRates.from_rows(rows[:2], ["a", "b"])  # a run resumed after step 2 continues the same counts
    for gates in steps[2:]:
        for n, on in gates.items():
            resumed.add(n, on)
    assert resumed.rates() == live.rates()


def test_an_off_term_gives_its_weight_back_to_the_supervised_gradient():
    """(1 - w)·CE + w·KD with the KD term off is a plain CE step at full weight, not (1 - w) of one."""
    theta = torch.zeros(2, requires_grad=True)
    gate = SCKDGate([theta], {"kd": 0.25, "feat": 2.0}, give_back={"kd": 0.25 / 0.75})
    gate.accumulate(_lin(theta, [0.75, 0]), {"kd": _lin(theta, [-1, 0]), "feat": _lin(theta, [1, 1])})
    report = gate.step()
    assert not report["kd"]["on"] and report["feat"]["on"]
    torch.testing.assert_close(theta.grad, torch.tensor([1.0 + 2.0, 2.0]))  # CE at weight 1, plus 2·feat
    theta.grad = None
    gate.accumulate(_lin(theta, [0.75, 0]), {"kd": _lin(theta, [1, 0]), "feat": _lin(theta, [1, 1])})
    assert gate.step()["kd"]["on"]
    torch.testing.assert_close(theta.grad, torch.tensor([0.75 + 0.25 + 2.0, 2.0]))  # on: nothing given back
