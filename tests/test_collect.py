"""`imitate collect` against the loopback fake server: real SDK clients over real HTTP, both wire formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate.cli import app
from imitate.collect.stage import CollectConfig, run
from imitate.errors import ImitateError
from imitate.records import request_id


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Backoff without Retry-After starts at 10 ms instead of 0.5 s, to keep the suite fast."""
    import functools

    from imitate.collect.limiter import RetryPolicy

    monkeypatch.setattr("imitate.collect.engine.RetryPolicy", functools.partial(RetryPolicy, base=0.01))


@pytest.fixture
def server():
    with FakeServer(latency=0.0, retry_after=0.01) as s:
        yield s


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cfg(server, tmp_path, **kw) -> CollectConfig:
    if "prompts" not in kw:
        kw["prompts"] = write_rows(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(3)])
    kw.setdefault("teacher", "openai:fake-model")
    kw.setdefault("base_url", server.base_url + "/v1")
    return CollectConfig(out=tmp_path / "out.jsonl", progress=False, **kw)


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, ["collect", *args], env=env)


# --- records over real HTTP ------------------------------------------------------------------------------------


def test_openai_records_match_the_format(server, tmp_path):
    c = cfg(server, tmp_path, system="Be brief.", temperature=0.5, max_tokens=50)
    summary = run(c)
    recs = read(c.out)
    assert summary["completed"] == 3 and summary["sent"] == 3 and summary["failed"] == 0
    assert len(recs) == 3 and server.count("/v1/chat/completions") == 3
    r = sorted(recs, key=lambda r: r["source"]["prompt"])[1]
    assert list(r) == ["id", "teacher", "messages", "params", "sample", "finish_reason", "usage", "source", "created"]
    assert r["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "question 1"},
        {"role": "assistant", "content": "Answer to: question 1"},
    ]
    assert r["id"] == request_id("openai:fake-model", r["messages"][:-1], {"temperature": 0.5, "max_tokens": 50}, 0)
    assert (
        r["teacher"] == "openai:fake-model" and r["finish_reason"] == "stop" and r["source"] == {"prompt": "question 1"}
    )
    assert r["usage"] == {"input_tokens": 4, "output_tokens": 4}
    body = server.history[0]["body"]
    assert body["temperature"] == 0.5 and body["max_tokens"] == 50 and body["model"] == "fake-model"
    assert summary["tokens_in"] == 12 and summary["tokens_out"] == 12


def test_n_samples_share_one_call_and_logprobs_are_stored(server, tmp_path):
    c = cfg(server, tmp_path, n=3, logprobs=2)
    run(c)
    recs = read(c.out)
    assert len(recs) == 9 and len({r["id"] for r in recs}) == 9
    assert server.count() == 3 and all(h["body"]["n"] == 3 for h in server.history)
    assert {r["sample"] for r in recs} == {0, 1, 2}
    lp = recs[0]["logprobs"]
    assert len(lp) == len(recs[0]["messages"][-1]["content"].split(" "))
    assert set(lp[0]) == {"token", "id", "logprob", "bytes", "top"} and len(lp[0]["top"]) == 2
    assert bytes(lp[0]["bytes"]).decode() == lp[0]["token"] and lp[0]["top"][0]["bytes"] == lp[0]["bytes"]
    # raising --n later only asks for the new samples
    run(cfg(server, tmp_path, n=4, logprobs=2))
    assert len(read(c.out)) == 12 and server.count() == 6
    assert [h["body"].get("n") for h in server.history[3:]] == [None, None, None]


def test_temperature_zero_is_sent_as_greedy(server, tmp_path):
    run(cfg(server, tmp_path, temperature=0.0, n=2))
    assert all(h["body"]["temperature"] == 0 for h in server.history)
    recs = read(tmp_path / "out.jsonl")
    by_prompt: dict = {}
    for r in recs:
        by_prompt.setdefault(r["source"]["prompt"], set()).add(r["messages"][-1]["content"])
    assert all(len(v) == 1 for v in by_prompt.values())  # greedy samples agree


def test_anthropic_over_http_with_length_marked(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    c = cfg(server, tmp_path, teacher="anthropic:claude-test", base_url=server.base_url, max_tokens=2, system="sys")
    summary = run(c)
    recs = read(c.out)
    assert server.count("/v1/messages") == 3 and summary["length_cut"] == 3
    assert all(r["finish_reason"] == "length" for r in recs)
    assert recs[0]["messages"][0] == {"role": "system", "content": "sys"}
    body = server.history[0]["body"]
    assert body["system"] == "sys" and all(m["role"] != "system" for m in body["messages"]) and body["max_tokens"] == 2


def test_txt_and_messages_inputs_and_template(server, tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first line\n\nsecond line\n")
    run(cfg(server, tmp_path, prompts=txt))
    assert sorted(r["source"]["prompt"] for r in read(tmp_path / "out.jsonl")) == ["first line", "second line"]
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old answer"}]}]
    run(
        CollectConfig(
            teacher="openai:m",
            out=tmp_path / "m.jsonl",
            prompts=write_rows(tmp_path / "m_in.jsonl", rows),
            base_url=server.base_url + "/v1",
            progress=False,
        )
    )
    assert read(tmp_path / "m.jsonl")[0]["messages"][-2:] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Answer to: hi"},
    ]
    rows = [{"instruction": "Add", "input": "2 and 3"}]
    run(
        CollectConfig(
            teacher="openai:m",
            out=tmp_path / "t.jsonl",
            prompts=write_rows(tmp_path / "t_in.jsonl", rows),
            template="instruction",
            base_url=server.base_url + "/v1",
            progress=False,
        )
    )
    assert read(tmp_path / "t.jsonl")[0]["messages"][0]["content"] == "Add\n\nInput:\n2 and 3"


def test_duplicate_rows_are_requested_once(server, tmp_path):
    p = write_rows(tmp_path / "p.jsonl", [{"prompt": "same"}, {"prompt": "same"}, {"prompt": "other"}])
    s = run(cfg(server, tmp_path, prompts=p))
    assert s["requests"] == 2 and server.count() == 2


# --- retries and failures --------------------------------------------------------------------------------------


def test_retries_429_with_retry_after_500_malformed_and_drop(server, tmp_path):
    server.retry_after = 0.3
    server.enqueue("429", "500", "malformed", "drop")
    c = cfg(server, tmp_path, concurrency=1, retries=5)
    s = run(c)
    assert s["completed"] == 3 and s["failed"] == 0 and s["retries"] == 4
    assert len(read(c.out)) == 3 and server.count() == 7
    gap = server.history[1]["t"] - server.history[0]["t"]
    assert gap >= 0.29  # Retry-After honoured (backoff alone starts at most 0.5 s but may be ~0)


def test_timeout_is_retried(server, tmp_path):
    server.hang_s = 5
    server.enqueue("hang")
    s = run(cfg(server, tmp_path, timeout=0.3, concurrency=1))
    assert s["completed"] == 3 and s["retries"] == 1
    assert server.history[0]["fault"] == "hang" and server.count() == 4


def test_exhausted_retries_go_to_the_failures_file(server, tmp_path):
    server.fail_when["question 1"] = "500"
    c = cfg(server, tmp_path, retries=2)
    result = invoke(
        "--teacher",
        c.teacher,
        "--prompts",
        str(c.prompts),
        "--out",
        str(c.out),
        "--base-url",
        c.base_url,
        "--retries",
        "2",
        "--no-progress",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["failed"] == 1 and s["completed"] == 2
    fails = read(tmp_path / "out.failures.jsonl")
    assert len(fails) == 1 and fails[0]["attempts"] == 3 and "500" in fails[0]["error"]
    assert fails[0]["messages"] == [{"role": "user", "content": "question 1"}] and fails[0]["where"].endswith(":2")
    assert all(r["source"]["prompt"] != "question 1" for r in read(c.out))  # never an empty answer
    assert "failed after retries" in result.stderr
    # the next run retries only the failed one, and the failures file then disappears
    del server.fail_when["question 1"]
    before = server.count()
    s2 = run(c)
    assert s2["cached"] == 2 and s2["completed"] == 1 and server.count() == before + 1
    assert not (tmp_path / "out.failures.jsonl").exists() and len(read(c.out)) == 3


def test_client_errors_fail_without_retry_and_auth_errors_stop_the_run(server, tmp_path):
    from imitate.collect.limiter import classify
    from imitate.errors import ImitateError

    class Resp:
        headers = {"retry-after": "2"}

    class E(Exception):
        def __init__(self, code):
            self.status_code, self.response = code, Resp()

    assert classify(E(429)) == ("retry", 2.0) and classify(E(503))[0] == "retry"
    assert classify(E(400))[0] == "fail" and classify(E(401))[0] == "fatal" and classify(KeyError())[0] == "fail"

    server.fail_when["question"] = "401"
    with pytest.raises(ImitateError, match="refused"):
        run(cfg(server, tmp_path))


def test_empty_answer_is_a_failure_not_a_record(server, tmp_path, capsys):
    server.responder = lambda body, s: ""
    # nothing succeeded: an error (exit 1) with the first error and what to check; the failures are kept
    with pytest.raises(ImitateError, match="no request succeeded.*empty answer") as ei:
        run(cfg(server, tmp_path, retries=0))
    assert "--base-url" in ei.value.hint
    assert len(read(tmp_path / "out.failures.jsonl")) == 3
    assert "empty answer" in read(tmp_path / "out.failures.jsonl")[0]["error"]
    # one good answer among failures is a partial success: exit 0, the summary counts the failures
    answers = iter(["", "ok", ""])
    server.responder = lambda body, s: next(answers)
    s = run(cfg(server, tmp_path, retries=0))
    assert s["failed"] == 2 and s["completed"] == 1


# --- resume, ids ----------------------------------------------------------------------------------------------


def test_rerun_sends_nothing_and_torn_tail_is_repaired(server, tmp_path):
    c = cfg(server, tmp_path)
    run(c)
    with c.out.open("a") as fh:
        fh.write('{"id": "torn-by-a-cra')
    s = run(c)
    assert s["cached"] == 3 and s["sent"] == 0 and server.count() == 3
    assert len(read(c.out)) == 3


def test_changing_params_or_teacher_changes_ids(server, tmp_path):
    run(cfg(server, tmp_path, temperature=0.5))
    run(cfg(server, tmp_path, temperature=0.6))
    run(cfg(server, tmp_path, temperature=0.6, teacher="openai:other"))
    recs = read(tmp_path / "out.jsonl")
    assert server.count() == 9 and len({r["id"] for r in recs}) == 9


# --- errors before any request --------------------------------------------------------------------------------


def test_template_error_names_template_variable_line_before_sending(server, tmp_path):
    p = write_rows(tmp_path / "p.jsonl", [{"title": "a", "body": "b"}] * 3 + [{"title": "only"}])
    t = tmp_path / "tpl.j2"
    t.write_text("{{ title }} / {{ body }}")
    r = invoke(
        "--teacher",
        "openai:m",
        "--prompts",
        str(p),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--template",
        str(t),
        "--base-url",
        server.base_url + "/v1",
    )
    assert r.exit_code == 1
    assert f"{p}:4" in r.stderr and "tpl.j2" in r.stderr and "'body'" in r.stderr
    assert server.count() == 0 and not (tmp_path / "o.jsonl").exists()


def test_bad_input_lines_name_file_and_line(server, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    r = invoke(
        "--teacher", "openai:m", "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"), "--base-url", server.base_url
    )
    assert r.exit_code == 1 and f"{p}:2" in r.stderr and "not valid JSON" in r.stderr
    write_rows(p, [{"prompt": "ok"}, {"text": "no prompt"}])
    r = invoke(
        "--teacher", "openai:m", "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"), "--base-url", server.base_url
    )
    assert r.exit_code == 1 and f"{p}:2" in r.stderr and "--template" in r.stderr
    write_rows(p, [{"messages": [{"role": "robot", "content": "x"}]}])
    r = invoke(
        "--teacher", "openai:m", "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"), "--base-url", server.base_url
    )
    assert r.exit_code == 1 and f"{p}:1" in r.stderr and "role" in r.stderr
    assert server.count() == 0


def test_missing_key_names_the_env_var(server, tmp_path):
    p = write_rows(tmp_path / "p.jsonl", [{"prompt": "x"}])
    r = invoke("--teacher", "openai:gpt-4o-mini", "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 1 and "OPENAI_API_KEY" in r.stderr and "--api-key-env" in r.stderr
    # the key is checked before the input is even read
    r = invoke("--teacher", "openai:gpt-4o-mini", "--prompts", str(tmp_path / "nope.jsonl"), "--out", "o.jsonl")
    assert r.exit_code == 1 and "OPENAI_API_KEY" in r.stderr and "nope" not in r.stderr
    r = invoke(
        "--teacher",
        "anthropic:claude-x",
        "--prompts",
        str(p),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--api-key-env",
        "MY_KEY",
    )
    assert r.exit_code == 1 and "MY_KEY" in r.stderr
    r = invoke(
        "--teacher",
        "anthropic:c",
        "--prompts",
        str(p),
        "--out",
        "o.jsonl",
        "--logprobs",
        "2",
        env={"ANTHROPIC_API_KEY": "k"},
    )
    assert r.exit_code == 2 and "--logprobs" in r.stderr
    r = invoke("--teacher", "mistral:large", "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 2 and "openai, anthropic, hf" in r.stderr
    for flag, value in (("--rpm", "-1"), ("--tpm", "0"), ("--timeout", "0")):  # no ceiling is "leave it out"
        r = invoke("--teacher", "openai:m", "--base-url", server.base_url + "/v1", "--prompts", str(p),
                   "--out", str(tmp_path / "o.jsonl"), flag, value)
        assert r.exit_code == 2 and f"{flag} must be > 0" in r.stderr, r.stderr
    assert server.count() == 0


def test_api_key_never_appears_in_output_or_files(server, tmp_path):
    secret = "sk-FAKEKEY-1234567890-must-not-leak"
    env = {"SECRET_FOR_TEST": secret}
    server.fail_when["question 2"] = "500"
    p = write_rows(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(3)])
    common = [
        "--teacher",
        "openai:m",
        "--prompts",
        str(p),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--base-url",
        server.base_url + "/v1",
        "--api-key-env",
        "SECRET_FOR_TEST",
        "--retries",
        "1",
    ]
    outputs = [invoke(*common, "--json", env=env), invoke(*common, "--dry-run", env=env)]
    server.fail_when["question"] = "401"
    outputs.append(invoke(*common, "--out", str(tmp_path / "o2.jsonl"), env=env))
    assert outputs[2].exit_code == 1
    sent_keys = {h["body"].get("model") for h in server.history}
    assert sent_keys == {"m"}
    for r in outputs:
        assert secret not in r.stdout and secret not in r.stderr
    files = list(tmp_path.glob("*"))
    assert any(f.name == "o.failures.jsonl" for f in files)
    for f in files:
        assert secret not in f.read_text()


# --- dry run, accounting, config ------------------------------------------------------------------------------


def test_dry_run_sends_nothing_and_counts(server, tmp_path):
    p = write_rows(tmp_path / "p.jsonl", [{"prompt": "x" * 400}, {"prompt": "y" * 40}])
    r = invoke(
        "--teacher",
        "openai:gpt-4o-mini",
        "--prompts",
        str(p),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--n",
        "2",
        "--dry-run",
        "--json",
    )
    assert r.exit_code == 0, r.stderr  # no key needed: nothing is sent
    s = json.loads(r.stdout)
    assert s["would_send"] == 4 and s["est_tokens_in"] == 2 * (104 + 14) and "4" in s["token_estimate"]
    assert s["est_cost_in_usd"] == pytest.approx(s["est_tokens_in"] * 0.15 / 1e6)
    assert server.count() == 0 and not (tmp_path / "o.jsonl").exists()


def test_cost_from_flags_and_table():
    from imitate.collect.pricing import cost, prices_for

    assert prices_for("openai:gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert prices_for("openai:gpt-4o-2024") == (2.50, 10.00)  # longest prefix wins over gpt-4o-mini? no: gpt-4o
    assert prices_for("openai:my-local") is None and prices_for("hf:./m") == (0.0, 0.0)
    assert prices_for("openai:my-local", 1.0, 2.0) == (1.0, 2.0)
    assert cost(1_000_000, 500_000, (1.0, 2.0)) == pytest.approx(2.0)


def test_cli_config_file_and_cost(server, tmp_path):
    write_rows(tmp_path / "p.jsonl", [{"prompt": "hello world"}])
    toml = tmp_path / "pipe.toml"
    toml.write_text(
        f'[collect]\nteacher = "openai:m"\nprompts = "p.jsonl"\nout = "o.jsonl"\nbase-url = "{server.base_url}/v1"\n'
        "price-in = 1000000.0\nprice-out = 2000000.0\nprogress = false\n"
    )
    r = invoke("--config", str(toml), "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["completed"] == 1 and s["cost_usd"] == pytest.approx(s["tokens_in"] * 1.0 + s["tokens_out"] * 2.0)
    assert (tmp_path / "o.jsonl").exists() and "tokens in" in r.stderr


# --- self-instruct ----------------------------------------------------------------------------------------------


def test_self_instruct_generates_dedups_and_answers(server, tmp_path):
    seeds = write_rows(tmp_path / "seeds.jsonl", [{"instruction": f"Seed task number {w} please"} for w in "abcdef"])
    c = CollectConfig(
        teacher="openai:m",
        out=tmp_path / "si.jsonl",
        self_instruct=12,
        seed_tasks=seeds,
        base_url=server.base_url + "/v1",
        progress=False,
        concurrency=2,
    )
    # the fake teacher repeats itself once: that task must be dropped as a duplicate
    server.responder = lambda body, s: (
        "1. Seed task number a please\n2. Explain the link between a river and a comet.\n"
        if "numbered list" in body["messages"][-1]["content"] and not s.history[:-1]
        else _default(body, s)
    )
    s = run(c)
    recs = read(c.out)
    assert s["self_instruct"]["generated"] == 12 and len(recs) == 12
    texts = [r["messages"][-2]["content"] for r in recs]
    assert len(set(texts)) == 12 and "Seed task number a please" not in texts
    assert all(r["source"]["origin"] == "self-instruct" for r in recs)
    gen_calls = server.count()
    # re-running rebuilds the same pool from the journal and sends nothing
    s2 = run(c)
    assert server.count() == gen_calls and s2["cached"] == 12 and s2["sent"] == 0


def _default(body, s):
    from fake_server import default_answer

    return default_answer(body, s)


def test_self_instruct_dry_run_and_template_check_send_nothing(server, tmp_path):
    base = ["--teacher", "openai:m", "--out", str(tmp_path / "si.jsonl"), "--self-instruct", "20", "--json"]
    r = invoke(*base, "--dry-run")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["self_instruct_calls"] == 4 and s["would_send"] == 24 and s["est_tokens_in"] > 0
    t = tmp_path / "t.j2"
    t.write_text("{{ prompt }} {{ context }}")
    r = invoke(*base, "--template", str(t), "--base-url", server.base_url + "/v1")
    assert r.exit_code == 1 and "'context'" in r.stderr
    assert server.count() == 0


def test_rpm_paces_requests_at_the_server(server, tmp_path):
    p = write_rows(tmp_path / "p.jsonl", [{"prompt": f"paced {i}"} for i in range(30)])
    s = run(cfg(server, tmp_path, prompts=p, rpm=1200, concurrency=8))  # 20/s after a burst of 20
    times = sorted(h["t"] for h in server.history)
    assert s["completed"] == 30 and times[-1] - times[0] >= 0.4  # the 10 beyond the burst need >= 0.5 s


def test_progress_bar_on_stderr(server, tmp_path):
    server.fail_when["question 0"] = "400"
    c = cfg(server, tmp_path)
    r = invoke("--teacher", c.teacher, "--prompts", str(c.prompts), "--out", str(c.out), "--base-url", c.base_url)
    assert r.exit_code == 0 and r.stdout == ""
    assert "3/3" in r.stderr and "req/s" in r.stderr and "1 failed" in r.stderr
    assert server.count() == 3  # a 400 is not retried
