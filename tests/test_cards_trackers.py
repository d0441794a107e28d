"""Model and dataset cards (Hub-loadable README.md files), TensorBoard through --report-to (event files read back),
and the ROUGE-L score eval reports."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from typer.testing import CliRunner

from imitate.cards import sha256
from imitate.cli import app
from imitate.scoring import rouge_l

runner = CliRunner()
NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()


def _records(path, n=40, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 12)
        rows.append({"id": f"r{i}", "teacher": "openai:gpt-4o-mini",
                     "messages": [{"role": "user", "content": f"Count to {k} in words, please ({i})."},
                                  {"role": "assistant", "content": " ".join(NUMBERS[:k])}],
                     "usage": {"input_tokens": 12, "output_tokens": k}, "finish_reason": "stop"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


# ------------------------------------------------------------------------------------------------ ROUGE-L


def _lcs_naive(a, b):
    best = 0
    for r in range(1, len(a) + 1):  # every subsequence of a, longest first found in b
        for sub in itertools.combinations(a, r):
            it = iter(b)
            if all(w in it for w in sub):
                best = r
    return best


def test_rouge_l_against_a_naive_lcs():
    rng = random.Random(1)
    vocab = ["a", "b", "c", "d", "the", "cat", "7"]
    for _ in range(60):
        a = [rng.choice(vocab) for _ in range(rng.randint(1, 7))]
        b = [rng.choice(vocab) for _ in range(rng.randint(1, 7))]
        lcs = _lcs_naive(a, b)
        want = 0.0 if lcs == 0 else 2 * (lcs / len(a)) * (lcs / len(b)) / (lcs / len(a) + lcs / len(b))
        assert rouge_l(" ".join(a), " ".join(b)) == pytest.approx(want)
    assert rouge_l("Paris is the capital.", "paris IS the   capital .") == 1.0
    assert rouge_l("deux", "three hundred") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0
    assert rouge_l("a b", "b a") == rouge_l("b a", "a b") == 0.5  # symmetric F1


# ------------------------------------------------------------------------------------------------ trackers


def test_tensorboard_logs_what_metrics_jsonl_logs(tiny_model_dir, tiny_teacher_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "clean.jsonl"
    _records(data)
    out = tmp_path / "run"
    _cli("train", "--data", data, "--student", tiny_model_dir, "--teacher", f"hf:{tiny_teacher_dir}", "--sckd",
         "--max-steps", "3", "--batch-size", "4", "--eval-split", "0.2", "--eval-every", "2", "--save-every", "0",
         "--no-progress", "--report-to", "tensorboard", "--out", out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logdirs = {p.parent for p in (out / "trackers").rglob("events.out.tfevents.*")}
    assert logdirs, "no TensorBoard event file"
    scalars: dict[str, dict[int, float]] = {}
    for d in logdirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    assert sorted(scalars["loss"]) == [1, 2, 3]
    logged = 0
    for r in rows:  # every number of every metrics.jsonl row, at its step: loss, lr, KD term, SCKD cos/on/on-rate
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                assert scalars[k][r["step"]] == pytest.approx(float(v), rel=1e-6, abs=1e-9), k
                logged += 1
    assert {"lr", "eval_loss"} <= set(scalars)
    assert {"cos/", "on/", "on_rate/"} <= {k.split("/")[0] + "/" for k in scalars if "/" in k}  # the SCKD gate
    assert logged >= 3 * 8


def test_report_to_checks_before_weights(tiny_model_dir, tmp_path):
    import importlib.util

    data = tmp_path / "clean.jsonl"
    _records(data, n=4)
    res = runner.invoke(app, ["train", "--data", str(data), "--student", str(tiny_model_dir), "--out",
                              str(tmp_path / "r"), "--report-to", "tensorbord"])
    assert res.exit_code == 2 and "unknown tracker 'tensorbord'" in res.output and "wandb" in res.output
    missing = next((n for n in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(n) is None), None)
    if missing:
        res = runner.invoke(app, ["train", "--data", str(data), "--student", str(tiny_model_dir), "--out",
                                  str(tmp_path / "r"), "--report-to", f"tensorboard,{missing}"])
        assert res.exit_code == 2 and f"pip install {missing}" in res.output
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ cards


def test_clean_dataset_card_and_train_model_card_with_eval(tiny_model_dir, tmp_path):
    from huggingface_hub import DatasetCard, ModelCard

    collected = tmp_path / "collected.jsonl"
    rows = _records(collected, n=40)
    with collected.open("a") as fh:  # an exact duplicate and a refusal for clean to remove
        fh.write(json.dumps({**rows[3], "id": "dup"}) + "\n")
        fh.write(json.dumps({**rows[4], "id": "ref", "messages": [
            rows[4]["messages"][0], {"role": "assistant", "content": "I'm sorry, but I can't help with that."}]}) + "\n")
    clean = tmp_path / "clean.jsonl"
    summary = json.loads(_cli("clean", collected, "--out", clean, "--no-near-dedup", "--json").stdout)
    dcard = DatasetCard.load(tmp_path / "clean.README.md")
    dmeta = dcard.data.to_dict()["imitate"]
    assert dmeta["records"] == summary["out"] and dmeta["input_records"] == 42
    assert dmeta["removed"] == {k: v for k, v in summary["removed"].items() if v} and dmeta["removed_total"] == 42 - summary["out"]
    assert dmeta["removed"]["refusal"] == 1 and dmeta["removed"]["exact_dup"] >= 1
    assert dmeta["file"]["sha256"] == sha256(clean) and dmeta["inputs"][0]["sha256"] == sha256(collected)
    assert dmeta["inputs"][0]["teachers"] == {"openai:gpt-4o-mini": 42}
    assert dmeta["inputs"][0]["cost_usd"] > 0  # gpt-4o-mini has a list price
    assert dcard.data.to_dict()["configs"][0]["data_files"] == "clean.jsonl"

    out = tmp_path / "student"
    _cli("train", "--data", clean, "--student", tiny_model_dir, "--out", out, "--max-steps", "2", "--batch-size", "4",
         "--lora-r", "4", "--eval-split", "0", "--no-progress")
    card = ModelCard.load(out / "README.md")
    front = card.data.to_dict()
    meta = front["imitate"]
    assert front["library_name"] == "peft" and "base_model" not in front  # a local student is no Hub id
    assert meta["teacher"] is None and meta["record_teachers"] == ["openai:gpt-4o-mini"]
    d = meta["data"][0]
    assert d["sha256"] == sha256(clean) and d["records"] == summary["out"]
    assert d["clean"] == {"input_records": 42, "removed": dmeta["removed"], "removed_total": 42 - summary["out"]}
    in_tok = sum(r["usage"]["input_tokens"] for r in rows) + 24
    assert d["collection"]["tokens_in"] == in_tok  # what was paid for: every collected record, removed ones too
    assert meta["training"]["steps"] == 2 and "kd" not in meta["training"]
    assert meta["command"].startswith("imitate train") and "--max-steps 2" in meta["command"]
    assert "--lora-r 4" in meta["command"] and "Not evaluated yet" in card.text

    res = _cli("eval", "--model", out, "--prompts", clean, "--max-tokens", "6", "--json")
    ev = json.loads(res.stdout)
    meta = ModelCard.load(out / "README.md").data.to_dict()["imitate"]
    assert meta["eval"][str(clean)]["rouge_l"] == pytest.approx(ev["rouge_l"])
    assert meta["eval"][str(clean)]["loss"] == pytest.approx(ev["loss"])
