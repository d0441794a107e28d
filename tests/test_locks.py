"""One writer per output (imitate/locks.py): a second run on the same output stops before it sends anything, waits with
--wait-lock, and runs on other outputs untouched; a killed holder never leaves a stale lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate import locks
from imitate.cli import app
from imitate.collect.config import CollectConfig
from imitate.collect.stage import run as collect_run

N = 60


def _prompts(tmp_path: Path, n: int = N) -> Path:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"lock question {i}"}) + "\n" for i in range(n)))
    return p


def _collect_cmd(prompts: Path, out: Path, server: FakeServer, *extra: str) -> list[str]:
    return [sys.executable, "-m", "imitate", "collect", "--teacher", "openai:m", "--prompts", str(prompts),
            "--out", str(out), "--base-url", server.base_url + "/v1", "--concurrency", "2", "--no-progress", *extra]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}


def _wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in out.read_text().splitlines()]


def _holds_lock(out: Path, pid: int) -> bool:
    try:
        return json.loads(locks.lock_path(out).read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def test_second_collect_on_the_same_out_stops_before_sending(tmp_path):
    prompts, out = _prompts(tmp_path), tmp_path / "out" / "records.jsonl"
    with FakeServer(latency=0.5) as server:  # 60 prompts, 2 at a time: the first run takes 15 s
        first = subprocess.Popen(_collect_cmd(prompts, out, server), env=_env(), stderr=subprocess.PIPE)
        _wait_for(lambda: _holds_lock(out, first.pid) and server.count() >= 1)  # locked, and sending
        second = subprocess.run(_collect_cmd(prompts, out, server), env=_env(), capture_output=True, text=True,
                                timeout=120)
        assert first.poll() is None, "the first run should still be running"
        first.wait(timeout=120)
        assert first.returncode == 0, first.stderr.read().decode()
        per_prompt = [server.sent_texts().count(f"lock question {i}") for i in range(N)]
    assert second.returncode == 1
    assert f"Error: {out} is being written by another imitate collect (pid {first.pid}, started " in second.stderr
    assert "--wait-lock" in second.stderr and "Traceback" not in second.stderr
    assert per_prompt == [1] * N, "a prompt was sent more than once"
    records = _records(out)
    assert len(records) == N == len({r["id"] for r in records})
    assert not locks.lock_path(out).exists(), "a finished run removes its lock file"


def test_wait_lock_waits_for_the_first_run_then_sends_nothing_again(tmp_path):
    prompts, out = _prompts(tmp_path, 20), tmp_path / "records.jsonl"
    with FakeServer(latency=0.05) as server:
        first = subprocess.Popen(_collect_cmd(prompts, out, server), env=_env(), stderr=subprocess.DEVNULL)
        _wait_for(lambda: server.count() >= 1)
        second = subprocess.run(_collect_cmd(prompts, out, server, "--wait-lock", "120", "--json"), env=_env(),
                                capture_output=True, text=True, timeout=180)
        first.wait(timeout=60)
        assert second.returncode == 0, second.stderr
        assert server.count() == 20
    summary = json.loads(second.stdout)
    assert summary["cached"] == 20 and summary["sent"] == 0


def test_runs_on_different_outputs_do_not_wait_for_each_other(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with locks.hold([a], "collect"):
        with locks.hold([b], "collect"):  # another output: free
            assert locks.lock_path(a).exists() and locks.lock_path(b).exists()
    assert not locks.lock_path(a).exists() and not locks.lock_path(b).exists()


HOLDER = textwrap.dedent("""
    import sys, time
    from imitate import locks
    with locks.hold([sys.argv[1]], "train"):
        print("locked", flush=True)
        time.sleep(600)
""")


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "runs" / "s1"
    proc = _holder(out)
    try:
        with pytest.raises(locks.OutputLocked) as info:
            with locks.hold([out], "train"):
                pass
        assert f"{out} is being written by another imitate train (pid {proc.pid}, started" in info.value.message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert locks.lock_path(out).exists()  # the file is left behind by kill -9, but nothing holds it
    with locks.hold([out], "train"):  # taken at once
        pass


def test_wait_lock_gives_up_after_its_seconds(tmp_path):
    out = tmp_path / "records.jsonl"
    proc = _holder(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(locks.OutputLocked, match=r"\(waited 0.3 s\)"):
            with locks.hold([out], "collect", wait=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
    finally:
        proc.kill()
        proc.wait()


def test_same_thread_nests_other_thread_is_refused(tmp_path):
    import threading

    out = tmp_path / "x.jsonl"
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with locks.hold([out], "clean"):
                pass
        except locks.OutputLocked as exc:
            errors.append(exc)

    with locks.hold([out], "run"):
        with locks.hold([out], "collect"):  # a pipeline's stage inside the pipeline's lock
            pass
        assert locks.lock_path(out).exists(), "the inner release must not drop the outer lock"
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1


def test_collect_holds_its_lock_in_process_too(tmp_path):
    """A second collect from the same process (another thread's lock) is refused before the teacher is built."""
    out = tmp_path / "records.jsonl"
    proc = _holder(out)
    try:
        cfg = CollectConfig(teacher="openai:m", prompts=_prompts(tmp_path, 2), out=out, base_url="http://127.0.0.1:9/v1",
                            progress=False)
        with pytest.raises(locks.OutputLocked):
            collect_run(cfg)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()


def test_every_stage_command_refuses_a_locked_output(tmp_path, tiny_model_dir):
    """clean, train and eval stop at once (exit 1, no traceback) when their output is being written."""
    recs = tmp_path / "r.jsonl"
    recs.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    prompts = _prompts(tmp_path, 1)
    cases = {
        "clean": (tmp_path / "clean.jsonl", ["clean", str(recs), "--out", str(tmp_path / "clean.jsonl")]),
        "train": (tmp_path / "run", ["train", "--data", str(recs), "--student", str(tiny_model_dir), "--out",
                                     str(tmp_path / "run")]),
        "eval": (tmp_path / "ev.jsonl", ["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                         "--out", str(tmp_path / "ev.jsonl")]),
    }
    for stage, (out, argv) in cases.items():
        proc = _holder(out)
        try:
            res = CliRunner().invoke(app, argv)
        finally:
            proc.kill()
            proc.wait()
        assert res.exit_code == 1, (stage, res.output)
        assert f"{out} is being written by another imitate train (pid {proc.pid}" in res.output, (stage, res.output)
        assert not out.exists(), stage


def test_pipeline_locks_every_output_up_front(tmp_path):
    """`imitate run`: a locked eval output stops the pipeline before its first stage (collect) sends anything."""
    prompts = _prompts(tmp_path, 3)
    with FakeServer() as server:
        toml = tmp_path / "p.toml"
        toml.write_text(textwrap.dedent(f"""
            [collect]
            teacher = "openai:m"
            prompts = "{prompts}"
            out = "out/records.jsonl"
            base-url = "{server.base_url}/v1"
            progress = false
            [clean]
            out = "out/clean.jsonl"
        """))
        proc = _holder(tmp_path / "out" / "clean.jsonl")
        try:
            res = CliRunner().invoke(app, ["run", str(toml)], env={"OPENAI_API_KEY": "x"})
        finally:
            proc.kill()
            proc.wait()
        assert res.exit_code == 1, res.output
        assert "out/clean.jsonl is being written by another imitate train" in res.output
        assert server.count() == 0
        res = CliRunner().invoke(app, ["run", str(toml)], env={"OPENAI_API_KEY": "x"})
        assert res.exit_code == 0, res.output
        assert server.count() == 3
