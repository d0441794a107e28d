"""`imitate collect --context FILE` over the loopback server: the teacher is sent context + messages, the record keeps
them apart, the id covers both; the same through the provider batch path and in --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate.cli import app
from imitate.collect.stage import CollectConfig, run
from imitate.errors import ImitateError
from imitate.records import read_records, request_id, teacher_messages

CONTEXT = [
    {"role": "system", "content": "Answer as 'ANSWER: <text>'. Never use more than ten words."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "ANSWER: blue"},
]
ROWS = [  # several shapes: numbers, code, non-English, a multi-turn chat
    {"prompt": "What is 17 * 23?"},
    {"prompt": "def f(xs):\n    return xs[::-1]\nWhat does f do?"},
    {"prompt": "Übersetze: die Katze schläft."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Name three rivers."}]},
]
PARAMS = {"temperature": 0.7, "max_tokens": 1024}


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [ln.data for ln in read_records(path)]


def cfg(server, tmp_path, provider="openai", **kw) -> CollectConfig:
    kw.setdefault("prompts", write(tmp_path / "p.jsonl", ROWS))
    kw.setdefault("out", tmp_path / "out.jsonl")
    base = server.base_url + ("/v1" if provider == "openai" else "")
    return CollectConfig(teacher=f"{provider}:fake-model", base_url=base, progress=False, poll_interval=0.001,
                         poll_max=0.01, **kw)


def context_file(tmp_path: Path, turns: list[dict], suffix: str = ".json") -> Path:
    p = tmp_path / f"context{suffix}"
    if suffix == ".jsonl":
        return write(p, turns)
    p.write_text(json.dumps(turns), encoding="utf-8")
    return p


def check_records(recs: list[dict], sent: list[list[dict]], context: list[dict], system: str | None = None) -> None:
    """Each record: messages free of the context, context as given, id over both, and the teacher was sent both."""
    assert len(recs) == len(ROWS)
    for r in recs:
        assert r["context"] == context
        assert all(m not in r["messages"] for m in context)  # the student's view holds none of it
        assert r["messages"][-1]["role"] == "assistant"
        if system:
            assert r["messages"][0] == {"role": "system", "content": system}  # --system stays the student's turn
        assert r["id"] == request_id("openai:fake-model", r["messages"][:-1], PARAMS, 0, context=context)
        assert r["id"] != request_id("openai:fake-model", r["messages"][:-1], PARAMS, 0)
        assert teacher_messages(r)[:-1] in sent  # exactly what the server saw: context, then the messages


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_server_sees_context_and_messages_record_keeps_them_apart(server, tmp_path, suffix):
    c = cfg(server, tmp_path, context=context_file(tmp_path, CONTEXT, suffix), system="Be brief.")
    assert run(c)["completed"] == len(ROWS)
    sent = [h["body"]["messages"] for h in server.history]
    assert all(s[: len(CONTEXT)] == CONTEXT for s in sent)
    check_records(read(c.out), sent, CONTEXT, system="Be brief.")


def test_changing_the_context_asks_again_and_same_context_resumes(server, tmp_path):
    run(cfg(server, tmp_path, context=context_file(tmp_path, CONTEXT)))
    first = {r["id"] for r in read(tmp_path / "out.jsonl")}
    run(cfg(server, tmp_path, context=context_file(tmp_path, CONTEXT)))  # same context: nothing sent again
    assert server.count("/v1/chat/completions") == len(ROWS)
    other = [{**CONTEXT[0], "content": "Answer in French."}]
    run(cfg(server, tmp_path, context=context_file(tmp_path, other)))
    assert server.count("/v1/chat/completions") == 2 * len(ROWS)
    ids = {r["id"] for r in read(tmp_path / "out.jsonl")}
    assert len(ids) == 2 * len(ROWS) and first < ids
    run(cfg(server, tmp_path))  # no context: the ids of a plain run, different again
    assert server.count("/v1/chat/completions") == 3 * len(ROWS)
    plain = [r for r in read(tmp_path / "out.jsonl") if "context" not in r]
    assert len(plain) == len(ROWS)


def test_template_context_is_rendered_per_row(server, tmp_path):
    rows = [{"q": "2 + 2", "style": "digits"}, {"q": "vingt et un", "style": "mots"}]
    j2 = tmp_path / "ctx.j2"
    j2.write_text('[{"role": "system", "content": {{ ("Style: " ~ style) | tojson }}},'
                  ' {"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]')
    tpl = tmp_path / "q.j2"
    tpl.write_text("Compute {{ q }}")
    c = cfg(server, tmp_path, prompts=write(tmp_path / "r.jsonl", rows), template=str(tpl), context=j2)
    run(c)
    recs = {r["source"]["style"]: r for r in read(c.out)}
    assert recs["mots"]["context"][0] == {"role": "system", "content": "Style: mots"}
    assert recs["digits"]["messages"][0] == {"role": "user", "content": "Compute 2 + 2"}
    assert len(recs["digits"]["context"]) == 3
    # plain-text output is one system turn; a variable a row lacks names the row before anything is sent
    j2.write_text("You answer in {{ style }} only.")
    c2 = cfg(server, tmp_path, prompts=write(tmp_path / "r.jsonl", rows), template=str(tpl), context=j2,
             out=tmp_path / "o2.jsonl")
    run(c2)
    assert read(c2.out)[0]["context"] == [{"role": "system", "content": "You answer in digits only."}]
    j2.write_text("Use {{ missing_field }}.")
    before = server.count()
    with pytest.raises(ImitateError, match=r"r\.jsonl:1: context template .* 'missing_field'"):
        run(cfg(server, tmp_path, prompts=write(tmp_path / "r.jsonl", rows), template=str(tpl), context=j2,
                out=tmp_path / "o3.jsonl"))
    assert server.count() == before


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_batch_path_sends_the_context_too(server, tmp_path, monkeypatch, provider):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    c = cfg(server, tmp_path, provider, context=context_file(tmp_path, CONTEXT), batch=True)
    run(c)
    bodies = [body for b in server.batch.batches.values() for _, body in b["requests"]]
    assert len(bodies) == len(ROWS)
    recs = read(c.out)
    assert len(recs) == len(ROWS) and all(r["context"] == CONTEXT for r in recs)
    assert all(m not in r["messages"] for r in recs for m in CONTEXT)
    if provider == "openai":
        assert all(b["messages"][:3] == CONTEXT for b in bodies)
    else:  # anthropic: the context's system turn goes to `system`, its example turns lead `messages`
        assert all(b["system"].startswith(CONTEXT[0]["content"]) for b in bodies)
        assert all(b["messages"][:2] == CONTEXT[1:] for b in bodies)


def test_dry_run_shows_one_request_with_its_context(server, tmp_path):
    p = write(tmp_path / "p.jsonl", ROWS)
    ctx = context_file(tmp_path, CONTEXT)
    r = CliRunner().invoke(app, ["collect", "--teacher", "openai:gpt-4o-mini", "--prompts", str(p), "--out",
                                 str(tmp_path / "o.jsonl"), "--context", str(ctx), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)["first_request"]
    assert first["context"] == CONTEXT and first["messages"] == [{"role": "user", "content": "What is 17 * 23?"}]
    assert "first request" in r.stderr and "ANSWER: blue" in r.stderr
    assert server.count() == 0


@pytest.mark.parametrize("content, suffix, match", [
    ('[{"role": "narrator", "content": "x"}]', ".json", r"context\[0\]\.role is 'narrator'"),
    ('{"role": "system"', ".json", r"context\.json:1: not valid JSON"),
    ("[]", ".json", "non-empty list"),
    ("system: be brief", ".yaml", "unknown file type"),
])
def test_bad_context_files_are_refused_before_sending(server, tmp_path, content, suffix, match):
    p = tmp_path / f"context{suffix}"
    p.write_text(content)
    r = CliRunner().invoke(app, ["collect", "--teacher", "openai:fake-model", "--base-url", server.base_url + "/v1",
                                 "--prompts", str(write(tmp_path / "p.jsonl", ROWS)), "--out",
                                 str(tmp_path / "o.jsonl"), "--context", str(p)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    import re

    assert re.search(match, r.stderr), r.stderr
    assert server.count() == 0


def test_records_re_asked_keep_their_own_context_unless_context_is_given(server, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
             "context": CONTEXT}]
    c = cfg(server, tmp_path, prompts=write(tmp_path / "recs.jsonl", rows))
    run(c)
    assert server.history[-1]["body"]["messages"][:3] == CONTEXT
    assert read(c.out)[0]["context"] == CONTEXT and read(c.out)[0]["messages"][0]["content"] == "What is 2 + 2?"
    other = [{"role": "system", "content": "Answer in French."}]
    run(cfg(server, tmp_path, prompts=tmp_path / "recs.jsonl", context=context_file(tmp_path, other),
            out=tmp_path / "o2.jsonl"))
    assert server.history[-1]["body"]["messages"][0] == other[0] and len(server.history[-1]["body"]["messages"]) == 2
