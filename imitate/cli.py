"""The `imitate` command line: turns flags (+ an optional TOML config) into a stage config and calls the stage.

No logic lives here. Heavy packages (torch, transformers, SDKs) are imported inside the stages, so `--help` is instant.
Every option defaults to None so that only flags actually given override the config file and the stage defaults.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from imitate.errors import ImitateError

app = typer.Typer(
    name="imitate",
    help="Distill a large teacher model into a small student by imitation: collect -> clean -> train (-> eval).\n\n"
    "Example: imitate run examples/demo.toml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def print_error(exc: ImitateError) -> None:
    typer.echo(f"Error: {exc.message}", err=True)
    if exc.hint:
        typer.echo(f"Hint: {exc.hint}", err=True)


@contextmanager
def handle_errors() -> Iterator[None]:
    """Print ImitateError as `Error:`/`Hint:` on stderr and exit with its code; never a traceback."""
    try:
        yield
    except ImitateError as exc:
        print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted; finished work is kept, re-run the same command to resume.", err=True)
        raise typer.Exit(130) from None


def stage_config(cls: type, config: Optional[Path], section: str, flags: dict[str, Any]) -> Any:
    """Build a stage config: defaults < the [section] of --config (paths relative to that file) < flags given."""
    from imitate.config import build, check_keys, load_toml, resolve_paths

    if config is None:
        return build(cls, flags)
    data = load_toml(config)
    file_layer = data.get(section, {})
    where = f"{config} [{section}]"
    file_layer = resolve_paths(cls, check_keys(cls, file_layer, where), Path(config).resolve().parent)
    return build(cls, file_layer, flags, where=where)


def emit(summary: dict, as_json: bool) -> None:
    """Results on stdout: one JSON object with --json, else the human summary the stage already printed."""
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# collect  (issue: collect)
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# clean  (issue: clean)
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# train  (issue: train / distillation)
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# eval and run  (issue: pipeline)
# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
