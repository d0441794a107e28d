"""`imitate eval` on tiny random models: scoring modes, teacher agreement, loss, gate, adapters, results file.

The tiny models answer gibberish, so references are built from the student's own greedy answers: a row whose
reference IS the student's answer must score 1, a row with another reference 0.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from typer.testing import CliRunner

from imitate.cli import app
from imitate.errors import InputError
from imitate.evaluate import EvalConfig, read_items, run
from imitate.scoring import normalize, score

PROMPTS = ["Write 347 in words.", "What is the capital of France?", "hello world"]
MAX_TOKENS = 6
REF_ARGS = ["--reference-field", "answer", "--max-tokens", str(MAX_TOKENS), "--json"]


@pytest.fixture(scope="module")
def student(tiny_model_dir):
    from imitate.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def answers(student) -> list[str]:
    """The student's greedy answers, generated as eval will (one batch, same order, same max tokens)."""
    from imitate.models import generate_batch

    model, tok = student
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    return [c.text for c in generate_batch(model, tok, chats, max_tokens=MAX_TOKENS)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(*args):
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    return result


# ------------------------------------------------------------------------------------------------ pure scoring


def test_normalize_and_match_modes():
    assert normalize("  Three\tHUNDRED \n forty-seven ") == "three hundred forty-seven"
    assert normalize("ｆｕｌｌ width") == "full width"  # NFKC
    assert score("Three  hundred", ["three hundred"], "exact") == 1
    assert score("three hundred!", ["three hundred"], "exact") == 0
    assert score("It is PARIS, of course", ["paris"], "contains") == 1
    assert score("It is Lyon", ["paris"], "contains") == 0
    assert score("answer: 347", [r"\b347\b"], "regex") == 1
    assert score("answer: 3470", [r"\b347\b"], "regex") == 0
    assert score("ANSWER", ["answer"], "regex") == 0 and score("ANSWER", ["(?i)answer"], "regex") == 1
    assert score("b", ["a", "b"], "exact") == 1  # a list of accepted answers: any one matches


def test_read_items_modes_and_errors(tmp_path):
    f = write_rows(
        tmp_path / "e.jsonl",
        [
            {"prompt": "p1", "answer": 347},
            {
                "messages": [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "teacher says"}],
                "answer": ["x", "y"],
            },
        ],
    )
    a, b = read_items(f, "answer", "exact")
    assert a.messages == [{"role": "user", "content": "p1"}] and a.reference == ["347"] and a.teacher is None
    assert b.messages == [{"role": "user", "content": "p2"}] and b.teacher == "teacher says"  # not shown to the student
    assert b.reference == ["x", "y"] and b.where.endswith(":2")
    with pytest.raises(InputError, match=r"e\.jsonl:1: no field 'gold'"):
        read_items(f, "gold", "exact")
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": "("}])
    with pytest.raises(InputError, match=r"bad\.jsonl:1: .*not a valid regex"):
        read_items(bad, "answer", "regex")
    nope = write_rows(tmp_path / "nope.jsonl", [{"prompt": "ok"}, {"question": "?"}])
    with pytest.raises(InputError, match=r"nope\.jsonl:2: a row needs 'prompt'"):
        read_items(nope, None, "exact")


# ------------------------------------------------------------------------------------------------ end to end


def test_reference_field_exact_score_results_and_gate(tmp_path, tiny_model_dir, answers):
    refs = [answers[0], "  " + answers[1].upper() + " ", "definitely not this"]  # exact is case/space-insensitive
    f = write_rows(tmp_path / "eval.jsonl", [{"prompt": p, "answer": r} for p, r in zip(PROMPTS, refs)])
    out = tmp_path / "res.jsonl"
    args = ["--model", tiny_model_dir, "--prompts", f, "--out", out, *REF_ARGS]
    r = cli(*args, "--min-score", 0.5)
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["n"] == 3 and math.isclose(s["score"], 2 / 3) and s["passed"] is True
    assert s["reference"] == "field:answer" and s["agreement"] is None and s["loss"] is None
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in rows] == PROMPTS
    assert [x["answer"] for x in rows] == answers
    assert [x["score"] for x in rows] == [1, 1, 0]
    assert rows[2]["reference"] == "definitely not this" and rows[0]["where"].endswith("eval.jsonl:1")

    out.unlink()
    r = cli(*args, "--min-score", 0.9)
    assert r.exit_code == 3
    assert "eval gate failed" in r.stderr and "0.6667" in r.stderr
    assert json.loads(r.stdout)["passed"] is False  # --json still reports the numbers
    assert len(out.read_text().splitlines()) == 3  # results are written before the gate fails


def test_contains_and_regex_modes(tmp_path, tiny_model_dir, answers):
    piece = answers[0][1:4]
    assert piece.strip(), "the student's answer should have some text to match"
    f = write_rows(
        tmp_path / "e.jsonl",
        [
            {"prompt": PROMPTS[0], "answer": piece.upper(), "pattern": "^" + re.escape(answers[0]) + "$"},
            {"prompt": PROMPTS[1], "answer": "zzzz-not-there", "pattern": "^zzzz$"},
        ],
    )
    base = ["--model", tiny_model_dir, "--prompts", f, "--max-tokens", MAX_TOKENS, "--json"]
    c = json.loads(cli(*base, "--reference-field", "answer", "--match", "contains").stdout)
    assert c["score"] == 0.5 and c["scores_by_match"] == {"exact": 0.0, "contains": 0.5}
    g = json.loads(cli(*base, "--reference-field", "pattern", "--match", "regex").stdout)
    assert g["score"] == 0.5 and g["scores_by_match"]["regex"] == 0.5
    r = cli(*base, "--match", "regex")  # no reference field: the teacher's answers are not patterns
    assert r.exit_code == 2 and "--reference-field" in r.stderr


def test_record_answers_agreement_and_loss(tmp_path, tiny_model_dir, student, answers):
    """Rows from collect: the final assistant turn is the teacher's answer -> agreement + the student's loss on it."""
    import torch

    from imitate.train.data import encode

    teacher_answers = [answers[0], "something else entirely", answers[2]]
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": t}]}
        for p, t in zip(PROMPTS, teacher_answers)
    ]
    f = write_rows(tmp_path / "records.jsonl", rows)
    out = tmp_path / "r.jsonl"
    r = cli("--model", tiny_model_dir, "--prompts", f, "--max-tokens", MAX_TOKENS, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["reference"] == "teacher" and math.isclose(s["score"], 2 / 3) and math.isclose(s["agreement"], 2 / 3)

    # naive reference for the loss: one plain forward per record, log-softmax, assistant targets from data.encode
    model, tok = student
    total, count, per_row = 0.0, 0, []
    for row in rows:
        ids, mask = encode(tok, row["messages"])
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        nll = [-float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]]
        total, count = total + sum(nll), count + len(nll)
        per_row.append(sum(nll) / len(nll))
    assert math.isclose(s["loss"], total / count, rel_tol=1e-4)
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in got] == [[{"role": "user", "content": p}] for p in PROMPTS]
    assert [x["agreement"] for x in got] == [1, 0, 1]
    assert all(math.isclose(x["loss"], y, rel_tol=1e-4) for x, y in zip(got, per_row))


def test_reference_field_with_record_answers_reports_teacher_score(tmp_path, tiny_model_dir, answers):
    rows = [
        {
            "messages": [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": "gold"}],
            "answer": "gold",
        },
        {
            "messages": [{"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": answers[1]}],
            "answer": "gold",
        },
    ]
    f = write_rows(tmp_path / "e.jsonl", rows)
    s = run(EvalConfig(model=tiny_model_dir, prompts=f, reference_field="answer", max_tokens=MAX_TOKENS))
    assert s["score"] == 0.0  # the student never says "gold"
    assert s["agreement"] == 0.5 and s["teacher_score"] == 0.5 and s["loss"] > 0


def test_hf_teacher_agreement_with_itself_is_one(tmp_path, tiny_model_dir, tiny_teacher_dir):
    f = write_rows(tmp_path / "e.jsonl", [{"prompt": p} for p in PROMPTS])
    same = run(EvalConfig(model=tiny_model_dir, prompts=f, teacher=f"hf:{tiny_model_dir}", max_tokens=MAX_TOKENS))
    assert same["agreement"] == 1.0 and same["score"] == 1.0
    other = run(EvalConfig(model=tiny_model_dir, prompts=f, teacher=f"hf:{tiny_teacher_dir}", max_tokens=MAX_TOKENS))
    assert other["agreement"] < 1.0 and other["loss"] > 0
    r = cli("--model", tiny_model_dir, "--prompts", f, "--teacher", "openai:gpt-4o-mini")
    assert r.exit_code == 1 and "OPENAI_API_KEY" in r.stderr  # API teachers go through collect: key checked first


def test_api_teacher_through_collect_is_cached(tmp_path, tiny_model_dir, monkeypatch):
    """An openai: teacher on the loopback server: teacher_score from its answers; a re-run sends nothing new."""
    from fake_server import FakeServer

    f = write_rows(tmp_path / "e.jsonl", [{"prompt": p, "answer": f"Answer to: {p}"} for p in (PROMPTS[0], PROMPTS[2])])
    out = tmp_path / "res.jsonl"
    with FakeServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url + "/v1")
        args = ["--model", tiny_model_dir, "--prompts", f, "--out", out, "--teacher", "openai:fake-model", *REF_ARGS]
        r = cli(*args)
        assert r.exit_code == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["teacher_score"] == 1.0 and s["score"] == 0.0 and s["agreement"] == 0.0
        assert server.count() == 2
        assert all(b["body"]["temperature"] == 0 for b in server.history)
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert rows[0]["teacher_answer"] == f"Answer to: {PROMPTS[0]}"
        r = cli(*args)
        assert r.exit_code == 0 and json.loads(r.stdout)["teacher_score"] == 1.0
        assert server.count() == 2  # the teacher's answers came from OUT.teacher.jsonl
    assert (tmp_path / "res.jsonl.teacher.jsonl").exists()


def test_adapter_dir_loads_base_plus_adapter(tmp_path, tiny_model_dir, student, answers):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from imitate.models import load_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg).eval()
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(tiny_model_dir)

    loaded, _ = load_model(str(adapter))
    x = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        want = peft_model(x).logits
        assert torch.allclose(loaded(x).logits, want, atol=1e-5)
        assert not torch.allclose(student[0](x).logits, want, atol=1e-3)  # the adapter really changes the model

    f = write_rows(tmp_path / "e.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers)])
    s = json.loads(
        cli(
            "--model", adapter, "--prompts", f, "--reference-field", "answer", "--max-tokens", MAX_TOKENS, "--json"
        ).stdout
    )
    assert s["n"] == 3 and s["score"] < 1.0  # a different model answers differently from the base student

    meta["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    r = cli("--model", adapter, "--prompts", f, "--reference-field", "answer")
    assert r.exit_code == 1 and "adapter_config.json: base_model_name_or_path" in r.stderr


def test_config_file_section_and_relative_paths(tmp_path, tiny_model_dir, answers):
    d = tmp_path / "proj"
    d.mkdir()
    write_rows(d / "eval.jsonl", [{"prompt": p, "gold": a} for p, a in zip(PROMPTS, answers)])
    (d / "run.toml").write_text(
        f'[eval]\nmodel = "{tiny_model_dir}"\nprompts = "eval.jsonl"\nreference-field = "gold"\n'
        f'max-tokens = {MAX_TOKENS}\nout = "results/eval.jsonl"\n'
    )
    r = cli("--config", d / "run.toml", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["score"] == 1.0
    assert (d / "results" / "eval.jsonl").exists()


def test_user_errors(tmp_path, tiny_model_dir):
    f = write_rows(tmp_path / "e.jsonl", [{"prompt": "p"}])
    r = cli("--model", tmp_path / "missing", "--prompts", f, "--reference-field", "x")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    r = cli("--model", tiny_model_dir, "--prompts", f)
    assert r.exit_code == 1 and "nothing to score against" in r.stderr and "e.jsonl:1" in r.stderr
    r = cli("--model", tiny_model_dir, "--prompts", f, "--match", "fuzzy")
    assert r.exit_code == 2
    r = cli("--prompts", f)
    assert r.exit_code == 2 and "--model" in r.stderr
