"""Failed writes as user errors: a full disk, a read-only file system, no permission, a quota.

Every stage writes its outputs so that a failed write keeps the last complete state (collect's journal keeps whole
lines, clean and eval replace their files by rename, train keeps its last complete checkpoint); these helpers turn the
OSError into `Error: no space left on device writing PATH: <what was kept>` + `Hint: free space, then run the same
command`, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from imitate.errors import ImitateError

# errno -> what to do about it
HINTS = {
    errno.ENOSPC: "free space, then run the same command",
    errno.EDQUOT: "free space under your quota (or raise it), then run the same command",
    errno.EFBIG: "the file system limits the file size: write to another file system, then run the same command",
    errno.EROFS: "the file system is read-only: write to another place (--out), or remount it writable",
    errno.EACCES: "you may not write there: fix the permissions or write to another place (--out)",
    errno.EPERM: "you may not write there: fix the permissions or write to another place (--out)",
    errno.EIO: "the disk reported an I/O error: check it, then run the same command",
}


def is_write_failure(exc: BaseException) -> bool:
    """An OSError the user fixes on their side (space, permissions, a read-only mount), not a bug."""
    return isinstance(exc, OSError) and exc.errno in HINTS


# How libraries that wrap the OS error word it (torch's zip writer, safetensors' Rust IoError): message -> errno
_LIBRARY_WORDS = {"no space left": errno.ENOSPC, "storagefull": errno.ENOSPC, "disk quota": errno.EDQUOT,
                  "read-only file system": errno.EROFS, "permission denied": errno.EACCES,
                  "file write failed": errno.ENOSPC}


def failed_write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write, also when a library (torch.save, safetensors) re-raised it as its own error."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in HINTS else None
    if isinstance(exc, (RuntimeError, ValueError)) or type(exc).__name__ == "SafetensorError":
        text = str(exc).lower()
        return next((code for words, code in _LIBRARY_WORDS.items() if words in text), None)
    return None


def reason(exc: OSError) -> str:
    """'no space left on device' (the OS's words, lower-cased)."""
    text = exc.strerror or os.strerror(exc.errno or 0) or type(exc).__name__
    return text[:1].lower() + text[1:]


def write_error(exc: OSError, path: str | os.PathLike | None, kept: str, hint: str | None = None) -> ImitateError:
    """ImitateError 'REASON writing PATH: KEPT' with the hint for the errno."""
    where = path if path is not None else exc.filename
    err = ImitateError(f"{reason(exc)} writing {where}: {kept}",
                       hint=hint or HINTS.get(exc.errno or 0, "check the disk, then run the same command"))
    err.errno = exc.errno  # type: ignore[attr-defined]
    return err


@contextlib.contextmanager
def failed_writes(kept: str, path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a failed write inside the block into `write_error` (other errors pass through unchanged)."""
    try:
        yield
    except OSError as exc:
        if not is_write_failure(exc):
            raise
        raise write_error(exc, path, kept) from None


def remove_quietly(*paths: str | os.PathLike | None) -> None:
    """Remove temporary files a failed write left (they only take the space the user has to free)."""
    for p in paths:
        if p is not None:
            with contextlib.suppress(OSError):
                Path(p).unlink()
