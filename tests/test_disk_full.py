"""A full disk while collecting: a clear error with what was kept, a file that ends with a whole record, and a re-run
(after space is freed) that finishes with no duplicate and no record lost. The disk is simulated by an os.write that
fails with ENOSPC after N bytes to OUT; where the test may mount a tmpfs (root), a real 64 KB one is used as well."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate.cli import app
from imitate.collect import journal as journal_mod

N = 120


def _prompts(tmp_path: Path, n: int = N) -> Path:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"disk question {i}"}) + "\n" for i in range(n)))
    return p


def _argv(prompts: Path, out: Path, server: FakeServer) -> list[str]:
    return ["collect", "--teacher", "openai:m", "--prompts", str(prompts), "--out", str(out),
            "--base-url", server.base_url + "/v1", "--concurrency", "4", "--no-progress"]


class TinyDisk:
    """os.write for OUT's descriptors that has room for `room` bytes, then fails like a full disk."""

    def __init__(self, out: Path, room: int):
        self.out, self.room, self.real = str(out), room, os.write

    def __call__(self, fd: int, data: bytes) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target != self.out:
            return self.real(fd, data)
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.real(fd, bytes(data[: self.room]))  # a short write, as a file system that runs out part way
        self.room -= n
        return n


def _check_after_failure(out: Path, output: str) -> int:
    m = re.search(rf"Error: no space left on device writing {re.escape(str(out))}: (\d+) record\(s\) kept, "
                  r"(\d+) request\(s\) were in flight and will be asked again", output)
    assert m, output
    assert "Hint: free space, then run the same command" in output and "Traceback" not in output
    data = out.read_bytes()
    assert data.endswith(b"\n"), "the file must end with a complete line"
    kept = [json.loads(ln) for ln in data.decode().splitlines()]
    assert int(m.group(1)) == len(kept)
    return len(kept)


def _check_complete(out: Path, n: int = N) -> None:
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(records) == n, "a record was lost or duplicated"
    assert len({r["id"] for r in records}) == n, "duplicate records"
    assert {r["source"]["prompt"] for r in records} == {f"disk question {i}" for i in range(n)}


def test_collect_on_a_full_disk_keeps_whole_records_and_resumes(tmp_path, monkeypatch):
    prompts, out = _prompts(tmp_path), tmp_path / "records.jsonl"
    with FakeServer(latency=0.005) as server:
        disk = TinyDisk(out, room=9000)  # about 25 records
        monkeypatch.setattr(journal_mod.os, "write", disk)
        res = CliRunner().invoke(app, _argv(prompts, out, server), env={"OPENAI_API_KEY": "x"})
        assert res.exit_code == 1, res.output
        kept = _check_after_failure(out, res.output)
        assert 0 < kept < N
        first = server.count()
        assert first < N, "sending must stop when the disk is full"
        monkeypatch.setattr(journal_mod.os, "write", disk.real)  # space freed
        res = CliRunner().invoke(app, [*_argv(prompts, out, server), "--json"], env={"OPENAI_API_KEY": "x"})
        assert res.exit_code == 0, res.output
        summary = json.loads(res.output[res.output.index("{"):])
        assert summary["cached"] == kept and summary["sent"] == N - kept
    _check_complete(out)


def test_a_read_only_output_fails_before_anything_is_sent(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write read-only files")
    prompts, out = _prompts(tmp_path, 3), tmp_path / "ro" / "records.jsonl"
    out.parent.mkdir()
    out.parent.chmod(0o555)
    try:
        with FakeServer() as server:
            res = CliRunner().invoke(app, _argv(prompts, out, server), env={"OPENAI_API_KEY": "x"})
            assert server.count() == 0
    finally:
        out.parent.chmod(0o755)
    assert res.exit_code == 1 and "permission denied writing" in res.output, res.output
    assert "Traceback" not in res.output


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KB tmpfs (needs root and mount; skipped elsewhere)."""
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_collect_into_a_real_64k_tmpfs(tmp_path, tiny_tmpfs):
    n = 400  # about 150 KB of records: does not fit
    prompts, out = _prompts(tmp_path, n), tiny_tmpfs / "records.jsonl"
    with FakeServer() as server:
        cmd = [sys.executable, "-m", "imitate", *_argv(prompts, out, server)]
        env = {**os.environ, "OPENAI_API_KEY": "x"}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 1, res.stderr
        kept = _check_after_failure(out, res.stderr)
        assert 0 < kept < n
        subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_tmpfs)], check=True)  # space freed
        res = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["cached"] == kept
    _check_complete(out, n)


def test_train_checkpoint_that_cannot_be_written_keeps_the_last_good_one(tiny_model_dir, tmp_path, monkeypatch):
    """The 2nd checkpoint fails part-written (torch's zip writer error on a full disk): clear error, the part-written
    folder is gone, step 2 stays the latest, and --resume after freeing space finishes from it."""
    from accelerate import Accelerator

    from imitate.config import build
    from imitate.errors import ImitateError
    from imitate.train import checkpoint
    from imitate.train.loop import TrainConfig
    from imitate.train.loop import run as train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                     {"role": "assistant", "content": f"{i} {i + 1}"}]}) + "\n"
                            for i in range(24)))
    out = tmp_path / "run"
    opts = dict(data=[str(data)], student=str(tiny_model_dir), out=str(out), batch_size=4, max_steps=6, save_every=2,
                eval_split=0.0, eval_every=0, progress=False)
    real = Accelerator.save_state
    calls = {"n": 0}

    def full_disk(self, output_dir=None, **kw):
        calls["n"] += 1
        result = real(self, output_dir, **kw)
        if calls["n"] == 2:  # written part way, then the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return result

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(ImitateError) as info:
        train(build(TrainConfig, opts))
    msg = info.value.message
    assert msg.startswith(f"no space left on device writing {out / 'checkpoints' / 'step-00000004'}: ")
    assert "the last complete checkpoint is kept" in msg and "step-00000002" in msg
    assert "--resume" in info.value.hint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert checkpoint.latest(out).name == "step-00000002"

    monkeypatch.setattr(Accelerator, "save_state", real)  # space freed
    summary = train(build(TrainConfig, {**opts, "resume": True}))
    assert summary["start_step"] == 2 and summary["steps"] == 6


def test_read_only_file_system_fails_before_anything_is_sent(tmp_path):
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        prompts = _prompts(tmp_path, 3)
        with FakeServer() as server:
            res = CliRunner().invoke(app, _argv(prompts, mnt / "records.jsonl", server), env={"OPENAI_API_KEY": "x"})
            assert server.count() == 0
        recs = tmp_path / "r.jsonl"
        recs.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]}) + "\n")
        res2 = CliRunner().invoke(app, ["clean", str(recs), "--out", str(mnt / "clean.jsonl")])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    for r, name in ((res, "records.jsonl"), (res2, "clean.jsonl")):
        assert r.exit_code == 1, r.output
        assert f"Error: read-only file system writing {mnt / name}: nothing was written" in r.output, r.output
        assert "Traceback" not in r.output


def test_clean_on_a_full_disk_leaves_its_outputs_as_they_were(tmp_path, monkeypatch):
    import builtins

    from imitate.clean import stage as clean_stage

    recs = tmp_path / "r.jsonl"
    recs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"answer {i} " * 20}]}) + "\n"
                            for i in range(200)))
    out, removed = tmp_path / "clean.jsonl", tmp_path / "removed.jsonl"
    out.write_text("the previous run's output\n")
    real_open = builtins.open

    class Full:
        def __init__(self, fh, room):
            self.fh, self.room = fh, room

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out) + ".tmp")
            self.room -= len(data)
            return self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def tiny_open(path, mode="r", *a, **kw):
        fh = real_open(path, mode, *a, **kw)
        return Full(fh, 5000) if str(path).endswith(".tmp") and "w" in mode else fh

    monkeypatch.setattr(clean_stage, "open", tiny_open, raising=False)
    argv = ["clean", str(recs), "--out", str(out), "--removed", str(removed)]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 1, res.output
    assert f"Error: no space left on device writing {out}.tmp: {out} and {removed} are left as they were" \
        in res.output.replace("\n", " "), res.output
    assert out.read_text() == "the previous run's output\n" and not removed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "r.jsonl"], "temporary files left behind"
    monkeypatch.setattr(clean_stage, "open", real_open, raising=False)  # space freed
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 200
