"""Distillation from several local teachers: one KD term per teacher (each gated by SCKD on its own, the same way on 2
CPU ranks as in one process), --teacher-weight shares, and --teacher-mix mean against the averaged distribution."""

from __future__ import annotations

import json

import pytest
import torch
from test_distill import cfg_for, tokenized, write
from test_train import make_records, metrics, two_ranks_match_accumulation

from imitate.errors import UsageError
from imitate.train.loop import run


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("kd") / "clean.jsonl", make_records(16))


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_tokenizer_dir):
    """Two teachers sharing the student's tokenizer, of different sizes and seeds: 'big' and 'small'."""
    from tiny import make_model

    root = tmp_path_factory.mktemp("team")
    make_model(root / "big", tokenizer_dir=tiny_tokenizer_dir, hidden_size=48, num_layers=3, intermediate_size=96,
               seed=1)
    make_model(root / "small", tokenizer_dir=tiny_tokenizer_dir, hidden_size=32, num_layers=2, seed=7)
    return root / "big", root / "small"


def naive_terms(records, student_dir, teacher_dirs, T: float, shares=None):
    """(CE sum, [KL(teacher_k || student) sum per teacher], KL(mean || student) sum, target tokens) over full logits;
    KD skips the target after the end-of-turn token, as imitate does."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teachers = [AutoModelForCausalLM.from_pretrained(d).eval() for d in teacher_dirs]
    shares = shares or [1 / len(teachers)] * len(teachers)
    ce, kls, mix, n = 0.0, [0.0] * len(teachers), 0.0, 0
    with torch.no_grad():
        for ids, labels in tokenized(records, tok):
            lab = torch.tensor(labels)
            keep = lab != -100
            s_all = student(input_ids=torch.tensor([ids])).logits[0].double()
            ce += F.cross_entropy(s_all[keep], lab[keep], reduction="sum").item()
            taught = keep & (torch.tensor(ids) != tok.eos_token_id)
            ls = F.log_softmax(s_all[taught] / T, -1)
            p_mix = 0.0
            for k, t in enumerate(teachers):
                lt = F.log_softmax(t(input_ids=torch.tensor([ids])).logits[0].double()[taught] / T, -1)
                kls[k] += F.kl_div(ls, lt, log_target=True, reduction="sum").item()
                p_mix = p_mix + shares[k] * lt.exp()
            mix += F.kl_div(ls, p_mix.log(), log_target=True, reduction="sum").item()
            n += int(keep.sum())
    return ce, kls, mix, n


def test_two_teacher_terms_equal_naive_per_teacher_kd_and_the_objective_is_their_weighted_sum(
        tiny_model_dir, team, tmp_path):
    from imitate.train.distill import Distiller, Plan

    records = make_records(8, seed=4)
    data = write(tmp_path / "d.jsonl", records)
    big, small = team
    cfg = cfg_for(data, tiny_model_dir, tmp_path / "o", teacher=[f"hf:{big}", f"hf:{small}"], temperature=1.5,
                  teacher_weight={"big": 0.6, "small": 0.2}, kd_weight=0.4, max_steps=1, grad_accum=2, kd_chunk_size=5)
    summary = run(cfg)
    d = summary["distill"]
    assert d["terms"] == ["logit_kd/big", "logit_kd/small"] and d["teacher_shares"] == [0.75, 0.25]
    row = metrics(tmp_path / "o")[0]
    ce, kls, _, n = naive_terms(records, tiny_model_dir, [big, small], 1.5)
    assert row["loss"] == pytest.approx(ce / n, rel=1e-5)
    assert row["logit_kd/big"] == pytest.approx(kls[0] * 1.5**2 / n, rel=1e-4)
    assert row["logit_kd/small"] == pytest.approx(kls[1] * 1.5**2 / n, rel=1e-4)
    assert kls[0] != pytest.approx(kls[1], rel=1e-2)  # the two teachers differ, so the names cannot be swapped
    # the objective: (1 - w) CE + w (share_big KD_big + share_small KD_small)
    dist = Distiller(cfg, Plan(terms=d["terms"]), teacher=object(), teachers=[object(), object()])
    assert dist.weights() == pytest.approx({"logit_kd/big": 0.4 * 0.75, "logit_kd/small": 0.4 * 0.25})
    terms = {"ce": torch.tensor(2.0), "logit_kd/big": torch.tensor(3.0), "logit_kd/small": torch.tensor(5.0)}
    assert float(dist.combine(terms)) == pytest.approx(0.6 * 2 + 0.4 * (0.75 * 3 + 0.25 * 5))


def test_teacher_mix_mean_is_kd_against_the_weighted_average_distribution(tiny_model_dir, team, tmp_path):
    records = make_records(6, seed=9)
    data = write(tmp_path / "d.jsonl", records)
    big, small = team
    summary = run(cfg_for(data, tiny_model_dir, tmp_path / "o", teacher=[f"hf:{big}", f"hf:{small}"],
                          teacher_mix="mean", teacher_weight={"big": 0.7, "small": 0.3}, temperature=2.0, t2=False,
                          max_steps=1, grad_accum=2, kd_chunk_size=4))
    assert summary["distill"]["terms"] == ["logit_kd"] and summary["distill"]["teacher_mix"] == "mean"
    row = metrics(tmp_path / "o")[0]
    _, kls, mix, n = naive_terms(records, tiny_model_dir, [big, small], 2.0, shares=[0.7, 0.3])
    assert row["logit_kd"] == pytest.approx(mix / n, rel=1e-4)
    assert mix < 0.7 * kls[0] + 0.3 * kls[1]  # KL is convex: the mixture term is not the mean of the two terms


def first_cosines(data, student, teachers, tmp_path) -> dict[str, float]:
    run(cfg_for(data, student, tmp_path / "probe", teacher=teachers, sckd=True, max_steps=1, batch_size=3,
                lora_dropout=0.0))
    row = metrics(tmp_path / "probe")[0]
    return {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("cos/")}


def test_sckd_gates_each_teacher_on_its_own(tiny_model_dir, team, tmp_path):
    data = write(tmp_path / "d.jsonl", make_records(12, seed=2))
    teachers = [f"hf:{p}" for p in team]
    cos = first_cosines(data, tiny_model_dir, teachers, tmp_path)
    assert set(cos) == {"logit_kd/big", "logit_kd/small"} and cos["logit_kd/big"] != cos["logit_kd/small"]
    phi = sum(cos.values()) / 2  # between the two: step 1 must let one teacher in and keep the other out
    summary = run(cfg_for(data, tiny_model_dir, tmp_path / "o", teacher=teachers, sckd=True, sckd_threshold=phi,
                          max_steps=3, batch_size=3, lora_dropout=0.0))
    rows = metrics(tmp_path / "o")
    hi, lo = sorted(cos, key=cos.get, reverse=True)
    assert rows[0][f"on/{hi}"] is True and rows[0][f"on/{lo}"] is False
    for r in rows:
        for name in cos:
            assert r[f"on/{name}"] == (r[f"cos/{name}"] > phi)
    rates = summary["distill"]["on_rate"]
    assert set(rates) == set(cos) and rates == {k: rows[-1][f"on_rate/{k}"] for k in cos}
    card = (tmp_path / "o" / "README.md").read_text()
    assert "logit_kd/big" in card and "logit_kd/small" in card and str(team[1]) in card


def test_two_teachers_on_two_ranks_match_one_process_with_accumulation(tiny_model_dir, team, records_file, tmp_path):
    """2 CPU ranks (gloo) x grad-accum 1 == 1 process x grad-accum 2 with two teachers under --sckd, every gate forced
    on (the cosine under data parallel is the mean of the ranks' alignments, not that of the summed gradients, so only
    forced gates make the two runs comparable): per-teacher terms are reduced and the adapters are equal."""
    args = ["--data", records_file, "--student", tiny_model_dir, "--teacher", f"hf:{team[0]}", "--teacher",
            f"hf:{team[1]}", "--sckd", "--sckd-threshold", "-1", "--max-steps", "3", "--batch-size", "3",
            "--lora-dropout", "0", "--eval-split", "0", "--lr", "1e-2", "--no-progress"]
    summary, ddp, single = two_ranks_match_accumulation(args, tmp_path)
    assert summary["devices"] == 2 and summary["distill"]["terms"] == ["logit_kd/big", "logit_kd/small"]
    for x, y in zip(metrics(ddp), metrics(single)):
        for key in ("loss", "logit_kd/big", "logit_kd/small"):
            assert x[key] == pytest.approx(y[key], rel=1e-4)


GATE_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from imitate.train.sckd import SCKDGate, distributed_sum

dist.init_process_group("gloo")
rank = dist.get_rank()
theta = torch.zeros(2, requires_grad=True)
lin = lambda v: (theta * torch.tensor(v)).sum()
# g_s = (1, 0) on both ranks. Rank 0 alone would take teacher a and leave b; rank 1 alone the opposite. Together:
# <g_s, g_a> = 2 - 1 > 0 (on), <g_s, g_b> = -3 + 1 < 0 (off)
local = {0: {"logit_kd/a": [2, 1], "logit_kd/b": [-3, 0]}, 1: {"logit_kd/a": [-1, 3], "logit_kd/b": [1, 2]}}[rank]
gate = SCKDGate([theta], {"logit_kd/a": 0.5, "logit_kd/b": 0.5}, reducer=distributed_sum())
gate.accumulate(lin([1, 0]), {k: lin(v) for k, v in local.items()})
report = gate.step()
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
    json.dump({"report": report, "grad": theta.grad.tolist()}, fh)
dist.destroy_process_group()
"""


def test_sckd_gates_each_teacher_identically_on_two_ranks(tmp_path):
    """Each rank's own gradients would gate the two teachers oppositely; the all-reduced statistics give every rank
    the same decision, teacher by teacher."""
    import os
    import subprocess
    import sys

    script = tmp_path / "gate.py"
    script.write_text(GATE_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert r0["report"] == r1["report"]
    assert r0["report"]["logit_kd/a"]["on"] is True and r0["report"]["logit_kd/b"]["on"] is False
    # each rank's update: its own g_s + 0.5 g_a (b is off everywhere)
    assert r0["grad"] == pytest.approx([1 + 0.5 * 2, 0.5 * 1]) and r1["grad"] == pytest.approx([1 - 0.5, 0.5 * 3])


def test_team_options_are_checked(tiny_model_dir, team, records_file, tmp_path):
    big, small = (f"hf:{p}" for p in team)
    with pytest.raises(UsageError, match="no such teacher"):
        cfg_for(records_file, tiny_model_dir, tmp_path / "o", teacher=[big, small], teacher_weight={"huge": 1.0})
    with pytest.raises(UsageError, match="no share for small"):
        cfg_for(records_file, tiny_model_dir, tmp_path / "o", teacher=[big, small], teacher_weight={"big": 1.0})
    with pytest.raises(UsageError, match="--feature-kd takes one teacher"):
        cfg_for(records_file, tiny_model_dir, tmp_path / "o", teacher=[big, small], feature_kd="auto")
    with pytest.raises(UsageError, match="given twice"):
        cfg_for(records_file, tiny_model_dir, tmp_path / "o", teacher=[big, big])
    c = cfg_for(records_file, tiny_model_dir, tmp_path / "o", teacher=[big])  # a list of one is one teacher
    assert c.teacher == big
    from test_train import invoke

    r = invoke("--data", records_file, "--student", tiny_model_dir, "--teacher", big, "--teacher", small,
               "--teacher-weight", "big=0.7,small=0.3", "--max-steps", "1", "--out", tmp_path / "cli", "--no-progress",
               "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["distill"]["teacher_shares"] == [0.7, 0.3]


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_mixture_and_separate_terms_share_gradients_only_under_forward_kl(beta):
    """Forward KL is linear in the target: the gradient of sum_k share_k KL(p_k || q) is that of KL(mean p || q) (the
    two losses differ by a constant), so ungated separate terms train like --teacher-mix mean; reverse KL does not."""
    from imitate.train.losses import chunked_kd_loss
    from imitate.train.teachers import mixture_kd_loss

    g = torch.Generator().manual_seed(0)
    head_s, heads_t = torch.randn(40, 8, generator=g), [torch.randn(40, 6, generator=g) for _ in range(2)]
    hidden_t = [torch.randn(1, 7, 6, generator=g) for _ in range(2)]
    labels = torch.tensor([[-100, 3, 5, 1, -100, 2, 9]])
    shares = [0.7, 0.3]

    def grad(separate: bool) -> torch.Tensor:
        h = torch.randn(1, 7, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        if separate:
            loss = sum(s * chunked_kd_loss(h, head_s, ht, w, labels, beta=beta, chunk_size=2)[0]
                       for s, ht, w in zip(shares, hidden_t, heads_t))
        else:
            loss = mixture_kd_loss(h, head_s, list(zip(hidden_t, heads_t, shares)), labels, beta=beta, chunk_size=2)[0]
        return torch.autograd.grad(loss, h)[0]

    if beta == 0.0:
        torch.testing.assert_close(grad(True), grad(False), rtol=1e-4, atol=1e-6)
    else:
        assert (grad(True) - grad(False)).abs().max() > 1e-3
