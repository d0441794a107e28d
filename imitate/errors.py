"""User-facing errors. The CLI prints them as `Error: ...` / `Hint: ...` without a traceback."""

from __future__ import annotations


class ImitateError(Exception):
    """An error the user can fix. `hint` names the next step: the flag, env var, file or line to change."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(ImitateError):
    """Bad flags or config values (exit code 2, like a usage error)."""

    exit_code = 2


class InputError(ImitateError):
    """Malformed input data: the message names the file and line."""


class ConfigError(UsageError):
    """A config file or section that does not match the options of a stage."""


class GateFailed(ImitateError):
    """An evaluation gate (--min-score) was not met (exit code 3)."""

    exit_code = 3


class BudgetExceeded(ImitateError):
    """--max-cost would be (or was about to be) passed: nothing more is sent, finished records are kept (exit code 4).
    `summary` holds the run's accounting when the run stopped part way."""

    exit_code = 4
