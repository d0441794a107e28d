"""On-policy distillation (`imitate train --on-policy λ`): generation, batch building, the loss against a naive
reference, λ = 0 / λ = 1 identities, SCKD pairing, resume, DDP, CLI errors, one step against a plain GKD step."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from test_distill import write
from test_train import adapter_weights as adapter
from test_train import cfg_for as sft_cfg
from test_train import invoke, make_records, metrics, two_ranks_match_accumulation

from imitate.train import onpolicy
from imitate.train.data import IGNORE, Example, collate, encode, shift_targets
from imitate.train.loop import run
from imitate.train.sckd import SCKDGate

# shapes the count-to-N records (what the SFT'd student was trained on) do not cover
OTHER = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "Écris trois en lettres."}, {"role": "assistant", "content": "trois"},
     {"role": "user", "content": "Et sept ?"}, {"role": "assistant", "content": "sept, comme les sept jours"}],
    [{"role": "user", "content": "Translate: the quick brown fox"}, {"role": "assistant", "content": "der schnelle Fuchs"}],
    [{"role": "user", "content": "def f(x): return x*2  # what is f(21)?"}, {"role": "assistant", "content": "f(21) = 42"}],
]


def cfg_for(data, student, out, **kw):
    return sft_cfg(data, student, out, **{"eval_split": 0, "lora_dropout": 0.0, **kw})


@pytest.fixture(scope="module")
def sft_student(tiny_model_dir, tmp_path_factory):
    """The tiny student fully fine-tuned on count-to-N records: it answers and stops with <|end|>, so on-policy
    batches hold answers of different lengths that end at the end-of-turn token (a random-init one never stops)."""
    d = tmp_path_factory.mktemp("sft")
    data = write(d / "d.jsonl", make_records(48, seed=7))
    run(cfg_for(data, tiny_model_dir, d / "m", full=True, batch_size=8, lr=1e-2, warmup=0.1, max_steps=40))
    return d / "m"


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("op") / "mixed.jsonl", make_records(8, seed=11) + [{"messages": m} for m in OTHER])


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def greedy_naive(model, prompt, stop, max_tokens):
    """Greedy decoding the slow way: one prompt, a full forward per token, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in stop:
                break
    return ids[len(prompt):]


def naive_sums(student, teacher, tok, records, full, divergence):
    """Token sums, one sequence at a time on full logits in float64: `divergence(student_logits, teacher_logits)` at
    the positions predicting each full[i]'s answer (full[i] = record i's prompt + an answer), and the CE of the records'
    collected answers. Returns (kd, ce, generated tokens, collected answer tokens)."""
    from imitate.models import prompt_ids

    kd, ce, n_gen, n_ref = 0.0, 0.0, 0, 0
    for r, ids in zip(records, full):
        keep = torch.zeros(len(ids), dtype=torch.bool)
        keep[len(prompt_ids(tok, r["messages"][:-1])) - 1 : -1] = True  # positions predicting the answer tokens
        s = student(input_ids=torch.tensor([ids])).logits[0][keep].double()
        with torch.no_grad():
            t = teacher(input_ids=torch.tensor([ids])).logits[0][keep].double()
        kd = kd + divergence(s, t)
        n_gen += int(keep.sum())
        ids, mask = encode(tok, r["messages"])
        lab = torch.tensor(shift_targets(ids, mask))
        logits = student(input_ids=torch.tensor([ids])).logits[0].double()
        ce = ce + torch.nn.functional.cross_entropy(logits[lab != IGNORE], lab[lab != IGNORE], reduction="sum")
        n_ref += int((lab != IGNORE).sum())
    return kd, ce, n_gen, n_ref


# ---------------------------------------------------------------------------------------------------------------------
# choosing micro-batches
# ---------------------------------------------------------------------------------------------------------------------


def test_choose_is_seeded_and_follows_lambda_warmup_and_padding():
    window = [[0], [1], None, [2]]
    assert onpolicy.choose(3, 10, window, 1.0, 0) == [True, True, False, True]  # never a padding micro-batch
    assert onpolicy.choose(3, 10, window, 0.0, 0) == [False] * 4
    assert onpolicy.choose(3, 9, window, 1.0, 10) == [False] * 4  # before the warm-up ends
    flags = [f for step in range(600) for f in onpolicy.choose(5, step, [[0]] * 4, 0.3, 0)]
    assert abs(sum(flags) / len(flags) - 0.3) < 0.04
    again = [f for step in range(600) for f in onpolicy.choose(5, step, [[0]] * 4, 0.3, 0)]
    other = [f for step in range(600) for f in onpolicy.choose(6, step, [[0]] * 4, 0.3, 0)]
    assert flags == again and flags != other
    assert onpolicy.warmup_steps(0.5, 7) == 3 and onpolicy.warmup_steps(0.0, 7) == 0


# ---------------------------------------------------------------------------------------------------------------------
# prompts, generation, batches
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_on", ["final", "all"])
def test_prompt_is_the_rendered_conversation_before_the_final_answer(tiny_model_dir, loss_on):
    from imitate.models import prompt_ids

    _, tok = load(tiny_model_dir)
    for messages in OTHER + [r["messages"] for r in make_records(3, seed=2)]:
        ids, mask = encode(tok, messages, loss_on)
        ex = Example(ids, shift_targets(ids, mask), "x")
        want = prompt_ids(tok, messages[:-1])
        assert tok.decode(onpolicy.prompt_of(ex)) == tok.decode(want)


def test_generation_matches_naive_greedy_per_prompt_and_stops_at_end_of_turn(sft_student):
    from imitate.models import eos_ids, prompt_ids

    model, tok = load(sft_student)
    stop = eos_ids(model, tok)
    convs = [r["messages"][:-1] for r in make_records(5, seed=3)] + [m[:-1] for m in OTHER]
    prompts = [prompt_ids(tok, m) for m in convs]
    assert len({len(p) for p in prompts}) > 2  # uneven lengths: left padding matters
    model.train()
    answers, capped = onpolicy.generate(model, prompts, pad_id=tok.pad_token_id, stop_ids=stop, max_tokens=14,
                                        temperature=0.0, seed=0)
    assert model.training  # restored
    model.eval()
    for p, a, c in zip(prompts, answers, capped):
        assert a == greedy_naive(model, p, set(stop), 14)  # batched + KV cache == one prompt, no cache
        assert c == (a[-1] not in stop) and (len(a) == 14 or not c)
        assert not any(t in stop for t in a[:-1])  # nothing kept after the end-of-turn token
    assert sum(capped) < len(capped)  # some answers end at the end-of-turn token
    short, capped = onpolicy.generate(model, prompts, pad_id=tok.pad_token_id, stop_ids=stop, max_tokens=3,
                                      temperature=0.0, seed=0)
    assert all(capped) and [s for s in short] == [a[:3] for a in answers]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(sft_student):
    from imitate.models import eos_ids, prompt_ids

    model, tok = load(sft_student)
    prompts = [prompt_ids(tok, m[:-1]) for m in OTHER] * 3
    kw = dict(pad_id=tok.pad_token_id, stop_ids=eos_ids(model, tok), max_tokens=10, temperature=1.5)
    torch.manual_seed(123)
    a = onpolicy.generate(model, prompts, seed=1, **kw)[0]
    after = torch.rand(3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    assert torch.equal(after, expected)
    assert onpolicy.generate(model, prompts, seed=1, **kw)[0] == a
    assert onpolicy.generate(model, prompts, seed=2, **kw)[0] != a
    assert len({len(x) for x in a}) > 1 and len(set(map(tuple, a))) > len(OTHER)  # samples, not one mode


def test_onpolicy_batch_masks_prompt_and_padding():
    prompts, answers = [[5, 6, 7], [8, 9]], [[20, 21, 2], [30]]
    exs = [onpolicy.onpolicy_example(p, a, "r", max_length=64) for p, a in zip(prompts, answers)]
    batch = collate(exs, pad_id=0, packing=False)
    labels = batch["labels"]
    assert labels[0].tolist() == [IGNORE, IGNORE, 20, 21, 2, IGNORE]  # position t predicts token t + 1
    assert labels[1].tolist() == [IGNORE, 30, IGNORE, IGNORE, IGNORE, IGNORE]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0] and batch["n_targets"] == 4
    cut = onpolicy.onpolicy_example([5, 6, 7], [20, 21, 2], "r", max_length=4)
    assert cut.input_ids == [5, 6, 7, 20] and cut.n_targets == 1


# ---------------------------------------------------------------------------------------------------------------------
# the loss in the loop
# ---------------------------------------------------------------------------------------------------------------------


def test_onpolicy_loss_and_sckd_pairing_equal_a_naive_reference(sft_student, tiny_teacher_dir, mixed_file, tmp_path):
    """λ = 1, greedy, full fine-tuning, --sckd, one window holding every record: step 1's logged on-policy KD equals a
    full-logit reverse KL on answers generated separately (one prompt at a time, no cache) and decoded to text;
    its CE is the records' collected answers; the gate's cosine is between those two gradients."""
    import torch.nn.functional as F

    from imitate.models import eos_ids, prompt_ids

    records = [json.loads(x) for x in mixed_file.read_text().splitlines()]
    run(cfg_for(mixed_file, sft_student, tmp_path / "o", teacher=f"hf:{tiny_teacher_dir}", full=True, kd="reverse-kl",
                temperature=1.5, on_policy=1.0, on_policy_warmup=0.0, on_policy_temperature=0.0,
                on_policy_max_tokens=12, sckd=True, batch_size=6, grad_accum=2, max_steps=1, kd_chunk_size=7))
    row = metrics(tmp_path / "o")[0]

    student, tok = load(sft_student)
    teacher, _ = load(tiny_teacher_dir)
    stop = set(eos_ids(student, tok))
    texts, lengths = [], []
    for r in records:
        answer = greedy_naive(student, prompt_ids(tok, r["messages"][:-1]), stop, 12)
        lengths.append(len(answer))
        texts.append(tok.decode(answer))  # the reference continues from text, not from the loop's token ids
    assert row["onpolicy/share"] == 1.0 and row["onpolicy/gen_tokens"] == pytest.approx(sum(lengths) / len(lengths))
    T = 1.5
    params = [p for p in student.parameters()]
    student.train(False)
    full = [tok(tok.decode(prompt_ids(tok, r["messages"][:-1])) + text, add_special_tokens=False)["input_ids"]
            for r, text in zip(records, texts)]  # the reference continues from text, not from the loop's token ids

    def reverse_kl(s, t):  # KL(student || teacher) at loss temperature T
        return F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), log_target=True, reduction="sum") * T * T

    kd, ce, n_gen, n_ref = naive_sums(student, teacher, tok, records, full, reverse_kl)
    assert n_gen == sum(lengths)
    assert row["onpolicy_kd"] == pytest.approx(kd.item() / n_gen, rel=1e-4)
    assert row["loss"] == pytest.approx(ce.item() / n_ref, rel=1e-5)  # the paired CE: the collected answers
    g_kd = torch.autograd.grad(kd, params, retain_graph=True)
    g_ce = torch.autograd.grad(ce, params)
    dot = sum((a * b).sum() for a, b in zip(g_kd, g_ce))
    cos = dot / (math.sqrt(sum((a * a).sum() for a in g_kd)) * math.sqrt(sum((b * b).sum() for b in g_ce)))
    assert row["cos/onpolicy_kd"] == pytest.approx(float(cos), abs=2e-3)
    assert "cos/logit_kd" not in row and "logit_kd" not in row  # no dataset micro-batch in this window


def test_on_policy_ce_trains_the_records_answers_beside_kd_on_the_students_own(sft_student, tiny_teacher_dir,
                                                                              mixed_file, tmp_path):
    """The default --on-policy-ce, without --sckd, λ = 1, greedy, one window: the step's gradient is that of
    (1 - w)·CE(collected answers) / their tokens + w·KD(separately generated answers) / theirs, computed naively;
    with --no-on-policy-ce it is that of w·KD / (generated tokens)."""
    import torch.nn.functional as F

    from imitate.models import eos_ids, prompt_ids

    records = [json.loads(x) for x in mixed_file.read_text().splitlines()]
    w = 0.3
    kw = dict(teacher=f"hf:{tiny_teacher_dir}", full=True, kd_weight=w, on_policy=1.0, on_policy_warmup=0.0,
              on_policy_temperature=0.0, on_policy_max_tokens=12, batch_size=6, grad_accum=2, max_steps=1,
              kd_chunk_size=5, max_grad_norm=1e9)
    run(cfg_for(mixed_file, sft_student, tmp_path / "o", **kw))
    run(cfg_for(mixed_file, sft_student, tmp_path / "n", on_policy_ce=False, **kw))
    row, plain = metrics(tmp_path / "o")[0], metrics(tmp_path / "n")[0]
    student, tok = load(sft_student)
    teacher, _ = load(tiny_teacher_dir)
    stop = set(eos_ids(student, tok))
    full = [(p := prompt_ids(tok, r["messages"][:-1])) + greedy_naive(student, p, stop, 12) for r in records]

    def forward_kl(s, t):
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")

    kd, ce, n_gen, n_ref = naive_sums(student, teacher, tok, records, full, forward_kl)
    assert row["onpolicy_kd"] == pytest.approx(kd.item() / n_gen, rel=1e-4)
    assert row["loss"] == pytest.approx(ce.item() / n_ref, rel=1e-5)  # the records' answers, as with --sckd
    grads = torch.autograd.grad((1 - w) * ce / n_ref + w * kd / n_gen, list(student.parameters()),
                                retain_graph=True)
    assert row["grad_norm"] == pytest.approx(math.sqrt(sum(float((g * g).sum()) for g in grads)), rel=1e-3)
    # the same run with --no-on-policy-ce takes no CE: a different gradient
    assert "loss" not in plain and plain["onpolicy_kd"] == pytest.approx(row["onpolicy_kd"], rel=1e-6)
    grads = torch.autograd.grad(w * kd / n_gen, list(student.parameters()))
    assert plain["grad_norm"] == pytest.approx(math.sqrt(sum(float((g * g).sum()) for g in grads)), rel=1e-3)


def test_lambda_one_never_trains_on_the_records_answers(sft_student, tiny_teacher_dir, tmp_path):
    """--no-on-policy-ce: same prompts, other answers of the same token length: λ = 1 trains to the same weights;
    λ = 0 does not, nor does λ = 1 with the default --on-policy-ce."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_student)
    records = make_records(12, seed=5)
    rng = random.Random(0)
    other = []
    for r in records:
        n = len(tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
        other.append({"messages": [r["messages"][0], {"role": "assistant",
                                                       "content": "".join(rng.choice("0123456789") for _ in range(n))}]})
    for r, o in zip(records, other):  # precondition: the same token counts, so the same batch plan
        assert len(encode(tok, r["messages"])[0]) == len(encode(tok, o["messages"])[0])
    a, b = write(tmp_path / "a.jsonl", records), write(tmp_path / "b.jsonl", other)
    kw = dict(teacher=f"hf:{tiny_teacher_dir}", max_steps=3, batch_size=3, grad_accum=2, on_policy_max_tokens=8,
              on_policy_warmup=0.0, on_policy_ce=False)
    for lam in (1.0, 0.0):
        run(cfg_for(a, sft_student, tmp_path / f"a{lam}", on_policy=lam, **kw))
        run(cfg_for(b, sft_student, tmp_path / f"b{lam}", on_policy=lam, **kw))
    for d in (a, b):
        run(cfg_for(d, sft_student, tmp_path / f"{d.stem}ce", on_policy=1.0, **{**kw, "on_policy_ce": True}))
    wa, wb = adapter(tmp_path / "a1.0"), adapter(tmp_path / "b1.0")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all("loss" not in r for r in metrics(tmp_path / "a1.0"))  # no CE was ever taken
    for x, y in (("a0.0", "b0.0"), ("ace", "bce")):  # the comparison can tell
        wa, wb = adapter(tmp_path / x), adapter(tmp_path / y)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) > 1e-4, x


@pytest.mark.parametrize("sckd", [False, True])
def test_steps_before_the_warmup_are_exactly_todays_kd(tiny_model_dir, tiny_teacher_dir, mixed_file, tmp_path, sckd):
    """--on-policy 0.5 with half the steps as warm-up: steps 1-2 log the very numbers of plain KD (the on-policy
    term and its SCKD group cost nothing there); later steps do hold on-policy micro-batches."""
    kw = dict(teacher=f"hf:{tiny_teacher_dir}", max_steps=4, batch_size=2, grad_accum=2, sckd=sckd, kd="jsd")
    run(cfg_for(mixed_file, tiny_model_dir, tmp_path / "kd", **kw))
    summary = run(cfg_for(mixed_file, tiny_model_dir, tmp_path / "op", on_policy=0.5, on_policy_warmup=0.5,
                          on_policy_max_tokens=6, **kw))
    kd, op = metrics(tmp_path / "kd"), metrics(tmp_path / "op")
    for x, y in zip(kd[:2], op[:2]):
        for key in ("loss", "logit_kd", "grad_norm") + (("cos/logit_kd", "on/logit_kd") if sckd else ()):
            assert x[key] == y[key], key
        assert y["onpolicy/share"] == 0.0 and "onpolicy_kd" not in y and "cos/onpolicy_kd" not in y
    flags = [f for s in (2, 3) for f in onpolicy.choose(0, s, [[0]] * 2, 0.5, 2)]
    assert summary["on_policy"]["warmup_steps"] == 2
    assert [r["onpolicy/share"] for r in op[2:4]] == [sum(flags[:2]) / 2, sum(flags[2:]) / 2]


def test_resume_matches_a_straight_run(sft_student, tiny_teacher_dir, mixed_file, tmp_path):
    """Generation is seeded per (seed, step, micro-batch): a stopped + resumed run samples the same answers."""
    kw = dict(teacher=f"hf:{tiny_teacher_dir}", max_steps=4, batch_size=3, on_policy=0.7, on_policy_warmup=0.25,
              on_policy_max_tokens=6, sckd=True)
    straight = run(cfg_for(mixed_file, sft_student, tmp_path / "a", **kw))
    run(cfg_for(mixed_file, sft_student, tmp_path / "b", save_every=2, **kw), stop_after=3)
    resumed = run(cfg_for(mixed_file, sft_student, tmp_path / "b", save_every=2, resume=True, **kw))
    assert resumed["start_step"] == 2
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert resumed["on_policy"]["share"] == pytest.approx(straight["on_policy"]["share"])
    assert resumed["distill"]["on_rate"] == pytest.approx(straight["distill"]["on_rate"])


# ---------------------------------------------------------------------------------------------------------------------
# SCKD pairing on constructed gradients
# ---------------------------------------------------------------------------------------------------------------------


def _lin(theta, direction):
    return (theta * torch.as_tensor(direction, dtype=theta.dtype)).sum()


def test_gate_pairs_a_term_with_its_own_group_and_applies_every_group():
    """The on-policy term is compared with the CE of its own micro-batches only: against the window's whole CE
    (1, 1) it would be on (cos > 0), against its group's (0, 1) it is off. Both groups' CE enter the update."""
    theta = torch.zeros(2, requires_grad=True)
    gate = SCKDGate([theta], {"kd": 1.0, "op": 0.5}, pairs={"op": "onpolicy"})
    gate.accumulate(_lin(theta, [1, 0]), {"kd": _lin(theta, [1, 0.1]), "op": _lin(theta, [0, 0])})
    gate.accumulate(_lin(theta, [0, 1]), {"kd": _lin(theta, [0, 0]), "op": _lin(theta, [1, -0.2])}, group="onpolicy")
    report = gate.step()
    assert report["op"]["cos"] == pytest.approx(-0.2 / math.sqrt(1.04)) and not report["op"]["on"]
    assert report["kd"]["cos"] == pytest.approx(1 / math.sqrt(1.01)) and report["kd"]["on"]
    torch.testing.assert_close(theta.grad, torch.tensor([2.0, 1.1]))


def test_an_off_term_gives_its_weight_back_to_its_own_group_only():
    theta = torch.zeros(2, requires_grad=True)
    gate = SCKDGate([theta], {"kd": 1.0, "op": 1.0}, pairs={"op": "onpolicy"}, give_back={"kd": 1.0, "op": 3.0})
    gate.accumulate(_lin(theta, [1, 0]), {"kd": _lin(theta, [1, 0]), "op": _lin(theta, [0, 0])})  # kd on
    gate.accumulate(_lin(theta, [0, 1]), {"kd": _lin(theta, [0, 0]), "op": _lin(theta, [0, -1])}, group="onpolicy")
    report = gate.step()
    assert report["kd"]["on"] and not report["op"]["on"]
    torch.testing.assert_close(theta.grad, torch.tensor([1.0 + 1.0, 1.0 * (1 + 3.0)]))  # only the on-policy CE x4


def test_gate_groups_reduce_across_ranks_that_hold_different_kinds():
    """Rank 0 holds only a dataset micro-batch, rank 1 only an on-policy one: the vectors have the same layout on both
    ranks, and with the all-reduce's sum both decide from the global gradients of each pair."""

    def ranks(reducer):
        thetas = [torch.zeros(2, requires_grad=True) for _ in range(2)]
        gates = [SCKDGate([t], {"kd": 1.0, "op": 1.0}, pairs={"op": "onpolicy"}, reducer=reducer) for t in thetas]
        gates[0].accumulate(_lin(thetas[0], [1, 0]), {"kd": _lin(thetas[0], [1, 1]), "op": _lin(thetas[0], [0, 0])})
        gates[1].accumulate(_lin(thetas[1], [0, 1]), {"kd": _lin(thetas[1], [0, 0]), "op": _lin(thetas[1], [-1, 2])},
                            group="onpolicy")
        return [g.step() for g in gates], thetas

    local = []
    ranks(lambda v: (local.append(v.clone()), v)[1])
    assert local[0].shape == local[1].shape == (2 + 2 * 2,)
    total = local[0] + local[1]
    reports, thetas = ranks(lambda v: total.clone())
    assert reports[0] == reports[1]
    assert reports[0]["kd"]["cos"] == pytest.approx(1 / math.sqrt(2))  # vs rank 0's dataset CE (1, 0)
    assert reports[0]["op"]["cos"] == pytest.approx(2 / math.sqrt(5))  # vs rank 1's on-policy CE (0, 1)
    torch.testing.assert_close(thetas[0].grad, torch.tensor([2.0, 1.0]))  # own CE + own (on) kd term
    torch.testing.assert_close(thetas[1].grad, torch.tensor([-1.0, 3.0]))


# ---------------------------------------------------------------------------------------------------------------------
# data parallel, CLI
# ---------------------------------------------------------------------------------------------------------------------


def test_two_processes_match_one_process(sft_student, tiny_teacher_dir, mixed_file, tmp_path):
    """2 CPU ranks (gloo), each generating its own micro-batch == 1 process with grad-accum 2: the same micro-batches
    are on-policy, the same answers sampled, the same weights (every gate forced on: under DDP the gate's cosine is
    the ranks' summed dots over summed norms, not the single process's, see sckd.py)."""
    args = ["--data", mixed_file, "--student", sft_student, "--teacher", f"hf:{tiny_teacher_dir}", "--on-policy",
            "0.5", "--on-policy-warmup", "0", "--on-policy-max-tokens", "6", "--sckd", "--sckd-threshold", "-1",
            "--max-steps", "4", "--batch-size", "2", "--lora-dropout", "0", "--eval-split", "0", "--lr", "1e-2",
            "--no-progress"]
    summary, ddp, single = two_ranks_match_accumulation(args, tmp_path)
    assert summary["devices"] == 2
    rows_d, rows_s = metrics(ddp), metrics(single)
    expected = [sum(onpolicy.choose(0, s, [[0]] * 2, 0.5, 0)) / 2 for s in range(4)]
    assert [r["onpolicy/share"] for r in rows_d] == [r["onpolicy/share"] for r in rows_s] == expected
    assert 0 < sum(expected) < 4  # both kinds occur, and in some window one rank holds each
    for x, y in zip(rows_d, rows_s):
        assert x.keys() == y.keys()
        for key in ("loss", "logit_kd", "onpolicy_kd", "onpolicy/gen_tokens", "onpolicy/cap_hit"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


GATE_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from imitate.train.sckd import SCKDGate, distributed_sum
from imitate.train.onpolicy import choose
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)
theta = torch.zeros(16, requires_grad=True)
lin = lambda: (theta * torch.randn(16)).sum()
gate = SCKDGate([theta], {"logit_kd": 0.5, "onpolicy_kd": 0.5}, pairs={"onpolicy_kd": "onpolicy"},
                reducer=distributed_sum())
reports = []
for step in range(12):
    flags = choose(0, step, [[0]] * 2, 0.5, 0)
    zero = theta.sum() * 0
    if flags[rank]:  # this rank's micro-batch is on-policy
        gate.accumulate(lin(), {"logit_kd": zero, "onpolicy_kd": lin()}, group="onpolicy")
    else:
        gate.accumulate(lin(), {"logit_kd": lin(), "onpolicy_kd": zero})
    reports.append({"flags": flags, **{k: v["on"] for k, v in gate.step().items()}})
    theta.grad = None
json.dump(reports, open(sys.argv[1] + f"/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_ranks_holding_different_kinds_take_the_same_gate_decisions(tmp_path):
    """Real gloo all-reduce, 2 ranks with different gradients and, in some steps, different micro-batch kinds: both
    ranks log the same on-policy choices and the same gate decisions."""
    import os
    import subprocess
    import sys

    (tmp_path / "gate.py").write_text(GATE_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "gate.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert any(f[0] != f[1] for f in (r["flags"] for r in r0))  # steps where the ranks hold different kinds
    ons = [r[k] for r in r0 for k in ("logit_kd", "onpolicy_kd")]
    assert any(ons) and not all(ons)  # decisions that could have differed


@pytest.mark.parametrize("kd", ["forward-kl", "reverse-kl"])
def test_cli_on_policy_end_to_end(sft_student, tiny_teacher_dir, mixed_file, tmp_path, kd):
    res = invoke("--data", mixed_file, "--student", sft_student, "--teacher", f"hf:{tiny_teacher_dir}",
                 "--on-policy", "0.5", "--on-policy-warmup", "0.2", "--on-policy-temperature", "0.7",
                 "--on-policy-max-tokens", "5", "--max-steps", "5", "--eval-split", "0", "--no-progress", "--json",
                 "--kd", kd, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    # reverse KL on the student's own answers hurt in the benchmark (issue #27): said before the first step
    assert ("Warning: --kd reverse-kl with --on-policy" in res.stderr) == (kd == "reverse-kl"), res.stderr
    summary = json.loads(res.stdout)["on_policy"]
    rows = metrics(tmp_path / "o")
    on = [r for r in rows if r.get("onpolicy/share")]
    assert on and all(0 < r["onpolicy/gen_tokens"] <= 5 and 0 <= r["onpolicy/cap_hit"] <= 1 for r in on)
    assert all(r["gen_s"] >= 0 and r["train_s"] >= 0 for r in rows)
    assert summary["lambda"] == 0.5 and summary["warmup_steps"] == 1 and 0 < summary["share"] < 1
    assert summary["mean_gen_tokens"] <= 5 and summary["gen_s"] > 0


@pytest.mark.parametrize("args, warned", [
    (["--on-policy", "1", "--no-on-policy-ce"], True),  # λ 1 never trains on the collected answers again
    (["--on-policy", "1"], False), (["--on-policy", "0.5", "--no-on-policy-ce"], False),
    (["--on-policy", "1", "--no-on-policy-ce", "--sckd"], False),  # SCKD trains the records' CE beside the gate
])
def test_cli_warns_before_kd_only_lambda_one(sft_student, tiny_teacher_dir, mixed_file, tmp_path, args, warned):
    res = invoke("--data", mixed_file, "--student", sft_student, "--teacher", f"hf:{tiny_teacher_dir}", *args,
                 "--on-policy-warmup", "0.5", "--on-policy-max-tokens", "3", "--max-steps", "2", "--eval-split", "0",
                 "--no-progress", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert ("Warning: --on-policy 1 with --no-on-policy-ce" in res.stderr) == warned, res.stderr


@pytest.mark.parametrize("args, expect", [
    (["--on-policy", "1.5"], "--on-policy must be >= 0 and <= 1"),
    (["--on-policy", "0.5", "--on-policy-warmup", "1"], "--on-policy-warmup must be >= 0 and < 1"),
    (["--on-policy", "0.5", "--on-policy-max-tokens", "0"], "--on-policy-max-tokens must be at least 1"),
    (["--on-policy", "0.5"], "--on-policy needs a local teacher"),
    (["--on-policy", "0.5", "--teacher", "TEACHER", "--kd-weight", "0"], "--kd-weight 0 switches off"),
])
def test_usage_errors(args, expect, tiny_model_dir, tiny_teacher_dir, mixed_file, tmp_path):
    args = [str(tiny_teacher_dir) if a == "TEACHER" else a for a in args]
    args = [f"hf:{a}" if a == str(tiny_teacher_dir) else a for a in args]
    res = invoke("--data", mixed_file, "--student", tiny_model_dir, "--out", tmp_path / "o", *args)
    assert res.exit_code == 2, res.output
    assert expect in res.output and "Error:" in res.output


# ---------------------------------------------------------------------------------------------------------------------
# one on-policy step against a plain GKD step (issue #27)
# ---------------------------------------------------------------------------------------------------------------------

# Like many real templates (and the quality benchmark's `dates` and `sums`): a space between the role and the content,
# a generation prompt that stops at the role, so answers start with a space token
SPACE_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<|end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def sums_records(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice([rng.randint(1, 9), rng.randint(10, 99), rng.randint(100, 999)]), rng.randint(1, 99)
        p = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Could you tell me the sum of {a} and {b}?"])
        out.append({"messages": [{"role": "user", "content": p},
                                 {"role": "assistant", "content": f" {a} plus {b} is {a + b}."}]})
    return out


@pytest.fixture(scope="module")
def sums_models(tmp_path_factory):
    """(dir, records file, student, teacher): a space-template tokenizer, a random teacher, and a student fine-tuned on
    "47 plus 38 is 85."-shaped records, so that it answers with a leading space and stops at <|end|>."""
    from tiny import make_model, make_tokenizer

    d = tmp_path_factory.mktemp("sums")
    make_tokenizer(d / "tok", chat_template=SPACE_TEMPLATE)
    make_model(d / "init", tokenizer_dir=d / "tok", chat_template=SPACE_TEMPLATE, hidden_size=32, seed=0)
    make_model(d / "teacher", tokenizer_dir=d / "tok", chat_template=SPACE_TEMPLATE, hidden_size=48, num_layers=3,
               seed=1)
    data = write(d / "train.jsonl", sums_records(64, seed=1))
    run(cfg_for(data, d / "init", d / "student", full=True, batch_size=8, lr=1e-2, warmup=0.1, max_steps=60))
    return d, write(d / "op.jsonl", sums_records(8, seed=2)), d / "student", d / "teacher"


@pytest.mark.parametrize("kd, ce, cut", [("reverse-kl", False, 0), ("reverse-kl", True, 0), ("forward-kl", False, 0),
                                         ("reverse-kl", False, 0.5), ("reverse-kl", True, 0.5)])
def test_one_onpolicy_step_equals_a_plain_gkd_step(sums_models, kd, ce, cut):
    """One on-policy window of the loop (sampling at temperature 1 from left-padded prompts of different lengths,
    answers with a leading space, ending at <|end|> or at the cap) against a plain GKD step on the SAME sampled
    tokens: each sequence alone (no padding), prompt from the chat template, full logits; loss
    w·(Σ KD over the answer tokens) / answer tokens [+ (1 - w)·(Σ CE of the records' answers) / their tokens], and its
    gradient, parameter by parameter. (Until #27's second look the loop divided both sums by all their tokens
    together: with the CE kept, half this gradient.) With --on-policy-cut P the KD sum and the token count stop at each answer's first token whose teacher
    probability is below P times the teacher's top token's (that token's own position still counts)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imitate.train import loop
    from imitate.train.distill import ONPOLICY
    from imitate.train.step import accumulate_window

    d, data, student_dir, teacher_dir = sums_models
    w = 0.4
    cfg = cfg_for(data, student_dir, d / f"o-{kd}-{ce}", teacher=f"hf:{teacher_dir}", full=True, kd=kd, kd_weight=w,
                  on_policy=1.0, on_policy_warmup=0.0, on_policy_ce=ce, on_policy_max_tokens=14, batch_size=8,
                  max_grad_norm=0.0, on_policy_cut=cut)
    prep = loop.prepare(cfg)
    s = loop.setup(cfg, prep)
    window = s.plan(0)[:1]
    assert s.policy.kinds(0, window) == [True]
    exs = [prep.train_ex[i] for i in window[0]]
    batch = s.policy.batch(s.accelerator, s.model, exs, 0, 0, s.distiller)
    n, _ = s.policy.denominators(s.accelerator, [batch], window, [e.n_targets for e in prep.train_ex], s.distiller.terms)
    sums, _ = accumulate_window(s.accelerator, s.model, [batch], n, s.distiller, None, s.vocab_size,
                                s.policy.kd_scale)
    got = {k: p.grad for k, p in s.model.named_parameters()}

    # the reference, from the records' text and the sampled token ids only
    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    records = [json.loads(x) for x in data.read_text().splitlines()]
    ids = batch["input_ids"].tolist()
    space, end = tok.convert_tokens_to_ids("Ġ"), tok.eos_token_id
    kd_sum, ce_sum, n_gen, n_ref, answers, n_cut = 0.0, 0.0, 0, 0, [], 0
    for row, ex in enumerate(exs):
        rec = records[int(ex.where.rsplit(":", 1)[1].split()[0]) - 1]
        prompt = tok.apply_chat_template(rec["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        answer = ids[row][len(prompt) : int(batch["attention_mask"][row].sum())]  # the sampled tokens, cut or not
        assert ids[row][: len(prompt)] == list(prompt)  # the student answered the record's own prompt
        full = torch.tensor([list(prompt) + answer])
        s_logits = student(input_ids=full).logits[0, len(prompt) - 1 : -1].double()
        with torch.no_grad():
            t_logits = teacher(input_ids=full).logits[0, len(prompt) - 1 : -1].double()
        if cut:  # KD up to and including the first token the teacher finds implausible
            gap = t_logits.gather(1, torch.tensor(answer)[:, None])[:, 0] - t_logits.max(-1).values
            bad = (gap < math.log(cut)).nonzero()
            keep = int(bad[0]) + 1 if len(bad) else len(answer)
            n_cut += keep < len(answer)
            s_logits, t_logits = s_logits[:keep], t_logits[:keep]
        s_lp, t_lp = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
        if kd == "reverse-kl":
            kd_sum = kd_sum + (s_lp.exp() * (s_lp - t_lp)).sum()
        else:
            kd_sum = kd_sum + (t_lp.exp() * (t_lp - s_lp)).sum()
        n_gen += len(s_lp)
        answers.append(answer)
        if ce:  # the record's answer as the teacher wrote it after the prompt, <|end|>, the template's "\n" after it
            ref = list(prompt) + tok(rec["messages"][-1]["content"] + "<|end|>\n", add_special_tokens=False)["input_ids"]
            logits = student(input_ids=torch.tensor([ref])).logits[0, len(prompt) - 1 : -1].double()
            ce_sum = ce_sum + F.cross_entropy(logits, torch.tensor(ref[len(prompt):]), reduction="sum")
            n_ref += len(ref) - len(prompt)
    # the case the issue describes: a leading space, answers of different lengths, some ending at <|end|>
    assert sum(a[0] == space for a in answers) >= len(answers) // 2
    assert len({len(a) for a in answers}) > 1 and any(a[-1] == end for a in answers)
    assert len({len(tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False))
                for r in records}) > 1  # prompts of different lengths: generation was left-padded
    if cut:  # the cut happened, and not everywhere at the first token
        assert 0 < n_cut == batch["onpolicy"]["cut"] and batch["onpolicy"]["graded"] == n_gen
        assert len(exs) < n_gen < batch["onpolicy"]["tokens"]
    names = ["ce", *s.distiller.terms]
    assert float(sums[names.index(ONPOLICY)]) == pytest.approx(float(kd_sum.detach()), rel=1e-5)
    # the plain GKD step's loss (the benchmark's reference loop, GKD, TRL): each term a mean over its own tokens
    assert n == (n_ref if ce else n_gen)
    loss = w * kd_sum / n_gen + ((1 - w) * ce_sum / n_ref if ce else 0.0)
    want = dict(zip([k for k, _ in student.named_parameters()], torch.autograd.grad(loss, list(student.parameters()))))
    for k, g in got.items():
        torch.testing.assert_close(g.double(), want[k].double(), rtol=1e-4, atol=1e-7)


def test_cut_ends_at_each_answer_in_a_packed_row(tiny_teacher_dir):
    """`onpolicy.cut_implausible` on a packed on-policy row holding three answers: each answer loses exactly its targets after
    its own first implausible token (by the teacher's logits on that row), a cut never runs into the next answer,
    and P = 0 keeps every target."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from imitate.train.distill import Distiller

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    rng = random.Random(5)
    exs = [onpolicy.onpolicy_example([rng.randrange(3, 60) for _ in range(p)], [rng.randrange(3, 60) for _ in range(a)],
                                     "x", 64) for p, a in ((4, 6), (3, 5), (5, 7))]
    batch = collate(exs, pad_id=0, packing=True)
    vocab = teacher.config.vocab_size
    with torch.no_grad():  # each answer alone: what the packed row's block-diagonal attention must give
        logits = torch.cat([teacher(input_ids=torch.tensor([ex.input_ids])).logits[0].double() for ex in exs])
    labels = batch["labels"][0].clone()
    at = (labels != IGNORE).nonzero()[:, 0].tolist()
    gap = {i: float(logits[i, labels[i]] - logits[i, :vocab].max()) for i in at}
    low = sorted(gap.values())
    p = math.exp((low[len(low) // 3] + low[len(low) // 3 + 1]) / 2)  # about a third of the tokens implausible
    want, start = labels.clone(), 0
    for ex in exs:  # the same answers, one at a time, in the packed row's coordinates
        span = [i for i in at if start <= i < start + len(ex.input_ids)]
        bad = [i for i in span if gap[i] < math.log(p)]
        if bad:
            want[[i for i in span if i > bad[0]]] = IGNORE
        start += len(ex.input_ids)
    assert (want != labels).any() and (want[at] != IGNORE).sum() > len(exs)
    d = Distiller(SimpleNamespace(kd="reverse-kl", kd_weight=0.5, kd_chunk_size=5),
                  SimpleNamespace(vocab_size=vocab, terms=[]), teacher)
    cut = onpolicy.cut_implausible(d, batch, p)
    assert torch.equal(batch["labels"][0], want)
    assert cut == sum(any(gap[i] < math.log(p) for i in at if s <= i < s + len(ex.input_ids))
                      for s, ex in zip([0, len(exs[0].input_ids), len(exs[0].input_ids) + len(exs[1].input_ids)], exs))
    assert batch["teacher_out"].hidden_states[-1].shape[:2] == batch["input_ids"].shape
    again = collate(exs, pad_id=0, packing=True)
    assert onpolicy.cut_implausible(d, again, 0.0) == 0 and torch.equal(again["labels"], collate(exs, pad_id=0, packing=True)["labels"])


def test_to_device_moves_the_reference_batch_of_an_on_policy_micro_batch():
    """On CUDA the on-policy CE (--on-policy-ce, the default) failed: batch["reference"] stayed on the CPU (seen on
    an H200 in benchmarks/gpu_check.sh). The meta device stands in for the GPU here."""
    from imitate.train.step import to_device

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "onpolicy": {"tokens": 4},
             "reference": {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.zeros(2, 5)}}
    out = to_device(batch, "meta")
    assert out["input_ids"].device.type == "meta" and out["onpolicy"] == {"tokens": 4}
    assert all(t.device.type == "meta" for t in out["reference"].values())
