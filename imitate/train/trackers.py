"""Experiment trackers for `imitate train --report-to tensorboard|wandb|mlflow|trackio` (comma-separated for several),
through accelerate's trackers: the run's options as hyperparameters, then every row metrics.jsonl gets (loss, lr,
tokens/s, grad norm, KD terms, SCKD cosines and gates, eval loss), at its step, rank 0 only.

TensorBoard event files go to OUT/trackers/OUT_NAME/; wandb, mlflow and trackio use their own settings (WANDB_PROJECT,
MLFLOW_TRACKING_URI, ...) with the run named after OUT. Each is an optional package, checked before any weights load.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from imitate.config import to_dict
from imitate.errors import UsageError

# tracker -> (module that must be importable, pip package)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


def names(cfg: Any) -> list[str]:
    """The trackers --report-to asks for (checked: known names, packages installed); [] for none."""
    if not cfg.report_to or cfg.report_to == "none":
        return []
    chosen = [n.strip() for n in cfg.report_to.split(",") if n.strip()]
    for n in chosen:
        if n not in TRACKERS:
            raise UsageError(f"--report-to {cfg.report_to}: unknown tracker {n!r}",
                             hint=f"one or more of {', '.join(TRACKERS)}, comma-separated")
        module, package = TRACKERS[n]
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"--report-to {n}: the {package} package is not installed",
                             hint=f"pip install {package}" + ("  (or: pip install 'imitate[tensorboard]')"
                                                              if n == "tensorboard" else ""))
    return chosen


def accelerator_kwargs(cfg: Any) -> dict:
    """Keyword arguments for `Accelerator(...)`: the trackers and where TensorBoard writes."""
    chosen = names(cfg)
    return {"log_with": chosen, "project_dir": str(Path(cfg.out) / "trackers")} if chosen else {}


def start(accelerator: Any, cfg: Any) -> None:
    """Open the run in every tracker, with the options as hyperparameters (scalars; lists and paths as text)."""
    if not names(cfg):
        return
    hparams = {k: (v if isinstance(v, (bool, int, float, str)) or v is None else str(v))
               for k, v in to_dict(cfg).items()}
    hparams = {k: ("none" if v is None else v) for k, v in hparams.items()}  # TensorBoard's hparams take no None
    accelerator.init_trackers(Path(cfg.out).name, config=hparams)


def log(accelerator: Any, row: dict) -> None:
    """One metrics.jsonl row to the trackers: its numbers (flattened one level: sckd cosines per term), at its step."""
    if not getattr(accelerator, "trackers", None):
        return
    values: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                    values[f"{k}/{kk}"] = vv
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            values[k] = v
        elif isinstance(v, bool):
            values[k] = float(v)
    accelerator.log(values, step=int(row["step"]))


def end(accelerator: Any) -> None:
    if getattr(accelerator, "trackers", None):
        accelerator.end_training()
