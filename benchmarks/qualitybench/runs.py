"""imitate runs as modes: (built task, seed, output dir) -> trained student directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from .build import Built, cli


def imitate_train(*extra: object) -> Callable[[Built, int, Path], Path]:
    def train(b: Built, seed: int, out: Path) -> Path:
        cfg = b.train_cfg
        cli("train", "--data", b.records, "--student", b.student, "--out", out, "--full", "--lr", cfg["lr"],
            "--batch-size", cfg["batch_size"], "--epochs", cfg["epochs"], "--eval-split", 0, "--save-every", 0,
            "--seed", seed, "--no-progress",
            *[f"hf:{b.teacher}" if x == "TEACHER" else f"hf:{b.weak}" if x == "WEAK" else
              b.task.max_tokens if x == "MAXTOK" else x for x in extra])
        return out

    return train


def after_sft(*extra: object) -> Callable[[Built, int, Path], Path]:
    """Two stages: the `sft` mode's training (into OUT-start), then the same number of steps again from that student
    with `extra` (on-policy from the first step: the student already answers, so no warm-up)."""
    first, second = imitate_train(), imitate_train(*extra, "--on-policy-warmup", 0)

    def train(b: Built, seed: int, out: Path) -> Path:
        # the sft mode's student when it has finished (train_config.json is written last), else a run of its own
        start = out.with_name(f"sft-{seed}")
        if not (start / "train_config.json").exists():
            start = out.with_name(out.name + "-start")
        if not (start / "train_config.json").exists():
            first(b, seed, start)
        return second(dataclasses.replace(b, student=start), seed, out)

    return train


def on_policy(lam: float, *more: object) -> tuple:
    """imitate train flags for on-policy KD with fraction `lam`, answers capped at the task's max tokens."""
    return ("--teacher", "TEACHER", "--on-policy", lam, "--on-policy-max-tokens", "MAXTOK", *more)


def cross_train(records: int, *extra: object) -> Callable[[Built, int, Path], Path]:
    """imitate train of the other-tokenizer student (`Built.xstudent`) on the top-20 (records=20) or top-5 log-prob
    records, with `extra` flags."""
    def train(b: Built, seed: int, out: Path) -> Path:
        assert b.xstudent is not None and b.records_lp is not None
        return imitate_train(*extra)(dataclasses.replace(b, student=b.xstudent, records=b.records_lp[records]), seed,
                                     out)

    return train
