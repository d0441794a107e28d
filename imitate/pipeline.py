"""`imitate run PIPELINE.toml`: collect -> clean -> train -> eval from one file, skipping what is already up to date.

The file has one section per stage, with the same option names as the commands (`max-tokens` or `max_tokens`); paths
are relative to the file. A section may hold named sub-tables, each one more run of that stage, e.g. two students:

    [train]                  # options every [train.*] run shares
    student = "students/init"
    [train.sft]
    out = "runs/sft"
    [train.kd]
    out = "runs/kd"
    teacher = "hf:teacher"

Chained defaults keep the file short (an explicit value always wins): clean.inputs = the collect outputs,
train.data = the clean output (or the collect output when there is no [clean]), eval.model = the train output of the
same name (or the only train output), train.student = the [init-student] output when there is one. Before anything
runs, every section is checked (unknown keys and sections are errors with a "did you mean"), every run's config is
built, which checks its values (types, ranges, choices and cross-field rules, see imitate/options.py), and every file
a run reads must exist or be written by an earlier run.

Skipping: after a run succeeds, `OUT.manifest.json` is written beside its output with the options, the content hashes
(sha256) of every input file or directory, the hashes of the outputs, and the stage summary. Next time the run is
skipped when options and input hashes are equal and the outputs are still there unchanged. A changed prompts file
re-runs collect (which itself only sends requests it has no record for), and then whatever its new output feeds.
Options that only change speed or display (SPEED_OPTIONS: progress, workers, concurrency...) are not compared. A run
without an output path (an eval without `out`) always runs; so does a collect run that had failed requests.

One writer per output: every output of the selected runs is locked (imitate/locks.py) before the first run starts, so
an overlapping `imitate run` (or a stage command) on the same files stops at once; `--wait-lock SECONDS` waits.

Exit codes: 0 all selected runs succeeded or were up to date; 1 a run failed (the pipeline stops there); 2 the file is
wrong; 3 an eval gate (`min-score`) failed (the remaining evals still run, so every score gets reported); 4 a collect
run stopped at its budget (`max-cost`; the pipeline stops there, what was collected is kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import os
import re
import sys
import time
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate import locks
from imitate import manifest as mf
from imitate.config import build, check_keys, load_toml, resolve_paths
from imitate.errors import BudgetExceeded, ConfigError, GateFailed, ImitateError, UsageError
from imitate.interrupts import Interrupted

# stage name -> (module, config class), in the order the stages run.
STAGES: dict[str, tuple[str, str]] = {
    "collect": ("imitate.collect.stage", "CollectConfig"),
    "clean": ("imitate.clean.stage", "CleanConfig"),
    "init-student": ("imitate.students", "InitStudentConfig"),  # a student cut from its teacher (optional)
    "train": ("imitate.train.loop", "TrainConfig"),
    "eval": ("imitate.evaluate", "EvalConfig"),
}
# stage -> (option filled from an earlier stage, what it takes): a run without it cannot do anything.
CHAINED = {
    "clean": ("inputs", "the [collect] output"),
    "train": ("data", "the [clean] output (or the [collect] output)"),
    "eval": ("model", "the [train] output of the same name, or the only one"),
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class Run:
    """One run of one stage: `train` for a plain [train] section, `train.kd` for a [train.kd] sub-table."""

    stage: str
    name: str
    cfg: Any
    module: Any
    status: str = "pending"  # pending | ran | skipped | failed | gate_failed | over_budget | not_run | not_selected
    reason: str = ""
    seconds: float = 0.0
    summary: dict | None = None
    error: str | None = None
    manifest: Path | None = field(default=None)

    def report(self) -> dict:
        out = {"stage": self.stage, "name": self.name, "status": self.status, "reason": self.reason}
        out["seconds"] = round(self.seconds, 3)
        out["summary"] = self.summary
        if self.error:
            out["error"] = self.error
        out["manifest"] = str(self.manifest) if self.manifest else None
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------------------------------


def load_stage(stage: str) -> tuple[Any, type]:
    """The stage's module and config class (imported here, so a pipeline without [train] never imports torch)."""
    mod_name, cls_name = STAGES[stage]
    module = importlib.import_module(mod_name)
    return module, getattr(module, cls_name)


def _table_fields(cls: type) -> set[str]:
    """Fields whose value may be a TOML table (dict-typed), so [stage.NAME] with such a NAME is that option."""
    hints = typing.get_type_hints(cls)

    def takes_dict(tp: Any) -> bool:
        if tp is Any or tp is dict or typing.get_origin(tp) is dict:
            return True
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # dict[str, int] | None
            return any(takes_dict(a) for a in typing.get_args(tp))
        return False

    return {f.name for f in dataclasses.fields(cls) if takes_dict(hints.get(f.name, Any))}


def _split_section(stage: str, section: Any, cls: type, where: str) -> tuple[dict, dict[str, dict]]:
    """(shared options, {run name: its own options}) of one section; a sub-table is a run unless it is the value of
    a table-typed option (clean's `min-chars = {assistant = 20}`): [eval.teacher] is a run named teacher."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: '{stage}' must be a table ([{stage}])")
    table_fields = _table_fields(cls)
    shared: dict[str, Any] = {}
    runs: dict[str, dict] = {}
    for key, value in section.items():
        if isinstance(value, dict) and key.replace("-", "_") not in table_fields:
            if not _NAME_RE.match(key):
                raise ConfigError(f"{where} [{stage}.{key}]: a run name may use letters, digits, '-' and '_' only")
            runs[key] = value
        else:
            shared[key] = value
    return check_keys(cls, shared, f"{where} [{stage}]"), runs


def _chain(stage: str, name: str, opts: dict, outs: dict[str, dict[str, Any]], file: Path) -> dict:
    """Fill the chained defaults (clean.inputs, train.data, eval.model) from the earlier stages' outputs."""

    def upstream(stage_name: str) -> Any:
        runs = outs.get(stage_name, {})
        if name in runs:
            return runs[name]
        if len(runs) == 1:
            return next(iter(runs.values()))
        return None

    opts = dict(opts)
    if stage == "clean" and not opts.get("inputs") and outs.get("collect"):
        opts["inputs"] = [v for v in outs["collect"].values() if v is not None]
    elif stage == "train" and opts.get("data") is None:
        opts["data"] = upstream("clean") if outs.get("clean") else upstream("collect")
    elif stage == "eval" and opts.get("model") is None:
        opts["model"] = upstream("train")
    if stage == "train" and opts.get("student") is None and upstream("init-student") is not None:
        opts["student"] = str(upstream("init-student"))  # the student [init-student] cut
    key, source = CHAINED.get(stage, (None, ""))
    if key and not opts.get(key):
        where = f"[{stage}.{name}]" if name != stage else f"[{stage}]"
        raise ConfigError(
            f"{file} {where}: missing required option(s): --{key}",
            hint=f"set {key} = ... in {where}, or add the earlier stage's section so it can take {source}",
        )
    return {k: v for k, v in opts.items() if v is not None}


def load_pipeline(path: str | Path) -> list[Run]:
    """Parse and check the whole pipeline file (every section builds its checked config); returns its runs in order.
    Nothing runs and no weights load here; `check_inputs` then checks the files the runs read."""
    path = Path(path)
    data = load_toml(path)
    base = path.resolve().parent
    for key, value in data.items():
        if key not in STAGES:
            close = difflib.get_close_matches(key, list(STAGES), n=1, cutoff=0.5)
            kind = "section" if isinstance(value, dict) else "key"
            raise ConfigError(
                f"{path}: unknown {kind} '{key}'",
                hint=f"did you mean '[{close[0]}]'?" if close else f"sections: {', '.join(f'[{s}]' for s in STAGES)}",
            )
    if not data:
        raise ConfigError(f"{path}: no stages", hint=f"add at least one of {', '.join(f'[{s}]' for s in STAGES)}")
    runs: list[Run] = []
    outs: dict[str, dict[str, Any]] = {}  # stage -> run name -> its `out`
    for stage in STAGES:
        if stage not in data:
            continue
        module, cls = load_stage(stage)
        shared, named = _split_section(stage, data[stage], cls, str(path))
        variants = named or {stage: {}}
        for vname, own in variants.items():
            name = stage if not named else f"{stage}.{vname}"
            where = f"{path} [{name}]"
            layer = {**shared, **check_keys(cls, own, where)}
            layer = resolve_paths(cls, layer, base)
            layer = _chain(stage, vname, layer, outs, path)
            cfg = build(cls, layer, where=where)
            outs.setdefault(stage, {})[vname] = getattr(cfg, "out", None)
            runs.append(Run(stage=stage, name=name, cfg=cfg, module=module))
    return runs


def input_paths(cfg: Any) -> dict[str, list[Path]]:
    """Field -> the local files a run reads: its input fields (opt(input=True)) and local model references."""
    from imitate.config import MODEL_FIELDS
    from imitate.models import local_path
    from imitate.options import INPUT_MARK

    found: dict[str, list[Path]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if f.metadata.get(INPUT_MARK):
            found[f.name] = [Path(v) for v in values if v is not None]
        elif f.name in MODEL_FIELDS:
            found[f.name] = [p for v in values if v and (p := local_path(str(v), bare=f.name != "teacher"))]
    return found


def check_inputs(runs: list[Run], file: Path) -> None:
    """Every file a run reads exists now or is written by an earlier run of the file: checked before anything runs,
    so a missing eval set or refusal list stops the pipeline before collect spends anything."""
    written: set[str] = set()
    for r in runs:
        for name, paths in input_paths(r.cfg).items():
            for p in paths:
                if p.exists() or os.path.normpath(p) in written:
                    continue
                raise ConfigError(
                    f"{file} [{r.name}]: {name.replace('_', '-')}: {p} does not exist",
                    hint="fix the path (relative paths start from the pipeline file's directory), or add the stage "
                    "that writes it",
                )
        for name in mf.OUTPUT_FIELDS:
            if getattr(r.cfg, name, None) is not None:
                written.add(os.path.normpath(getattr(r.cfg, name)))


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


def select(runs: list[Run], only: str | None, from_: str | None) -> list[Run]:
    """The runs --only / --from pick (a stage, e.g. 'train', or one run, e.g. 'train.kd')."""
    if only and from_:
        raise UsageError("--only and --from cannot be combined", hint="use one of them")
    pick = only or from_
    if not pick:
        return runs
    names = [r.name for r in runs]
    stages = list(dict.fromkeys(r.stage for r in runs))
    if pick not in names and pick not in stages:
        known = list(dict.fromkeys(stages + names))
        close = difflib.get_close_matches(pick, known, n=1, cutoff=0.5)
        flag = "--only" if only else "--from"
        raise UsageError(
            f"{flag} {pick}: no such stage or run in this pipeline",
            hint=(f"did you mean '{close[0]}'? " if close else "") + "choose from " + ", ".join(known),
        )
    if only:
        return [r for r in runs if pick in (r.name, r.stage)]
    first = next(i for i, r in enumerate(runs) if pick in (r.name, r.stage))
    return runs[first:]


def _unfinished(summary: Any) -> str | None:
    """Why a successful run must not be recorded as up to date (so the next run does it again), or None."""
    if not isinstance(summary, dict):
        return None
    if summary.get("dry_run"):
        return "a dry run"
    failed = summary.get("failed")
    if isinstance(failed, int) and not isinstance(failed, bool) and failed > 0:
        return f"{failed} request(s) failed; the next run retries them"
    pending = summary.get("pending")
    if isinstance(pending, int) and not isinstance(pending, bool) and pending > 0:
        return f"{pending} request(s) still in provider batches; the next run collects them"
    return None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def execute(run: Run, force: bool, quiet_stdout: bool) -> None:
    """Run (or skip) one run, setting its status; a failure is recorded on the run, never raised."""
    run.manifest = mf.path_for(run.cfg)
    # no manifest to compare with or write (an eval without `out`): hashing its inputs (a model's weights) is wasted
    inputs = mf.input_hashes(run.cfg) if run.manifest is not None else {}
    reason = "forced (--force)" if force else mf.stale_reason(run.cfg, run.manifest, inputs)
    if reason is None:
        old = mf.read(run.manifest) or {}
        run.status, run.reason, run.summary = "skipped", "up to date", old.get("summary")
        _log(f"== {run.name}: up to date, skipped")
        return
    run.reason = reason
    _log(f"== {run.name}: running ({reason})")
    if run.manifest is not None and run.manifest.exists():
        run.manifest.unlink()  # a crash part way must not leave an old manifest vouching for a half-written output
    t0 = time.perf_counter()
    redirect = contextlib.redirect_stdout(sys.stderr) if quiet_stdout else contextlib.nullcontext()
    try:
        with redirect:
            run.summary = run.module.run(run.cfg)
    except GateFailed as exc:
        run.status, run.error = "gate_failed", exc.message
        run.summary = getattr(exc, "summary", None)
    except Interrupted:  # SIGTERM / SIGINT: the stage kept what it had; the whole pipeline stops (exit 143 / 130)
        raise
    except BudgetExceeded as exc:  # collect's --max-cost: stop the pipeline, keep what was collected
        run.status, run.error = "over_budget", exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        run.summary = getattr(exc, "summary", None)
    except ImitateError as exc:
        run.status, run.error = "failed", exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    except Exception as exc:  # noqa: BLE001 -- a bug or a library error: keep the traceback for the report, stop the pipeline
        traceback.print_exc(file=sys.stderr)
        run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
    else:
        run.status = "ran"
    run.seconds = time.perf_counter() - t0
    unfinished = _unfinished(run.summary) if run.status == "ran" else None
    if unfinished:
        run.reason += f"; not recorded as up to date: {unfinished}"
        _log(f"== {run.name}: {unfinished}")
    elif run.status == "ran" and run.manifest is not None:
        # the hashes read before the run: an input edited meanwhile makes the next run run again
        mf.write(
            run.manifest,
            run.cfg,
            inputs,
            stage=run.stage,
            name=run.name,
            seconds=round(run.seconds, 3),
            summary=run.summary,
        )
    if run.error:
        _log(f"== {run.name}: {run.status.replace('_', ' ')}: {run.error}")


def run_pipeline(
    path: str | Path,
    *,
    only: str | None = None,
    from_: str | None = None,
    force: bool = False,
    quiet_stdout: bool = False,
    wait_lock: float = 0.0,
) -> dict:
    """Run the pipeline file; returns {"pipeline", "exit_code", "runs": [per-run report]}. Config errors raise.

    quiet_stdout: send whatever the stages print to stderr, so stdout carries only the caller's JSON.
    wait_lock: seconds to wait for another imitate process writing one of the outputs (imitate.locks).
    """
    runs = load_pipeline(path)
    check_inputs(runs, Path(path))  # a missing eval set or refusal list fails now, not after collect has spent
    chosen = select(runs, only, from_)
    chosen_ids = {id(r) for r in chosen}
    for r in runs:
        if id(r) not in chosen_ids:
            r.status = "not_selected"
    t0 = time.perf_counter()
    stopped = False
    # one writer per output: every output of the selected runs is locked before the first run starts
    wait = max([wait_lock, *(float(getattr(r.cfg, "wait_lock", 0.0) or 0.0) for r in chosen)])
    with locks.hold([p for r in chosen for p in locks.outputs_of(r.cfg)], "run", wait):
        for r in chosen:
            if stopped:
                r.status = "not_run"
                continue
            execute(r, force, quiet_stdout)
            stopped = r.status in ("failed", "over_budget")
    if any(r.status == "failed" for r in runs):
        code = 1
    elif any(r.status == "over_budget" for r in runs):
        code = BudgetExceeded.exit_code
    elif any(r.status == "gate_failed" for r in runs):
        code = 3
    else:
        code = 0
    return {
        "pipeline": str(path),
        "exit_code": code,
        "seconds": round(time.perf_counter() - t0, 3),
        "runs": [r.report() for r in runs],
    }
