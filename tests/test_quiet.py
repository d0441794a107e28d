"""Quiet by default: a train and an eval through the real CLI (subprocesses) leave only imitate's own lines on stderr;
`--verbose` and IMITATE_LOG=debug let the dependencies' bars and warnings through."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# every line `imitate train --no-progress` and `imitate eval` write on stderr (imitate/train/loop.py, evaluate.py)
OURS = [
    r"trained \d+ step\(s\): train loss [\d.]+, eval loss [\d.]+, [\d.]+ tokens/s -> \S+",
    r"student [━╸╺ ]+ \d+/\d+( [\d:-]+)*",  # eval's own progress bar (rich), its last state
    r"eval: \d+ prompts, score [\d.]+ \(exact vs teacher\)",
    r"  agreement with teacher [\d.]+, loss on teacher answers [\d.]+ nats/token",
    r"  ROUGE-L vs teacher [\d.]+",
    r"  \d+ answers hit --max-tokens",
]


def foreign(stderr: str) -> list[str]:
    """The stderr lines that are not imitate's own."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not any(re.fullmatch(p, ln.rstrip()) for p in OURS)]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    words = "one two three four five six".split()
    rows = [{"messages": [{"role": "user", "content": f"Count to {k} in words."},
                          {"role": "assistant", "content": " ".join(words[:k])}]} for k in range(1, 7)]  # fmt: skip
    p = tmp_path_factory.mktemp("quiet") / "records.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def imitate(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("IMITATE_LOG", "PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS",
                         "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")}  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])
    base.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([repo, base.get("PYTHONPATH", "")])})
    cmd = [sys.executable, "-m", "imitate", *map(str, args)]
    proc = subprocess.run(cmd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_and_eval_print_only_their_own_lines(tmp_path, records, tiny_model_dir):
    out = tmp_path / "run"

    def train(out: Path) -> list:
        return ["train", "--data", records, "--student", tiny_model_dir, "--out", out, "--max-steps", "2",
                "--batch-size", "2", "--lora-r", "4", "--no-progress"]  # fmt: skip

    evaluate = ["eval", "--model", out, "--prompts", records, "--max-tokens", "4"]
    for args in (train(out), evaluate):
        err = imitate(*args).stderr
        assert err.strip() and foreign(err) == [], err  # something was said, and all of it by imitate
    # the same commands, verbose: the dependencies speak (transformers' weight-loading bar, its FutureWarning...),
    # so the quiet runs above are quiet because of the switch, not because nothing had anything to say
    loud = imitate("--verbose", *evaluate).stderr
    assert foreign(loud), loud


def test_imitate_log_debug_is_verbose(monkeypatch):
    """IMITATE_LOG=debug (what --verbose sets for the ranks a command starts) leaves warnings and variables alone."""
    import logging
    import warnings

    from imitate.quiet import QUIET_ENV, quiet

    saved_env, root = dict(os.environ), logging.getLogger()
    saved_level = root.level
    try:
        for name in [*QUIET_ENV, "PYTHONWARNINGS"]:
            os.environ.pop(name, None)
        with warnings.catch_warnings():
            warnings.resetwarnings()
            os.environ["IMITATE_LOG"] = "debug"
            quiet()
            assert warnings.filters == [] and not set(QUIET_ENV) & set(os.environ)
            os.environ["IMITATE_LOG"] = ""
            os.environ["TRANSFORMERS_VERBOSITY"] = "info"  # a user's own setting is kept
            quiet()
            assert warnings.filters[0][0] == "ignore" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
            assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and root.level == logging.ERROR
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        root.setLevel(saved_level)
