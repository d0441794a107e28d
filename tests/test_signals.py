"""SIGTERM (how CI runners cancel a job) and SIGINT during collect: what arrived is written, what is in flight is
cancelled, the summary so far is printed, exit 143 / 130; a re-run ends with every record once, re-sending at most
the requests that were in flight (<= --concurrency)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_server import FakeServer

N = 120
CONCURRENCY = 4


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_then_rerun(tmp_path, sig):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"signal question {i}"}) + "\n" for i in range(N)))
    out = tmp_path / "out.jsonl"
    with FakeServer(latency=0.1) as server:  # 120 prompts, 4 at a time: 3 s, time to signal it part way
        cmd = [sys.executable, "-m", "imitate", "collect", "--teacher", "openai:m", "--prompts", str(prompts),
               "--out", str(out), "--base-url", server.base_url + "/v1", "--concurrency", str(CONCURRENCY),
               "--no-progress", "--json"]
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while len(_lines(out)) < 20 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, stderr
        name = signal.Signals(sig).name
        assert f"Error: stopped by {name}: " in stderr and "Traceback" not in stderr
        assert "imitate collect" in stderr  # the summary so far
        summary = json.loads(stdout)
        assert summary["stopped_by"] == name
        kept = _lines(out)
        assert out.read_bytes().endswith(b"\n")
        assert 20 <= len(kept) < N and summary["completed"] == len(kept)
        finished = {json.loads(ln)["source"]["prompt"] for ln in kept}
        first = len(server.sent_texts())

        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        sent = server.sent_texts()
    records = [json.loads(ln) for ln in _lines(out)]
    assert len(records) == N and len({r["id"] for r in records}) == N, "lost or duplicated records"
    assert not finished & set(sent[first:]), "a finished request was sent again"
    resent = [p for p in set(sent) if sent.count(p) > 1]
    assert len(resent) <= CONCURRENCY, f"{len(resent)} prompts were sent twice"
    assert json.loads(rerun.stdout)["cached"] == len(kept)


def test_sigterm_during_a_batch_run_keeps_the_batches_recorded(tmp_path):
    """collect --batch stopped by SIGTERM while polling: exit 143; the re-run re-attaches, nothing submitted twice."""
    from imitate.collect.stage import CollectConfig, run

    n = 15
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"batch question {i}"}) + "\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    with FakeServer() as server:
        proc: dict = {}
        seen = {"n": 0}

        def stop_at(name, info):
            if name == "retrieve":
                seen["n"] += 1
                if seen["n"] == 2:
                    proc["p"].send_signal(signal.SIGTERM)
                    proc["p"].wait(timeout=60)  # stopped before the server answers this poll

        server.on_batch_event = stop_at
        cmd = [sys.executable, "-m", "imitate", "collect", "--teacher", "openai:fake", "--prompts", str(prompts),
               "--out", str(out), "--base-url", server.base_url + "/v1", "--batch", "--batch-max-requests", "5",
               "--poll-interval", "0.001", "--poll-max", "0.01", "--no-progress"]
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        proc["p"] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc["p"].wait(timeout=120) == 143, proc["p"].stderr.read()
        stderr = proc["p"].stderr.read()
        assert "Error: stopped by SIGTERM: the batches already submitted stay recorded" in stderr, stderr
        assert "Traceback" not in stderr
        server.on_batch_event = None
        submitted = server.batch.batch_requests["openai"]
        assert 0 < submitted
        run(CollectConfig(teacher="openai:fake", prompts=prompts, out=out, base_url=server.base_url + "/v1",
                          batch=True, batch_max_requests=5, poll_interval=0.001, poll_max=0.01, progress=False))
        paid = server.batch.batch_requests["openai"]
    records = [json.loads(ln) for ln in _lines(out)]
    assert len(records) == n and len({r["id"] for r in records}) == n
    assert paid == n, f"{paid} requests submitted in batches for {n} prompts"


def test_sigterm_in_any_command_runs_cleanup_and_exits_143(tmp_path, monkeypatch):
    """Outside collect's event loop SIGTERM raises like Ctrl-C: `finally` blocks run (clean's temp files go), and the
    CLI exits 143 with one line, no traceback."""
    from typer.testing import CliRunner

    from imitate.clean import stage as clean_stage
    from imitate.cli import app

    recs = tmp_path / "r.jsonl"
    recs.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    real_open = clean_stage.open if hasattr(clean_stage, "open") else open

    def open_then_terminated(path, mode="r", *a, **kw):
        fh = real_open(path, mode, *a, **kw)
        if str(path).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGTERM)  # the job is cancelled while CLEAN.tmp is being written
        return fh

    monkeypatch.setattr(clean_stage, "open", open_then_terminated, raising=False)
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or a handler an earlier test's library put there (Ray's)
    res = CliRunner().invoke(app, ["clean", str(recs), "--out", str(tmp_path / "c.jsonl")])
    assert res.exit_code == 143, res.output
    assert "Stopped by SIGTERM" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"], "temporary files or a partial output left"
    assert signal.getsignal(signal.SIGTERM) is before, "the CLI must restore the SIGTERM handler it found"
