"""Crash safety: a collect run killed with SIGKILL mid-way and re-run ends with exactly one record per request,
and no finished request is sent again (counted at the server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fake_server import FakeServer

from imitate.collect.stage import CollectConfig, run

N = 120


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sigkill_mid_run_then_resume(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"resume question {i}"}) + "\n" for i in range(N)))
    out = tmp_path / "out.jsonl"
    with FakeServer(latency=0.02) as server:
        cmd = [
            sys.executable,
            "-m",
            "imitate",
            "collect",
            "--teacher",
            "openai:m",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--base-url",
            server.base_url + "/v1",
            "--concurrency",
            "4",
            "--no-progress",
        ]
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while len(lines(out)) < 25 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()

        kept = lines(out)
        assert 25 <= len(kept) < N  # killed mid-way
        # whatever the kill left (possibly a torn last line), every complete line is a finished request
        finished = {json.loads(ln)["source"]["prompt"] for ln in kept if ln.endswith("}") and _is_json(ln)}
        first_run_requests = server.count()

        summary = run(
            CollectConfig(
                teacher="openai:m",
                prompts=prompts,
                out=out,
                base_url=server.base_url + "/v1",
                concurrency=4,
                progress=False,
            )
        )
        resent = server.sent_texts()[first_run_requests:]

    records = [json.loads(ln) for ln in lines(out)]
    assert len(records) == N and len({r["id"] for r in records}) == N
    assert {r["source"]["prompt"] for r in records} == {f"resume question {i}" for i in range(N)}
    assert not finished & set(resent), "a finished request was sent again"
    assert len(resent) == N - len(finished) == summary["sent"]
    assert summary["cached"] == len(finished)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False
