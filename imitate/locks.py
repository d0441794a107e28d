"""One writer per output: an exclusive advisory lock on a lock file beside each output a stage writes.

`out/records.jsonl` is guarded by `out/.records.jsonl.lock` (a directory output such as `runs/s1` by `runs/.s1.lock`).
The lock is `fcntl.flock` on that file: the operating system drops it when the process ends in any way, `kill -9`
included, so a lock is never stale; the file is removed on a clean release and only names the holder (pid, stage,
start time) for the error message the next writer sees. Nothing reads or writes an output before its lock is taken,
so a second run on the same output stops before it sends a request or loads a weight.

A process may take a lock it already holds (a pipeline locks every output up front, then each stage locks its own):
the inner take is a no-op and the lock goes when the outermost holder lets go. On platforms without `fcntl` (Windows)
locks are not taken.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from imitate.errors import ImitateError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

# Path fields a stage writes (the same set imitate.manifest treats as outputs).
OUTPUT_FIELDS = ("out", "removed", "report", "failures")
POLL_S = 0.2  # how often --wait-lock tries again

_held: dict[str, list[Any]] = {}  # lock file -> [fd, thread id, depth], this process's locks
_guard = threading.Lock()


class OutputLocked(ImitateError):
    """Another process (or another thread of this one) is writing the output."""


def wait_lock_opt() -> Any:
    """The `--wait-lock SECONDS` field every writing stage's config carries."""
    from imitate.options import opt

    return opt(0.0, "Seconds to wait when another imitate run is writing the same output (its lock is held); 0: "
               "stop at once with an error naming that run.", example="600", ge=0)


def lock_path(output: str | os.PathLike) -> Path:
    """out/records.jsonl -> out/.records.jsonl.lock"""
    p = Path(os.path.abspath(output))
    return p.with_name(f".{p.name}.lock")


def outputs_of(cfg: Any) -> list[Path]:
    """The outputs a stage config names (its `out`, `removed`, `report`, `failures` fields that are set)."""
    return [Path(v) for name in OUTPUT_FIELDS if (v := getattr(cfg, name, None)) is not None]


def _holder(path: Path) -> str:
    """'imitate collect (pid N, started T)' from a lock file, or a plain 'imitate process' when it cannot be read."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"imitate {info['stage']} (pid {info['pid']}, started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "imitate process"


def _try_lock(path: Path) -> int | None:
    """The fd holding `path` locked, or None when another holder has it. Retries when the file was swapped under us
    (a holder removes it on release: our lock must be on the file that is at `path` now)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _acquire(output: Path, stage: str, wait: float) -> str:
    """Lock one output (or count one more take of a lock this thread holds); returns the key to release."""
    key = str(lock_path(output))
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            if entry[1] != threading.get_ident():
                raise OutputLocked(f"{output} is being written by another imitate {stage} in this process",
                                   hint="run the two on different outputs")
            entry[2] += 1
            return key
    path = Path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        while (fd := _try_lock(path)) is None:
            if time.monotonic() >= deadline:
                waited = f" (waited {wait:g} s)" if wait else ""
                raise OutputLocked(
                    f"{output} is being written by another {_holder(path)}{waited}",
                    hint="wait for that run to finish (or stop it), give --wait-lock SECONDS to wait for it, "
                    "or write to another --out",
                )
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        info = {"pid": os.getpid(), "stage": stage, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "output": str(output)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as exc:  # a read-only directory, no permission, a full disk: nothing has been written yet
        from imitate.writes import write_error

        raise write_error(exc, output, "nothing was written") from None
    with _guard:
        _held[key] = [fd, threading.get_ident(), 1]
    return key


def _release(key: str) -> None:
    with _guard:
        entry = _held[key]
        entry[2] -= 1
        if entry[2]:
            return
        del _held[key]
    with contextlib.suppress(OSError):
        os.unlink(key)  # still locked: a waiter that opened the old file sees it gone and opens the new one
    os.close(entry[0])


@contextlib.contextmanager
def hold(outputs: Iterable[str | os.PathLike], stage: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the locks of `outputs` (in sorted order, so two pipelines waiting on each other cannot deadlock)."""
    if fcntl is None:
        yield
        return
    keys: list[str] = []
    try:
        for _, out in sorted({os.path.abspath(p): Path(p) for p in outputs}.items()):  # errors show paths as given
            keys.append(_acquire(out, stage, wait))
        yield
    finally:
        for key in reversed(keys):
            _release(key)


def hold_outputs(cfg: Any, stage: str, extra: Iterable[str | os.PathLike] = ()) -> contextlib.AbstractContextManager:
    """Lock every output of a stage config (+ `extra`), waiting up to its `wait_lock` seconds for another writer."""
    return hold([*outputs_of(cfg), *extra], stage, float(getattr(cfg, "wait_lock", 0.0) or 0.0))


def locks_outputs(stage: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a stage's `run(cfg, ...)`: its outputs are locked for the whole run, before anything else happens.

    Under a distributed launch (torchrun, accelerate launch) rank 0 alone takes the locks: every rank runs the stage.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if os.environ.get("RANK", "0") not in ("", "0"):
                return fn(cfg, *args, **kwargs)
            with hold_outputs(cfg, stage):
                return fn(cfg, *args, **kwargs)

        return run

    return decorate
