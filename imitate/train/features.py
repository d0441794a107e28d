"""Feature KD (FitNets, Romero et al. 2015): learned linear maps from chosen student layers to chosen teacher layers.

Layer numbering follows `output_hidden_states=True` of transformers models: hidden_states[0] is the embedding output and
hidden_states[k] the output of block k, so valid layers are 1..n_layers. The regressors train with the student and are
saved beside it (`feature_regressors.safetensors` + `feature_regressors.json`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from imitate.errors import InputError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

WEIGHTS = "feature_regressors.safetensors"
META = "feature_regressors.json"


def parse_pairs(spec: str, n_student_layers: int, n_teacher_layers: int) -> list[tuple[int, int]]:
    """`--feature-kd` value -> [(student layer, teacher layer), ...].

    "auto": every student layer s = 1..n_s is matched to teacher layer round(s · n_t / n_s), spreading the student's depth
    evenly over the teacher's (the last student layer meets the last teacher layer).
    "S:T,S:T": explicit pairs, 1-based block outputs; each must exist in its model.
    """
    spec = spec.strip()
    if spec == "auto":
        return [(s, max(1, int(s * n_teacher_layers / n_student_layers + 0.5))) for s in range(1, n_student_layers + 1)]
    pairs = []
    for item in spec.split(","):
        try:
            s, t = (int(x) for x in item.split(":"))
        except ValueError:
            raise UsageError(
                f"--feature-kd: cannot read {item.strip()!r} as STUDENT_LAYER:TEACHER_LAYER",
                hint="use `auto` or pairs like `--feature-kd 1:2,2:4` (1-based layer numbers)",
            ) from None
        if not (1 <= s <= n_student_layers and 1 <= t <= n_teacher_layers):
            raise UsageError(
                f"--feature-kd: pair {s}:{t} is out of range (student layers 1..{n_student_layers}, "
                f"teacher layers 1..{n_teacher_layers})",
                hint="layer numbers are 1-based block outputs; use `--feature-kd auto` to spread them evenly",
            )
        pairs.append((s, t))
    if len(set(pairs)) != len(pairs):
        raise UsageError(f"--feature-kd: pair listed twice in {spec!r}", hint="list each STUDENT:TEACHER pair once")
    return pairs


def term_name(pair: tuple[int, int]) -> str:
    """The name of one feature pair's loss term in metrics and SCKD logs, e.g. "feature_s1_t2"."""
    return f"feature_s{pair[0]}_t{pair[1]}"


@functools.cache
def _module_class():
    from torch import nn

    class FeatureRegressors(nn.Module):
        """One nn.Linear(student_width, teacher_width) per (student layer, teacher layer) pair."""

        def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int):
            super().__init__()
            self.pairs = [tuple(p) for p in pairs]
            self.student_width, self.teacher_width = student_width, teacher_width
            self.maps = nn.ModuleDict({term_name(p): nn.Linear(student_width, teacher_width) for p in self.pairs})

        def terms(self, student_hidden_states, teacher_hidden_states, mask: torch.Tensor) -> dict[str, tuple]:
            """Per pair, `losses.feature_mse` between mapped student layer S and teacher layer T over `mask`.

            student_hidden_states / teacher_hidden_states: the models' `hidden_states` tuples ([B, L, H] each, index 0
            = embeddings); mask: [B, L] bool (assistant tokens). Returns {term name: (sum, count)}.
            """
            from imitate.train.losses import feature_mse

            return {
                term_name(p): feature_mse(
                    student_hidden_states[p[0]], teacher_hidden_states[p[1]], self.maps[term_name(p)], mask
                )
                for p in self.pairs
            }

        def save(self, directory: str | Path) -> Path:
            from safetensors.torch import save_file

            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(directory / WEIGHTS))
            meta = {"pairs": self.pairs, "student_width": self.student_width, "teacher_width": self.teacher_width}
            (directory / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            return directory / WEIGHTS

    return FeatureRegressors


def __getattr__(name: str):
    """`FeatureRegressors` is built on first access (PEP 562), so importing this module does not import torch."""
    if name == "FeatureRegressors":
        return _module_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_regressors(directory: str | Path):
    """Load regressors saved by `.save(directory)`; raises InputError naming the missing/broken file."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.exists() or not (directory / WEIGHTS).exists():
        raise InputError(f"{directory}: no saved feature regressors ({META} + {WEIGHTS})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        pairs = [tuple(p) for p in meta["pairs"]]
        module = _module_class()(pairs, meta["student_width"], meta["teacher_width"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{meta_path}: not a feature regressor description ({exc})") from None
    module.load_state_dict(load_file(str(directory / WEIGHTS)))
    return module
