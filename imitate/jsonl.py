"""Reading JSONL input that may be hostile: huge lines, deep nesting, bad bytes. Every line gives a value or a reason.

`lines(path)` yields (line number, raw bytes) for each line, or (line number, TooLong) for a line longer than
MAX_LINE_BYTES: such a line is skipped over in chunks and never held whole, so a 200 MB line costs at most the limit
in memory. `parse(raw)` returns (value, None) or (None, why): not UTF-8, not JSON, nested too deeply (Python's JSON
parser recurses; a 100 000-deep `[[[[...]]]]` would otherwise end in a RecursionError), or too long. Callers add the
"file:line" and raise InputError or, with `--on-bad-line skip`, count the line and go on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_MAX = "IMITATE_MAX_LINE_MB"


def max_line_bytes() -> int:
    """The longest line read (64 MiB; a record with top-20 log-probs of a 16k-token answer is ~20 MB)."""
    try:
        return max(1, int(float(os.environ.get(ENV_MAX, "64")) * 2**20))
    except ValueError:
        return 64 * 2**20


@dataclass(frozen=True)
class TooLong:
    """A line longer than the limit: its size in bytes (without the newline)."""

    size: int

    def reason(self) -> str:
        return (f"line is {_size(self.size)}, longer than the {_size(max_line_bytes())} limit (not read; "
                f"set {ENV_MAX} to raise it)")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"


def lines(path: str | os.PathLike, limit: int | None = None) -> Iterator[tuple[int, bytes | TooLong]]:
    """(line number, raw line with its newline) for every line, blank ones included; TooLong for an over-long line."""
    limit = limit or max_line_bytes()
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(limit + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) <= limit or raw.endswith(b"\n"):
                yield lineno, raw
                continue
            size = len(raw)
            while True:  # skip the rest of the line without keeping it
                more = fh.readline(1 << 20)
                if not more:
                    break
                size += len(more)
                if more.endswith(b"\n"):
                    size -= 1
                    break
            yield lineno, TooLong(size)


def pick(paths: list, want: dict) -> Iterator[tuple[Any, bytes]]:
    """(want[(file index, line number)], raw line) for the lines `want` names, re-read from `paths` in input order.
    Only lines a first pass already parsed are named, so a TooLong line is never among them."""
    last = {}  # file index -> its last line wanted: the rest of the file, and files with none, are not read
    for fi, lineno in want:
        last[fi] = max(last.get(fi, 0), lineno)
    for fi, path in enumerate(paths):
        if fi not in last:
            continue
        for lineno, raw in lines(path):  # the bad lines a skip passed over are never read whole
            key = want.get((fi, lineno))
            if key is not None:
                yield key, raw
            if lineno >= last[fi]:
                break


_SCAN = json.JSONDecoder().scan_once  # the scanner json.loads runs, without its Python wrappers around it
_JSON_SPACE = " \t\n\r"  # what json skips between tokens


def parse(raw: bytes | str | TooLong) -> tuple[Any, str | None]:
    """(value, None) or (None, why the line is not JSON we can read)."""
    if isinstance(raw, TooLong):
        return None, raw.reason()
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})"
    try:  # fast path: a line that starts with its value and ends with whitespace (the common case) is scanned
        value, end = _SCAN(text, 0)  # directly (~20% less time per line); anything else goes through json.loads,
        if not text[end:].strip(_JSON_SPACE):  # which gives the same value or the error message
            return value, None
    except Exception:  # noqa: BLE001  (StopIteration, JSONDecodeError, RecursionError: json.loads says which)
        pass
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"


def read_text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text without its newline, None) or (line number, None, why) for a plain text file (.txt)."""
    for lineno, raw in lines(Path(path)):
        if isinstance(raw, TooLong):
            yield lineno, None, raw.reason()
            continue
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r\n"), None
        except UnicodeDecodeError as exc:
            yield lineno, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})"
