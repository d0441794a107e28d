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
    with FakeServer(latency=0.03) as server:
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
