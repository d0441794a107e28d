"""Checkpoints for `imitate train --resume`: OUT/checkpoints/step-00000042/ holds accelerate's state (the weights
that train, optimizer, scheduler, every process's RNG) plus `state.json` (the step reached and the run's fingerprint).

A checkpoint is written to a temporary folder and renamed into place after `state.json`, so a kill during a save
leaves the previous checkpoint as the latest complete one. The data position needs no saving: the batch plan of
every epoch is a pure function of (seed, epoch), so the step number alone says where to continue.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from imitate.errors import UsageError
from imitate.writes import HINTS, failed_write_errno, write_error

STATE = "state.json"


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint (one with state.json), or None."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / STATE).is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def keep_only_trainable(accelerator: Any) -> None:
    """Save and load only parameters that train: a LoRA checkpoint then holds the adapter, not the frozen base model.

    The hooks filter accelerate's list of state dicts by `requires_grad`; loading uses strict=False (see `load`), which
    is safe because the resume test compares the final weights of a resumed run with an uninterrupted one.
    """

    def on_save(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            if i < len(weights):
                names = {n for n, p in model.named_parameters() if p.requires_grad}
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

    accelerator.register_save_state_pre_hook(on_save)


def save(accelerator: Any, out: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoint `step` (every process calls this) and prune all but the newest `keep`.

    A checkpoint that cannot be written (a full disk, a signal) is removed part-written and never replaces the last
    complete one; a failed write is an ImitateError naming that checkpoint."""
    last = latest(out)
    try:
        return _save(accelerator, out, step, state, keep)
    except BaseException as exc:
        if accelerator.is_main_process:
            shutil.rmtree(checkpoint_dir(out) / f"step-{step:08d}.tmp", ignore_errors=True)  # frees its space
        code = failed_write_errno(exc)
        if code is None:
            raise
        kept = f"the last complete checkpoint is kept ({last or 'none yet'})"
        hint = HINTS[code].replace("run the same command", "run the same command with --resume")
        raise write_error(OSError(code, os.strerror(code)), checkpoint_dir(out) / f"step-{step:08d}", kept,
                          hint=hint) from None


def _save(accelerator: Any, out: Path, step: int, state: dict, keep: int) -> Path:
    root = checkpoint_dir(out)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Any, path: Path, fingerprint: dict) -> dict:
    """Restore a checkpoint into the prepared objects; refuse one written by a run with other data or settings."""
    state = json.loads((path / STATE).read_text())
    old = state.get("fingerprint", {})
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if changed:
        raise UsageError(
            f"{path} was written by a run with other settings ({', '.join(changed)}); resuming would not continue it",
            hint="resume with the same options, or write to a new --out",
        )
    accelerator.load_state(str(path), strict=False)
    return state
