"""Quiet by default: stderr carries imitate's own progress bar and messages, not its dependencies' chatter.

Without `--verbose` (or `IMITATE_LOG=debug`), every imitate command starts with `quiet()`, which turns off
transformers' and huggingface_hub's progress bars ("Loading weights", "Writing model shards"), Python warnings
(deprecations, FutureWarnings such as transformers' `is_gradient_checkpointing`) and library log records below ERROR
(accelerate, peft, datasets, httpx...). It works through environment variables, read when those packages are first
imported (they are imported later, inside the stage) and inherited by the processes a command starts (torchrun ranks,
clean's workers), and through the packages' own switches when one is already imported (tests, `imitate run`).
A variable the user set (e.g. TRANSFORMERS_VERBOSITY=info) is left as it is.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

ENV = "IMITATE_LOG"

# read by the packages at import: transformers' log level and advisory warnings, the hub's (and so transformers')
# progress bars, datasets' progress bars
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def is_verbose() -> bool:
    """True when dependencies may talk: `--verbose` was given (it sets IMITATE_LOG) or IMITATE_LOG=debug."""
    return os.environ.get(ENV, "").strip().lower() == "debug"


def quiet(verbose: bool = False) -> None:
    """Silence dependencies on stderr for this process and the ones it starts, unless `verbose` or IMITATE_LOG=debug."""
    if verbose:
        os.environ[ENV] = "debug"  # ranks started by torchrun / accelerate launch run the CLI again and see it
    if is_verbose():
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # Python warnings: PYTHONWARNINGS carries the same filter into child interpreters
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    # log records from libraries that log through the root logger's last-resort handler (accelerate, peft, httpx...)
    logging.getLogger().setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # already imported: the env variables came too late for it
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
