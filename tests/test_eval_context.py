"""`imitate eval` with a teacher's context: the student is always asked without it; a teacher asked with --teacher gets
it in front (--teacher-context FILE or the rows' own `context`), hf and API teachers alike."""

from __future__ import annotations

import json

import pytest
from test_eval import MAX_TOKENS, PROMPTS, cli, write_rows

from imitate.evaluate import EvalConfig, run

CONTEXT = [
    {"role": "system", "content": "You are a helpful assistant. Answer in words."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "forty-two"},
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from imitate.models import load_model

    return load_model(str(tiny_model_dir))


def greedy(model, chats):
    from imitate.models import generate_batch

    return [c.text for c in generate_batch(*model, chats, max_tokens=MAX_TOKENS)]


def results(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("source", ["file", "rows"])
def test_hf_teacher_is_asked_with_the_context_and_the_student_without(source, tmp_path, tiny_model_dir, model):
    """The same model as teacher and student: with the context the teacher answers what the model says after it,
    the student what it says without it (so agreement is no longer trivially 1)."""
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    rows = [{"prompt": p} for p in PROMPTS] if source == "file" else [{"messages": c, "context": CONTEXT}
                                                                       for c in chats]
    f = write_rows(tmp_path / "e.jsonl", rows)
    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps(CONTEXT))
    extra = {"teacher_context": ctx} if source == "file" else {}
    out = tmp_path / "r.jsonl"
    s = run(EvalConfig(model=tiny_model_dir, prompts=f, teacher=f"hf:{tiny_model_dir}", max_tokens=MAX_TOKENS,
                       out=out, **extra))
    got = results(out)
    with_ctx, without = greedy(model, [CONTEXT + c for c in chats]), greedy(model, chats)
    assert with_ctx != without  # the context matters to this model, so the assertions below can tell them apart
    assert [r["teacher_answer"] for r in got] == with_ctx
    assert [r["answer"] for r in got] == without
    assert s["teacher_context"] == len(PROMPTS)
    plain = run(EvalConfig(model=tiny_model_dir, prompts=write_rows(tmp_path / "p.jsonl", [{"prompt": p} for p in
                                                                                           PROMPTS]),
                           teacher=f"hf:{tiny_model_dir}", max_tokens=MAX_TOKENS))
    assert plain["agreement"] == 1.0 and plain["teacher_context"] == 0


def test_record_answers_are_scored_without_the_context(tmp_path, tiny_model_dir):
    """Records from collect --context: the student's answers and its loss on the teacher's answers ignore `context`
    (the same numbers as the records without it)."""
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "three hundred"}]}
            for p in PROMPTS]
    a = run(EvalConfig(model=tiny_model_dir, prompts=write_rows(tmp_path / "a.jsonl", rows), max_tokens=MAX_TOKENS))
    b = run(EvalConfig(model=tiny_model_dir, prompts=write_rows(tmp_path / "b.jsonl", [{**r, "context": CONTEXT}
                                                                                        for r in rows]),
                       max_tokens=MAX_TOKENS))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["agreement"] == b["agreement"]
    assert b["teacher_context"] == len(PROMPTS)  # the teacher's answers were given with a context


def test_api_teacher_gets_the_context_and_is_cached(tmp_path, tiny_model_dir, monkeypatch):
    from fake_server import FakeServer

    f = write_rows(tmp_path / "e.jsonl", [{"prompt": p, "answer": f"Answer to: {p}"} for p in (PROMPTS[0], PROMPTS[2])])
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Always answer as 'Answer to: <question>'.")
    out = tmp_path / "res.jsonl"
    with FakeServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url + "/v1")
        args = ["--model", tiny_model_dir, "--prompts", f, "--out", out, "--teacher", "openai:fake-model",
                "--teacher-context", ctx, "--reference-field", "answer", "--max-tokens", MAX_TOKENS, "--json"]
        r = cli(*args)
        assert r.exit_code == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["teacher_score"] == 1.0 and s["teacher_context"] == 2
        assert server.count() == 2
        assert all(h["body"]["messages"][0] == {"role": "system", "content": ctx.read_text()} for h in server.history)
        assert "asked with its context" in r.stderr
        assert cli(*args).exit_code == 0 and server.count() == 2  # cached in OUT.teacher.jsonl, context included


def test_teacher_context_without_a_teacher_is_a_usage_error(tmp_path, tiny_model_dir):
    f = write_rows(tmp_path / "e.jsonl", [{"prompt": "x", "answer": "y"}])
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Be brief.")
    r = cli("--model", tiny_model_dir, "--prompts", f, "--reference-field", "answer", "--teacher-context", ctx)
    assert r.exit_code == 2 and "--teacher-context" in r.stderr and "Traceback" not in r.output
