"""`imitate train` on tiny models: normalisation, learning, resume, saved outputs, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import copy_without_chat_template, run_torchrun

from imitate.config import build
from imitate.train.loop import TrainConfig, run

WORDS = "one two three four five six seven eight nine ten eleven twelve".split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(1, 12)
        out.append({"messages": [
            {"role": "user", "content": f"Count to {k} in words."},
            {"role": "assistant", "content": " ".join(WORDS[:k])},
        ]})
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "clean.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in make_records(48)))
    return p


def cfg_for(data_file, student, out, **kw) -> TrainConfig:
    base = dict(data=[str(data_file)], student=str(student), out=str(out), batch_size=4, lr=5e-3, eval_split=0.1,
                eval_every=0, save_every=0, progress=False)
    return build(TrainConfig, {**base, **kw})


def adapter_weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_is_normalised_by_window_tokens(tiny_model_dir, tiny_tokenizer_dir):
    """grad-accum 2 x batch 1 == batch 2 == the naive per-token mean over both examples, with uneven lengths."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imitate.train.data import IGNORE, collate, encode, shift_targets
    from imitate.train.data import Example as Ex
    from imitate.train.step import accumulate_window

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    recs = make_records(2, seed=5)
    recs[1]["messages"][1]["content"] = " ".join(WORDS * 2)  # much longer answer than the first
    exs = []
    for r in recs:
        ids, mask = encode(tok, r["messages"])
        exs.append(Ex(ids, shift_targets(ids, mask), "t"))
    assert exs[0].n_targets * 2 < exs[1].n_targets
    n = exs[0].n_targets + exs[1].n_targets

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    accelerator = Accelerator(gradient_accumulation_steps=1)
    model = accelerator.prepare(model)

    def grads() -> dict:
        g = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return g

    # naive reference: sum of per-example token losses / total target tokens
    total = 0
    for e in exs:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0].float()
        lab = torch.tensor(e.labels)
        total = total + torch.nn.functional.cross_entropy(logits, lab, ignore_index=IGNORE, reduction="sum")
    (total / n).backward()
    ref = grads()

    accelerator.gradient_accumulation_steps = 1
    accumulate_window(accelerator, model, [collate(exs, pad_id=tok.pad_token_id, packing=False)], n)
    one_batch = grads()
    accelerator.gradient_accumulation_steps = 2
    accumulate_window(accelerator, model, [collate([e], pad_id=tok.pad_token_id, packing=False) for e in exs], n)
    two_micro = grads()
    accumulate_window(accelerator, model, [collate(exs, pad_id=tok.pad_token_id, packing=True)], n)  # padding-free
    accelerator.gradient_accumulation_steps = 1
    packed = grads()

    for k in ref:
        torch.testing.assert_close(one_batch[k], ref[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two_micro[k], ref[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(packed[k], ref[k], rtol=1e-4, atol=1e-6)
    # averaging per micro-batch must give another gradient, or the test proves nothing: that mean weighs the short
    # example as much as the long one
    losses = []
    for e in exs:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].float()
        losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(e.labels), ignore_index=IGNORE))
    (sum(losses) / 2).backward()
    wrong = grads()
    assert not torch.allclose(wrong["lm_head.weight"], ref["lm_head.weight"], rtol=1e-3, atol=1e-6)


def test_loss_decreases(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    summary = run(cfg_for(data_file, tiny_model_dir, out, full=True, lr=3e-3, warmup=0, max_steps=24, eval_every=8))
    rows = metrics(out)
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(train) == 24 and [r["step"] for r in rows if "eval_loss" in r] == [8, 16, 24]
    assert sum(train[-4:]) / 4 < sum(train[:4]) / 4 - 0.8
    assert evals[-1] < evals[0] and summary["eval_loss"] == evals[-1]
    assert summary["train_examples"] + summary["eval_examples"] == 48
    assert all(k in rows[0] for k in ("step", "loss", "lr", "tokens_per_s", "grad_norm"))
    assert (out / "loss.png").stat().st_size > 1000 and (out / "train_config.json").exists()
    assert not (out / "checkpoints").exists()


def test_lora_outputs_reload_merge_and_generate(tiny_model_dir, data_file, tmp_path, monkeypatch):
    from imitate.train import student

    out, seen = tmp_path / "run", []
    plain = student.checkpoint_layers

    def spy(model, every):
        seen.append((every, plain(model, every)))
        return seen[-1][1]

    monkeypatch.setattr(student, "checkpoint_layers", spy)
    run(cfg_for(data_file, tiny_model_dir, out, max_steps=4, merge=True, gradient_checkpointing=True,
                gradient_checkpointing_every=2))
    assert seen == [(2, 1)]  # the tiny model's 2 layers: the first recomputes, the second keeps its activations
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count to 3 in words."}], add_generation_prompt=True,
                                     return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(prompt).logits, tuned(prompt).logits, rtol=1e-4, atol=1e-4)
        gen = merged.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > prompt.shape[1]
    with torch.no_grad():  # the adapter changed the model
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # `base` now carries the adapter layers
        assert not torch.allclose(fresh(prompt).logits, tuned(prompt).logits)


def test_resume_after_stop_matches_straight_run(tiny_model_dir, data_file, tmp_path):
    kw = dict(max_steps=6, batch_size=3, grad_accum=2, lora_dropout=0.1, eval_every=0)
    straight = run(cfg_for(data_file, tiny_model_dir, tmp_path / "a", save_every=0, **kw))
    stopped = run(cfg_for(data_file, tiny_model_dir, tmp_path / "b", save_every=2, **kw), stop_after=5)
    assert stopped["stopped_at"] == 5
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    # a LoRA checkpoint holds the adapter, not the frozen base model
    size = sum(f.stat().st_size for f in (tmp_path / "b" / "checkpoints" / "step-00000004").rglob("*.safetensors"))
    assert size < 0.5 * sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    resumed = run(cfg_for(data_file, tiny_model_dir, tmp_path / "b", save_every=2, resume=True, **kw))
    assert resumed["start_step"] == 4
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    # metrics.jsonl: one row per step, the rows logged after the checkpoint by the stopped run were replaced
    steps = [r["step"] for r in metrics(tmp_path / "b") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_other_settings_and_fresh_run_refuses_checkpoints(tiny_model_dir, data_file, tmp_path):
    from imitate.errors import UsageError

    run(cfg_for(data_file, tiny_model_dir, tmp_path / "c", max_steps=4, save_every=2), stop_after=2)
    with pytest.raises(UsageError, match="already holds checkpoints") as err:
        run(cfg_for(data_file, tiny_model_dir, tmp_path / "c", max_steps=4, save_every=2))
    assert "--resume" in err.value.hint
    with pytest.raises(UsageError, match="batch_size"):
        run(cfg_for(data_file, tiny_model_dir, tmp_path / "c", max_steps=4, save_every=2, batch_size=2, resume=True))


def test_full_finetune_saves_loadable_model(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "full"
    summary = run(cfg_for(data_file, tiny_model_dir, out, full=True, max_steps=3, packing=True, eval_split=0.0))
    assert summary["mode"] == "full" and summary["eval_loss"] is None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def invoke(*args):
    from typer.testing import CliRunner

    from imitate.cli import app

    return CliRunner().invoke(app, ["train", *map(str, args)])


def two_ranks_match_accumulation(args: list, tmp_path) -> tuple[dict, object, object]:
    """`imitate train ARGS` under torchrun with 2 CPU ranks (OUT tmp_path/ddp) and in one process with --grad-accum 2
    (tmp_path/single): the adapters must be equal. Returns (the 2-rank summary, ddp dir, single dir)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    summary = json.loads(run_torchrun(args, ddp).stdout)
    res = invoke(*args, "--grad-accum", "2", "--out", single)
    assert res.exit_code == 0, res.output
    a, b = adapter_weights(ddp), adapter_weights(single)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    return summary, ddp, single


def test_cli_end_to_end_json(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "cli"
    res = invoke("--data", data_file, "--student", tiny_model_dir, "--out", out, "--max-steps", "3", "--batch-size",
                 "4", "--lora-r", "4", "--no-progress", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["steps"] == 3 and summary["mode"] == "lora" and summary["files"]["adapter"] == str(out)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_cli_config_file_section(tiny_model_dir, data_file, tmp_path):
    (tmp_path / "run.toml").write_text(
        f'[train]\ndata = ["{data_file}"]\nstudent = "{tiny_model_dir}"\nout = "outdir"\n'
        "max-steps = 2\nprogress = false\n"
    )
    res = invoke("--config", tmp_path / "run.toml", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["out"] == str(tmp_path / "outdir")  # relative to the config file


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_file", "no such file"),
        ("bad_line", "bad.jsonl:2"),
        ("no_assistant", "bad.jsonl:2: no assistant turn"),
        ("unknown_student", "no such directory"),
        ("no_template", "--chat-template"),
        ("empty_data", "no records to train on"),
        ("max_length_too_small", "raise --max-length (e.g. --max-length "),
    ],
)
def test_cli_errors_before_weights(case, expect, tiny_model_dir, data_file, tmp_path, monkeypatch):

    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights must not load before the inputs are checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    data, student = data_file, tiny_model_dir
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(make_records(1)[0])
    if case == "missing_file":
        data = tmp_path / "nope.jsonl"
    elif case == "bad_line":
        bad.write_text(good + "\n{oops\n")
        data = bad
    elif case == "no_assistant":
        bad.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
        data = bad
    elif case == "unknown_student":
        student = tmp_path / "no-such-model"
    elif case == "no_template":
        student = copy_without_chat_template(tiny_model_dir, tmp_path / "plain")
    elif case == "empty_data":  # e.g. imitate clean removed every record
        bad.write_text("")
        data = bad
    extra = ["--max-length", "2"] if case == "max_length_too_small" else []
    res = invoke("--data", data, "--student", student, "--out", tmp_path / "o", "--no-progress", *extra)
    assert res.exit_code in (1, 2), res.output
    assert "Error:" in res.stderr and expect in res.stderr, res.stderr
    assert "Traceback" not in res.output


def test_resume_after_sigkill(tiny_model_dir, data_file, tmp_path):
    """A real kill -9 in the middle of a run (between or during checkpoint writes), then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from imitate.train import checkpoint

    args = ["--data", data_file, "--student", tiny_model_dir, "--max-steps", "24", "--batch-size", "2",
            "--eval-split", "0", "--lr", "5e-3", "--no-progress"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "imitate", "train", *map(str, args), "--save-every", "1", "--out", str(killed)]
    proc = subprocess.Popen(cmd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ck = checkpoint.latest(killed)
        if ck is not None and int(ck.name.split("-")[1]) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(killed) is not None
    res = invoke(*args, "--out", killed, "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert 3 <= json.loads(res.stdout)["start_step"] < 24
    straight = tmp_path / "straight"
    assert invoke(*args, "--out", straight).exit_code == 0
    a, b = adapter_weights(straight), adapter_weights(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_two_processes_match_one_process_with_accumulation(tiny_model_dir, data_file, tmp_path):
    """DDP (2 CPU processes, gloo) x grad-accum 1 == 1 process x grad-accum 2: same windows, same loss normalisation
    across ranks, same eval sharding. 43 training examples in batches of 4 -> 11 micro-batches, so the last window also
    exercises the padding micro-batch that carries no targets."""

    args = ["--data", data_file, "--student", tiny_model_dir, "--epochs", "1", "--batch-size", "4", "--lora-dropout",
            "0", "--eval-split", "0.1", "--eval-every", "3", "--lr", "1e-2", "--no-progress"]
    summary, ddp, single = two_ranks_match_accumulation(args, tmp_path)
    assert summary["devices"] == 2 and summary["steps"] == 6
    ma, mb = metrics(ddp), metrics(single)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for key in ("loss", "eval_loss", "tokens"):
            assert (key in ra) == (key in rb)
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4)


def test_checkpointing_every_n_recomputes_only_those_layers_and_keeps_the_gradients(tiny_tokenizer_dir, tmp_path):
    from tiny import make_model
    from transformers import AutoModelForCausalLM

    from imitate.train.student import checkpoint_layers

    make_model(tmp_path / "m", tokenizer_dir=tiny_tokenizer_dir, hidden_size=32, num_layers=4, seed=0)
    ids = torch.randint(3, 100, (2, 12))

    def step(every):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").train()
        model.config.use_cache = False
        done = checkpoint_layers(model, every) if every else 0
        calls = [0] * 4
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        model(input_ids=ids, labels=ids).loss.backward()
        return done, calls, {n: p.grad for n, p in model.named_parameters()}

    _, calls, plain = step(0)
    assert calls == [1, 1, 1, 1]
    done, calls, half = step(2)
    assert done == 2 and calls == [2, 1, 2, 1]  # layers 0 and 2 run again in backward, 1 and 3 kept activations
    done, calls, every = step(1)
    assert done == 4 and calls == [2, 2, 2, 2]
    for name, g in plain.items():
        torch.testing.assert_close(half[name], g)
        torch.testing.assert_close(every[name], g)


def test_checkpointing_every_n_without_gradient_checkpointing_is_refused(tiny_model_dir, data_file, tmp_path):
    from imitate.errors import UsageError

    with pytest.raises(UsageError, match="--gradient-checkpointing-every 2.*off"):
        cfg_for(data_file, tiny_model_dir, tmp_path / "run", gradient_checkpointing_every=2).check()


def test_checkpointing_every_n_on_a_model_without_checkpointing_layers_is_refused(tiny_model_dir, monkeypatch):
    import transformers.modeling_layers
    from transformers import AutoModelForCausalLM

    from imitate.errors import UsageError
    from imitate.train.student import checkpoint_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert checkpoint_layers(model, 2) > 0
    monkeypatch.setattr(transformers.modeling_layers, "GradientCheckpointingLayer", type("NoSuchLayer", (), {}))
    with pytest.raises(UsageError, match="cannot be checkpointed one by one"):
        checkpoint_layers(model, 2)
    assert checkpoint_layers(model, 1) == 0  # every layer: the model's own switch, nothing to choose
