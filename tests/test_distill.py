"""Distillation wired into `imitate train`: logit KD, feature KD, gray-box KD, SCKD, on tiny teacher + student."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import adapter_weights as adapter
from test_train import cfg_for as sft_cfg
from test_train import invoke, make_records, metrics, two_ranks_match_accumulation
from tiny import copy_without_chat_template

from imitate.train.loop import run


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("kd") / "clean.jsonl", make_records(16))


@pytest.fixture(scope="module")
def other_tok_model(tmp_path_factory):
    """A tiny model whose tokenizer is NOT the student's (trained to another vocabulary size)."""
    from tiny import make_model

    d = tmp_path_factory.mktemp("other")
    make_model(d, hidden_size=32, num_layers=2, vocab_size=300, seed=3)
    return d


def cfg_for(data, student, out, **kw):
    """test_train's config (batch 4, lr 5e-3, no eval, no checkpoints) without a held-out split by default."""
    return sft_cfg(data, student, out, **{"eval_split": 0, **kw})


def tokenized(records, tok):
    """(input_ids, labels) per record exactly as `imitate train` builds them."""
    from imitate.train.data import encode, shift_targets

    out = []
    for r in records:
        ids, mask = encode(tok, r["messages"])
        out.append((ids, shift_targets(ids, mask)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the CLI end to end
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_teacher_sckd_feature_kd_end_to_end(tiny_model_dir, tiny_teacher_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from imitate.train.features import load_regressors

    out = tmp_path / "kd"
    res = invoke("--data", data_file, "--student", tiny_model_dir, "--teacher", f"hf:{tiny_teacher_dir}", "--sckd",
                 "--feature-kd", "auto", "--kd", "jsd", "--jsd-beta", "0.3", "--out", out, "--max-steps", "4",
                 "--batch-size", "4", "--grad-accum", "2", "--eval-split", "0.2", "--no-progress", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    d = summary["distill"]
    terms = ["logit_kd", "feature_s1_t2", "feature_s2_t3"]  # auto: 2 student layers spread over 3 teacher layers
    assert d["mode"] == "logit" and d["terms"] == terms and d["kd"] == "jsd" and d["jsd_beta"] == 0.3
    assert set(d["on_rate"]) == set(terms) and all(0.0 <= v <= 1.0 for v in d["on_rate"].values())
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for t in terms:
            assert isinstance(r[f"on/{t}"], bool) and -1.0 <= r[f"cos/{t}"] <= 1.0 and r[t] >= 0
            assert (r[f"cos/{t}"] > 0) == r[f"on/{t}"]  # the rule, threshold 0
    for t in terms:  # the summary's on-rate is the logged gates' mean, and the last running rate agrees
        assert d["on_rate"][t] == pytest.approx(sum(r[f"on/{t}"] for r in rows) / 4)
        assert rows[-1][f"on_rate/{t}"] == pytest.approx(d["on_rate"][t])
    assert (out / "loss.png").stat().st_size > 0
    # the student reloads with transformers + peft; the regressors beside it reload with their pairs
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    assert tuned(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 384
    regs = load_regressors(out)
    assert regs.pairs == [(1, 2), (2, 3)] and summary["files"]["feature_regressors"].startswith(str(out))
    assert regs.maps["feature_s1_t2"].weight.shape == (48, 32)


def test_mismatched_tokenizer_refused_before_weights_load(tiny_model_dir, other_tok_model, data_file, tmp_path,
                                                          monkeypatch):
    import transformers

    loaded = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded.append(a) or pytest.fail("weights loaded before the tokenizer check"))
    # another tokenizer distills by text (tests/test_xtok_train.py); feature KD cannot, and is refused first
    res = invoke("--data", data_file, "--student", tiny_model_dir, "--teacher", f"hf:{other_tok_model}",
                 "--feature-kd", "auto", "--out", tmp_path / "o", "--no-progress")
    assert res.exit_code != 0 and not loaded
    assert "--feature-kd needs a teacher that shares the student's tokenizer" in res.stderr, res.stderr
    assert "vocabularies differ" in res.stderr
    assert "Traceback" not in res.output


def test_teacher_without_chat_template_distills(tiny_model_dir, tiny_teacher_dir, data_file, tmp_path):
    """Records are formatted with the student's template: the teacher's own template is never needed."""
    teacher = copy_without_chat_template(tiny_teacher_dir, tmp_path / "plain-teacher")
    res = invoke("--data", data_file, "--student", tiny_model_dir, "--teacher", f"hf:{teacher}", "--out",
                 tmp_path / "o", "--max-steps", "1", "--batch-size", "2", "--no-progress", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["distill"]["terms"] == ["logit_kd"]


@pytest.mark.parametrize("args, expect", [
    (["--teacher", "openai:gpt-4o-mini"], "white-box distillation needs the teacher's weights"),
    (["--feature-kd", "auto"], "--feature-kd needs a local teacher"),
    (["--sckd"], "--sckd gates distillation terms, and this run has none"),
    (["--teacher", "hf:TEACHER", "--kd", "kl"], "--kd must be one of"),
    (["--teacher", "hf:TEACHER", "--feature-kd", "1:9"], "out of range"),
    (["--teacher", "hf:TEACHER", "--sckd", "--kd-weight", "1"], "--kd-weight 1"),
])
def test_usage_errors(args, expect, tiny_model_dir, tiny_teacher_dir, data_file, tmp_path):
    args = [str(tiny_teacher_dir).join(a.split("TEACHER")) for a in args]
    res = invoke("--data", data_file, "--student", tiny_model_dir, "--out", tmp_path / "o", "--no-progress", *args)
    assert res.exit_code in (1, 2) and expect in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------------------------------
# numbers: the loss in the loop, SFT equivalence, resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kd, t2", [("forward-kl", True), ("reverse-kl", False)])
def test_kd_terms_in_the_loop_equal_a_naive_computation(kd, t2, tiny_model_dir, tiny_teacher_dir, tmp_path):
    """Step 1's logged terms (the LoRA B = 0 student is the base model there) == full-logit references over the whole
    window (2 micro-batches, uneven lengths), normalised per target token. KD skips the target after the end-of-turn
    token (the template's "\n"): the teacher never wrote it."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = make_records(8, seed=4)
    data = write(tmp_path / "d.jsonl", records)
    summary = run(cfg_for(data, tiny_model_dir, tmp_path / "o", teacher=f"hf:{tiny_teacher_dir}", kd=kd, t2=t2,
                          temperature=1.7, feature_kd="1:3", max_steps=1, grad_accum=2, kd_chunk_size=5))
    row = metrics(tmp_path / "o")[0]
    assert summary["distill"]["terms"] == ["logit_kd", "feature_s1_t3"]

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    from imitate.train.features import load_regressors

    T, ce, kl, n = 1.7, 0.0, 0.0, 0
    with torch.no_grad():
        for ids, labels in tokenized(records, tok):
            lab = torch.tensor(labels)
            keep = lab != -100
            s_all = student(input_ids=torch.tensor([ids])).logits[0].double()
            t_all = teacher(input_ids=torch.tensor([ids])).logits[0].double()
            ce += F.cross_entropy(s_all[keep], lab[keep], reduction="sum").item()
            taught = keep & (torch.tensor(ids) != tok.eos_token_id)  # the "\n" target is predicted at <|end|>
            assert int(taught.sum()) == int(keep.sum()) - 1
            s, t = s_all[taught], t_all[taught]
            ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
            if kd == "forward-kl":  # KL(teacher || student)
                kl += F.kl_div(ls, lt, log_target=True, reduction="sum").item()
            else:  # KL(student || teacher)
                kl += F.kl_div(lt, ls, log_target=True, reduction="sum").item()
            n += int(keep.sum())
    kl *= T * T if t2 else 1.0
    assert row["loss"] == pytest.approx(ce / n, rel=1e-5)
    assert row["logit_kd"] == pytest.approx(kl / n, rel=1e-4)
    # the feature term at step 1 used the regressor's initial weights; they moved since, so check it is positive
    assert row["feature_s1_t3"] > 0 and load_regressors(tmp_path / "o").pairs == [(1, 3)]


def test_kd_weight_zero_is_plain_sft_and_a_nonzero_weight_is_not(tiny_model_dir, tiny_teacher_dir, data_file,
                                                                 tmp_path):
    kw = dict(max_steps=3, grad_accum=2, lora_dropout=0.0)
    run(cfg_for(data_file, tiny_model_dir, tmp_path / "sft", **kw))
    run(cfg_for(data_file, tiny_model_dir, tmp_path / "w0", teacher=f"hf:{tiny_teacher_dir}", kd_weight=0.0, **kw))
    run(cfg_for(data_file, tiny_model_dir, tmp_path / "w3", teacher=f"hf:{tiny_teacher_dir}", kd_weight=0.3, **kw))
    sft, w0, w3 = adapter(tmp_path / "sft"), adapter(tmp_path / "w0"), adapter(tmp_path / "w3")
    assert sft.keys() == w0.keys()
    for k in sft:
        # chunked vs full-width CE differ by float rounding only, which Adam can lift to ~1e-6 on near-zero grads
        torch.testing.assert_close(w0[k], sft[k], rtol=1e-4, atol=2e-5)
    assert max((w3[k] - sft[k]).abs().max().item() for k in sft) > 1e-3  # the comparison can tell KD from SFT
    assert [r["loss"] for r in metrics(tmp_path / "w0")] == pytest.approx([r["loss"] for r in metrics(tmp_path / "sft")],
                                                                          rel=1e-5)


def test_resume_with_sckd_and_feature_kd_matches_straight_run(tiny_model_dir, tiny_teacher_dir, data_file, tmp_path):
    """The regressors (and their optimizer state) are checkpointed: a stopped + resumed run ends where a straight one
    does, and the on-rates of the summary cover the whole run."""
    from imitate.train.features import load_regressors

    kw = dict(max_steps=4, batch_size=3, teacher=f"hf:{tiny_teacher_dir}", feature_kd="auto", sckd=True,
              lora_dropout=0.0)
    straight = run(cfg_for(data_file, tiny_model_dir, tmp_path / "a", **kw))
    run(cfg_for(data_file, tiny_model_dir, tmp_path / "b", save_every=2, **kw), stop_after=3)
    resumed = run(cfg_for(data_file, tiny_model_dir, tmp_path / "b", save_every=2, resume=True, **kw))
    assert resumed["start_step"] == 2
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    ra, rb = load_regressors(tmp_path / "a"), load_regressors(tmp_path / "b")
    for k, v in ra.state_dict().items():
        torch.testing.assert_close(rb.state_dict()[k], v, rtol=1e-5, atol=1e-7)
    assert resumed["distill"]["on_rate"] == pytest.approx(straight["distill"]["on_rate"])


# ---------------------------------------------------------------------------------------------------------------------
# gray-box
# ---------------------------------------------------------------------------------------------------------------------


def graybox_records(records, tok, teacher_spec):
    """Attach collect-style `logprobs` (sampled token + one alternative, EOS excluded) to each record's answer."""
    out = []
    for r, (ids, labels) in zip(records, tokenized(records, tok)):
        answer = [x for x in labels if x != -100][:-1]  # the final assistant turn without the <|end|> marker
        entries = []
        for j, tid in enumerate(answer):
            alt = (tid + 1 + j) % len(tok)
            entries.append({"token": tok.convert_ids_to_tokens(tid), "id": tid, "logprob": -0.2 - 0.01 * j,
                            "top": [{"token": tok.convert_ids_to_tokens(alt), "id": alt, "logprob": -2.0}]})
        out.append({**r, "teacher": teacher_spec, "logprobs": entries})
    return out


def test_graybox_trains_on_collected_logprobs_without_a_teacher(tiny_model_dir, tiny_teacher_dir, tmp_path,
                                                                monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imitate.train.losses import sparse_topk_divergence
    from imitate.train.vocab import align_logprobs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = graybox_records(make_records(8, seed=2), tok, f"hf:{tiny_teacher_dir}")
    data = write(tmp_path / "lp.jsonl", records)
    n_answer = sum(len(r["logprobs"]) for r in records)
    summary = run(cfg_for(data, tiny_model_dir, tmp_path / "g", max_steps=1, grad_accum=2, sckd=True))
    d = summary["distill"]
    assert d["mode"] == "graybox" and d["terms"] == ["graybox_kd"]
    assert d["graybox"]["aligned"] == n_answer and d["graybox"]["unaligned"] == len(records)  # the end markers
    row = metrics(tmp_path / "g")[0]
    assert "cos/graybox_kd" in row and "on/graybox_kd" in row
    # naive reference on the step-1 (= base) student: the rest-bucket KL at every aligned answer position
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    total = 0.0
    with torch.no_grad():
        for r, (ids, labels) in zip(records, tokenized(records, tok)):
            t_ids, t_lps, _ = align_logprobs(r["logprobs"], torch.tensor(labels), tok)
            keep = (t_ids >= 0).any(-1)
            logits = student(input_ids=torch.tensor([ids])).logits[0]
            total += sparse_topk_divergence(logits[keep], t_ids[keep], t_lps[keep]).sum().item()
    n_targets = n_answer + len(records)
    assert row["graybox_kd"] == pytest.approx(total / n_targets, rel=1e-5)

    # packed rows carry the same top-K rows: the same term
    run(cfg_for(data, tiny_model_dir, tmp_path / "p", max_steps=1, grad_accum=2, packing=True, batch_size=1,
                max_length=256))
    assert metrics(tmp_path / "p")[0]["graybox_kd"] == pytest.approx(total / n_targets, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# data parallel
# ---------------------------------------------------------------------------------------------------------------------


def test_sckd_two_processes_match_one_process_with_accumulation(tiny_model_dir, tiny_teacher_dir, data_file,
                                                                 tmp_path):
    """2 CPU ranks (gloo) x grad-accum 1 == 1 process x grad-accum 2 under --sckd with every gate forced on
    (threshold -1): the gate's gradients are averaged over ranks with the right scale and regressors stay in sync."""

    args = ["--data", data_file, "--student", tiny_model_dir, "--teacher", f"hf:{tiny_teacher_dir}", "--sckd",
            "--sckd-threshold", "-1", "--feature-kd", "2:3", "--max-steps", "3", "--batch-size", "3",
            "--lora-dropout", "0", "--eval-split", "0", "--lr", "1e-2", "--no-progress"]
    summary, ddp, single = two_ranks_match_accumulation(args, tmp_path)
    assert summary["devices"] == 2
    from imitate.train.features import load_regressors

    ra, rb = load_regressors(ddp).state_dict(), load_regressors(single).state_dict()
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], rtol=1e-4, atol=1e-5)
    for x, y in zip(metrics(ddp), metrics(single)):
        for key in ("loss", "logit_kd", "feature_s2_t3"):
            assert x[key] == pytest.approx(y[key], rel=1e-4)
