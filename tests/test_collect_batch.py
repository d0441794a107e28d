"""`imitate collect --batch` against the loopback batch server (tests/fake_batch.py): real SDK clients, real HTTP,
both wire formats. Records equal live collection's; errored/expired rows are retried; splitting by limits; --no-wait
and --cancel; and kill -9 at every dangerous moment followed by a re-run never pays for a request twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate.cli import app
from imitate.collect.batch import split
from imitate.collect.journal import BatchLog
from imitate.collect.stage import CollectConfig, run
from imitate.errors import ImitateError

PROVIDERS = {"openai": "/v1", "anthropic": ""}  # provider -> path the SDK's base URL ends with

# Prompts of several shapes (numbers, code, number words, non-English, long, short, multi-turn), none of them built
# for the batch code; a number makes each one distinct.
SHAPES = [
    lambda i: {"prompt": f"What is {17 + i} * {23 + i}?"},
    lambda i: {"prompt": f"Write a Python function f{i}(xs) that reverses a list:\n```python\ndef f{i}(xs):\n```"},
    lambda i: {"prompt": f"Spell out the number {4821 + i} in words."},
    lambda i: {"prompt": f"Übersetze ins Deutsche ({i}): the cat sleeps on the warm windowsill."},
    lambda i: {"prompt": f"用一句话解释量子纠缠。第{i}题"},
    lambda i: {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": f"Name three rivers, set {i}."},
    ]},
    lambda i: {"prompt": f"Tell the long history of item {i}: " + "and then more happened " * 40},
    lambda i: {"prompt": f"ok {i}"},
]


def rows(n: int) -> list[dict]:
    return [SHAPES[i % len(SHAPES)](i) for i in range(n)]


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(n)), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] if path.exists() else []


def url(server: FakeServer, provider: str) -> str:
    return server.base_url + PROVIDERS[provider]


def cfg(server, tmp_path, provider="openai", n=10, **kw) -> CollectConfig:
    kw.setdefault("prompts", write_prompts(tmp_path / "p.jsonl", n))
    kw.setdefault("out", tmp_path / "out.jsonl")
    kw.setdefault("teacher", f"{provider}:fake-model")
    return CollectConfig(
        base_url=url(server, provider),
        batch=kw.pop("batch", True),
        poll_interval=0.001,
        poll_max=0.01,
        progress=False,
        **kw,
    )


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def same_record(a: dict, b: dict) -> None:
    for key in ("id", "teacher", "messages", "params", "sample", "finish_reason", "usage", "source"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_batch_records_equal_live_records(server, tmp_path, provider):
    live = run(cfg(server, tmp_path, provider, n=16, batch=False, out=tmp_path / "live.jsonl", max_tokens=12))
    assert live["completed"] == 16
    batch = run(cfg(server, tmp_path, provider, n=16, max_tokens=12))
    by_id = {r["id"]: r for r in read(tmp_path / "live.jsonl")}
    got = read(tmp_path / "out.jsonl")
    assert len(got) == 16 and set(by_id) == {r["id"] for r in got}
    for r in got:
        same_record(r, by_id[r["id"]])
    assert any(r["finish_reason"] == "length" for r in got)  # the long prompt's answer is cut at max_tokens
    assert batch["sent"] == 16 and batch["completed"] == 16 and batch["batches"] == 1 and batch["pending"] == 0
    assert server.batch.batch_requests[provider] == 16
    assert (batch["tokens_in"], batch["tokens_out"]) == (live["tokens_in"], live["tokens_out"])
    # the batch was polled through its statuses before its results were read
    (b,) = server.batch.batches.values()
    assert b["ended"] and b["step"] >= 2
    log = BatchLog(tmp_path / "out.batches.jsonl")
    assert [i["state"] for i in log.intents.values()] == ["done"] and not log.held()


def test_batch_prices_are_half_of_live(server, tmp_path):
    known = "openai:gpt-4o-mini"  # a model in the price table
    live = run(replace(cfg(server, tmp_path, batch=False, out=tmp_path / "live.jsonl"), teacher=known))
    batch = run(replace(cfg(server, tmp_path), teacher=known))
    assert live["price_per_mtok"] == [0.15, 0.60] and batch["price_per_mtok"] == [0.075, 0.30]
    assert batch["cost_usd"] == pytest.approx(live["cost_usd"] / 2) and batch["live_cost_usd"] == live["cost_usd"]


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_errored_and_expired_rows_are_retried_in_a_new_batch(server, tmp_path, provider):
    prompts = rows(12)
    server.batch_faults["Spell out the number 4823"] = ["500", 1]  # errors once
    server.batch_faults["ok 7"] = ["expired", 1]  # expires once
    server.batch_faults["set 5"] = ["500", None]  # always errors: ends in the failures file
    server.batch_faults["Tell the long history of item 6"] = ["400", None]  # a bad request: not retried
    c = cfg(server, tmp_path, provider, n=12, retries=2)
    summary = run(c)
    got = read(c.out)
    assert len(got) == 10 and len({r["id"] for r in got}) == 10
    failures = read(tmp_path / "out.failures.jsonl")
    failed = sorted(f["where"] for f in failures)
    assert failed == [f"{tmp_path / 'p.jsonl'}:6", f"{tmp_path / 'p.jsonl'}:7"]
    assert all(f["error"] for f in failures) and summary["failed"] == 2
    sizes = [len(b["requests"]) for b in server.batch.batches.values()]
    # round 1: all 12; round 2: the 500-once, the expired-once and the always-500 row; round 3: the always-500 row
    assert sizes == [12, 3, 1] and server.batch.batch_requests[provider] == 16
    assert prompts[6]["prompt"] in {f["source"].get("prompt") for f in failures}


def test_batch_fallback_live_retries_rows_live(server, tmp_path):
    server.batch_faults["ok 7"] = ["expired", None]
    c = cfg(server, tmp_path, "openai", n=8, batch_fallback="live", teacher="openai:gpt-4o-mini")
    summary = run(c)
    assert len(read(c.out)) == 8 and summary["failed"] == 0 and summary["requests"] == 8
    assert server.count("/v1/chat/completions") == 1 and server.batch.batch_requests["openai"] == 8
    assert server.history[0]["body"]["messages"][-1]["content"] == "ok 7"
    # the 7 batch answers at batch prices, the live one at live prices
    usage = {r["source"].get("prompt"): r["usage"] for r in read(c.out)}
    live = usage.pop("ok 7")
    batch_in, batch_out = sum(u["input_tokens"] for u in usage.values()), sum(u["output_tokens"] for u in usage.values())
    expected = (batch_in * 0.075 + batch_out * 0.30 + live["input_tokens"] * 0.15 + live["output_tokens"] * 0.60) / 1e6
    assert summary["cost_usd"] == pytest.approx(expected)


def test_split_by_request_and_byte_limits(server, tmp_path):
    c = cfg(server, tmp_path, "openai", n=10, batch_max_requests=4)
    assert run(c)["batches"] == 3
    assert [len(b["requests"]) for b in server.batch.batches.values()] == [4, 4, 2]
    # bytes: every uploaded input file stays within the limit, and together they hold every request once
    limit = 2000
    c2 = cfg(server, tmp_path, "openai", n=10, batch_max_bytes=limit, out=tmp_path / "out2.jsonl", temperature=0.5)
    s2 = run(c2)
    inputs = [server.batch.files[b["input_file_id"]] for b in list(server.batch.batches.values())[3:]]
    assert s2["batches"] == len(inputs) >= 2 and all(len(f) <= limit for f in inputs)
    assert sum(len(f.splitlines()) for f in inputs) == 10 and len(read(c2.out)) == 10


def test_split_unit():
    items = [(i, b"x" * size) for i, size in enumerate([5, 5, 5, 20, 1])]
    assert [[i for i, _ in c] for c in split(items, 2, 100)] == [[0, 1], [2, 3], [4]]
    assert [[i for i, _ in c] for c in split(items, 10, 21)] == [[0, 1, 2], [3], [4]]
    with pytest.raises(ImitateError, match="more than the batch limit"):
        split(items, 10, 20)


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, ["collect", *args], env=env)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_no_wait_then_collect_then_cancel_via_cli(server, tmp_path, provider):
    prompts = write_prompts(tmp_path / "p.jsonl", 9)
    out = tmp_path / "out.jsonl"
    base = ["--teacher", f"{provider}:fake", "--prompts", str(prompts), "--out", str(out), "--base-url",
            url(server, provider),
            "--batch", "--batch-max-requests", "5", "--poll-interval", "0.001", "--poll-max", "0.01", "--no-progress"]
    first = invoke(*base, "--no-wait", "--json")
    assert first.exit_code == 0, first.output
    s = json.loads(first.stdout)
    assert s["batches"] == 2 and s["pending"] == 9 and s["completed"] == 0 and not read(out)
    assert "with --batch again to collect them" in first.stderr
    # cancel with nothing but --out: the teacher and server come from the batch log
    cancel = invoke("--out", str(out), "--cancel", "--json")
    assert cancel.exit_code == 0, cancel.output
    assert "cancel requested" in cancel.stderr and all(b["cancelled"] for b in server.batch.batches.values())
    # the next run collects the cancelled batches (nothing ran, nothing billed) and submits their requests anew
    again = invoke(*base, "--json")
    assert again.exit_code == 0, again.output
    assert len(read(out)) == 9 and len({r["id"] for r in read(out)}) == 9
    assert json.loads(again.stdout)["pending"] == 0 and server.batch.batch_requests[provider] == 18


def test_no_wait_then_later_run_collects_without_resubmitting(server, tmp_path):
    c = cfg(server, tmp_path, "openai", n=7, wait=False)
    s = run(c)
    assert s["pending"] == 7 and s["sent"] == 7
    s2 = run(replace(c, wait=True))
    assert s2["sent"] == 0 and s2["completed"] == 7 and len(read(c.out)) == 7
    assert server.batch.batch_requests["openai"] == 7
    s3 = run(c)  # everything is in OUT: nothing to submit
    assert s3["cached"] == 7 and s3["sent"] == 0 and server.batch.batch_requests["openai"] == 7


def test_batch_refused_by_server_is_an_error_and_not_retried_twice(tmp_path):
    from fake_batch import BatchBackend

    class Refusing(BatchBackend):
        def create(self, kind, body):
            return 400, {}, {"error": {"type": "invalid_request_error", "message": "batches are off"}}

    with FakeServer() as server:
        server.batch = Refusing(server)
        with pytest.raises(ImitateError, match="creating a batch failed: BadRequestError.*batches are off"):
            run(cfg(server, tmp_path, "openai", n=3))
        log = BatchLog(tmp_path / "out.batches.jsonl")
        assert [i["state"] for i in log.intents.values()] == ["void"]


def test_batch_usage_errors(server, tmp_path):
    bad = invoke("--teacher", "hf:./x", "--prompts", str(write_prompts(tmp_path / "p.jsonl", 2)), "--out",
                 str(tmp_path / "o.jsonl"), "--batch")
    assert bad.exit_code == 2 and "--batch needs an openai: or anthropic: teacher" in bad.stderr
    bad = invoke("--teacher", "openai:m", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                 "--batch", "--batch-fallback", "never", "--base-url", url(server, "openai"))
    assert bad.exit_code == 2 and "--batch-fallback" in bad.stderr
    bad = invoke("--out", str(tmp_path / "o.jsonl"), "--cancel")
    assert bad.exit_code == 2 and "no batches to cancel" in bad.stderr and "Traceback" not in bad.output


# --- kill -9 at every moment, then a re-run ------------------------------------------------------------------------

N_KILL = 12


def collect_cmd(prompts: Path, out: Path, provider: str, server: FakeServer) -> list[str]:
    return [
        sys.executable, "-m", "imitate", "collect", "--teacher", f"{provider}:fake", "--prompts", str(prompts),
        "--out", str(out), "--base-url", url(server, provider), "--batch", "--batch-max-requests", "5",
        "--poll-interval", "0.001", "--poll-max", "0.01", "--no-progress",
    ]


# moment -> the server event (and which occurrence) at which the client is killed, before the server answers
MOMENTS = {
    "during upload": ("upload", 2),  # 2nd batch: its requests sent, no batch created yet
    "between create and journal write": ("create", 2),  # 2nd batch created (and billed), its id never reaches us
    "while polling": ("retrieve", 2),
    "while downloading": ("results", 2),  # 1st batch's records written, 2nd batch's results in transit
}


@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_kill_9_then_rerun_pays_each_request_once(tmp_path, provider, moment):
    event, nth = MOMENTS[moment]
    prompts = write_prompts(tmp_path / "p.jsonl", N_KILL)
    out = tmp_path / "out.jsonl"
    with FakeServer() as server:
        seen = {"n": 0}
        proc: dict = {}

        def kill_at(name, info):
            if name == event:
                seen["n"] += 1
                if seen["n"] == nth:
                    os.kill(proc["p"].pid, signal.SIGKILL)
                    proc["p"].wait()  # dead before the server answers
                    return "drop" if name == "upload" else None  # an upload cut off: the server stores nothing

        server.on_batch_event = kill_at
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        proc["p"] = subprocess.Popen(collect_cmd(prompts, out, provider, server), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc["p"].wait(timeout=120) == -signal.SIGKILL, proc["p"].stderr.read().decode()
        server.on_batch_event = None
        killed_with = len(read(out))
        log_path = tmp_path / "out.batches.jsonl"
        unjournaled = [i["key"] for i in BatchLog(log_path).intents.values() if i["batch"] is None]
        created_before = list(server.batch.batches)

        summary = run(CollectConfig(
            teacher=f"{provider}:fake", prompts=prompts, out=out, base_url=url(server, provider), batch=True,
            batch_max_requests=5, poll_interval=0.001, poll_max=0.01, progress=False,
        ))
        records = read(out)
        paid = server.batch.batch_requests[provider]
        live_calls = len(server.history)
        after = BatchLog(log_path).intents

    if moment in ("during upload", "between create and journal write"):
        assert len(unjournaled) == 1  # the crash left an intent without a batch id
        (key,) = unjournaled
        if moment == "during upload":  # never created: voided, its requests submitted again
            assert after[key]["state"] == "void" and len(created_before) == 1
        else:  # created: found again by listing and re-attached, not submitted again
            assert after[key]["batch"] == created_before[1] and after[key]["state"] == "done"
    else:
        assert not unjournaled

    assert len(records) == N_KILL and len({r["id"] for r in records}) == N_KILL
    answered = sorted(json.dumps(r["source"], sort_keys=True) for r in records)
    assert answered == sorted(json.dumps(r, sort_keys=True) for r in rows(N_KILL))  # every prompt exactly once
    assert paid == N_KILL, f"{paid} requests submitted in batches for {N_KILL} prompts"
    assert live_calls == 0
    assert summary["cached"] == killed_with
    if moment == "while downloading":
        assert killed_with == 5  # the first batch was collected before the kill


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_transient_errors_on_create_and_polls_neither_stop_nor_pay_twice(server, tmp_path, monkeypatch, provider):
    """A create answered 502 after the batch was made must be found, not created again; failed polls are retried."""
    import functools

    from imitate.collect.limiter import RetryPolicy

    monkeypatch.setattr("imitate.collect.engine.RetryPolicy", functools.partial(RetryPolicy, base=0.001))
    faults = {"create": ["502"], "retrieve": ["500", "503"]}
    server.on_batch_event = lambda name, info: faults.get(name, []).pop(0) if faults.get(name) else None
    summary = run(cfg(server, tmp_path, provider, n=6))
    assert summary["completed"] == 6 and len(read(tmp_path / "out.jsonl")) == 6
    assert len(server.batch.batches) == 1 and server.batch.batch_requests[provider] == 6
    assert faults == {"create": [], "retrieve": []}  # every fault was met


def test_batch_that_fails_validation_lists_its_requests_with_the_error(server, tmp_path):
    server.batch_invalid = "model 'fake-model' is not available for batch"
    with pytest.raises(ImitateError, match="no request succeeded.*not available for batch"):
        run(cfg(server, tmp_path, "openai", n=4))
    failures = read(tmp_path / "out.failures.jsonl")
    assert len(failures) == 4 and all("batch failed: model 'fake-model' is not available" in f["error"] for f in failures)
    assert len(server.batch.batches) == 1  # not resubmitted: it would fail the same way


def test_live_run_never_sends_what_open_batches_hold(server, tmp_path):
    c = cfg(server, tmp_path, "openai", n=6, wait=False, batch_max_requests=4)
    assert run(c)["pending"] == 6
    more = write_prompts(tmp_path / "more.jsonl", 8)  # the same 6 prompts and 2 new ones
    live = run(replace(c, batch=False, prompts=more))
    assert live["sent"] == 2 and live["pending"] == 6 and server.count("/v1/chat/completions") == 2
    done = run(replace(c, wait=True, prompts=more))
    assert done["sent"] == 0 and done["completed"] == 6 and len(read(c.out)) == 8
    assert server.batch.batch_requests["openai"] == 6


def test_progress_shows_each_batch(server, tmp_path):
    r = invoke("--teacher", "openai:fake", "--prompts", str(write_prompts(tmp_path / "p.jsonl", 7)), "--out",
               str(tmp_path / "out.jsonl"), "--base-url", url(server, "openai"), "--batch", "--batch-max-requests", "4",
               "--poll-interval", "0.001", "--poll-max", "0.01")
    assert r.exit_code == 0, r.output
    ids = list(server.batch.batches)
    assert len(ids) == 2 and all(f"batch {b}" in r.stderr for b in ids)
    assert "4/4" in r.stderr and "3/3" in r.stderr and r.stderr.count("collected") == 2
