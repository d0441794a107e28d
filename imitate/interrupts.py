"""SIGTERM and SIGINT: stop cleanly, keep what is finished, exit 143 / 130.

CI runners stop a job with SIGTERM (then SIGKILL a few seconds later). Every command turns SIGTERM into `Terminated`,
a KeyboardInterrupt, so the same `finally` blocks run as for Ctrl-C: temporary files are removed, a checkpoint being
written never replaces the last complete one, and the CLI prints one line and exits 128 + the signal number.

`imitate collect` does more (see `on_signals`): the first signal stops sending, cancels what is in flight, writes the
answers that have already arrived, prints the summary so far and exits 143 / 130; a re-run continues. A second signal
ends the process at once (what is already in the journal is kept; the rest is asked again by the next run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

from imitate.errors import ImitateError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so cleanup code runs for both."""

    signum = signal.SIGTERM


class Interrupted(ImitateError):
    """A run stopped by a signal after saving what it had; exit 128 + the signal number. `summary`: its summary."""

    def __init__(self, message: str, signum: int, hint: str | None = None):
        super().__init__(message, hint)
        self.signum = signum
        self.exit_code = 128 + signum
        self.summary: dict | None = None


def exit_code(exc: BaseException) -> int:
    """143 for SIGTERM, 130 for SIGINT / Ctrl-C."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (outside the main thread signals cannot be handled: no-op)."""
    if not _main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated()

    old = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def on_signals(stop: Callable[[int], None]) -> Iterator[None]:
    """In a running event loop: the first SIGINT/SIGTERM calls `stop(signum)`, a second one ends the process."""
    loop = asyncio.get_running_loop()
    if not _main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int) -> None:
        if fired:  # asked twice: stop now, with the signal's own default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        fired.append(signum)
        stop(signum)

    old = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
            if old[sig] is not None:
                signal.signal(sig, old[sig])  # the handlers in place before (the CLI's, asyncio.run's)
