"""The journal: an append-only JSONL file whose lines are finished records, durable across `kill -9`.

The output file itself is the journal. Records are appended by one writer task with group commit: every record
ready at that moment goes out in one `os.write` on an O_APPEND descriptor (so a crash leaves at most one torn last
line), then the file is fsynced off the event loop. A record is counted as finished only once its line is written.
On start, a torn last line is cut (`records.repair_torn_tail`) and the ids already present are skipped.

`BatchLog` is the second journal of `collect --batch` (OUT.batches.jsonl): what each provider batch holds, written
before the batch is created, and its id right after (see imitate.collect.batch).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imitate import jsonl
from imitate.errors import InputError
from imitate.records import dumps, iter_jsonl, repair_torn_tail


def finished_ids(path: Path) -> set[str]:
    """Ids of the records already in `path` (after repairing a torn tail)."""
    repair_torn_tail(path)
    ids: set[str] = set()
    if not path.exists():
        return ids
    for lineno, line in jsonl.lines(path):
        if isinstance(line, bytes) and not line.strip():
            continue
        data, why = jsonl.parse(line)  # not JSON, too long, nested too deeply: `why` says which
        try:
            ids.add(data["id"])
        except (KeyError, TypeError):
            raise InputError(
                f"{path}:{lineno}: not a record ({why or 'no id'}; the output file is also the resume journal)",
                hint="give a new --out, or remove that line",
            ) from None
    return ids


def read_by_id(path: Path, ids: set[str]) -> dict[str, dict]:
    """The records of `path` whose id is in `ids` (the first one of each id)."""
    out: dict[str, dict] = {}
    for line in iter_jsonl(path):
        if line.data.get("id") in ids:
            out.setdefault(line.data["id"], line.data)
    return out


class Journal:
    """Append records to `path` from async code; `await close()` flushes everything and fsyncs."""

    def __init__(self, path: Path, *, fsync: bool = True, on_error: Callable[[OSError], None] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.fsync = fsync
        self.written = 0  # lines written whole (and fsynced, with fsync)
        self.accepted = 0  # lines put
        self.error: OSError | None = None  # the write that failed (a full disk...): nothing is written after it
        self.on_error = on_error
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def put(self, record: dict) -> None:
        if self.error is not None:
            return  # not written: its request has no record, so the next run asks it again
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._writer())
        self.accepted += 1
        self._queue.put_nowait(dumps(record) + "\n")

    async def _writer(self) -> None:
        done = False
        while not done:
            lines = [await self._queue.get()]
            while not self._queue.empty():
                lines.append(self._queue.get_nowait())
            if lines[-1] is None:
                done = True
                lines.pop()
            if lines and self.error is None:
                data = "".join(lines).encode("utf-8")
                start, done_bytes = os.lseek(self.fd, 0, os.SEEK_END), 0
                try:
                    while done_bytes < len(data):
                        done_bytes += os.write(self.fd, memoryview(data)[done_bytes:])
                    if self.fsync:
                        await asyncio.to_thread(os.fsync, self.fd)
                    self.written += len(lines)
                except OSError as exc:  # full disk, read-only, quota: keep the whole lines, stop writing
                    self._failed(exc, start, data[:done_bytes])

    def _failed(self, exc: OSError, start: int, written: bytes) -> None:
        """Cut a partly written line (the file then ends with a whole record) and tell the owner."""
        cut = written.rfind(b"\n") + 1
        try:
            os.ftruncate(self.fd, start + cut)  # frees space; needs none
            self.written += written[:cut].count(b"\n")
        except OSError:
            repair_torn_tail(self.path)  # best effort; the next run repairs the tail anyway
        self.error = exc
        if self.on_error is not None:
            self.on_error(exc)

    async def close(self) -> None:
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None
        os.close(self.fd)


class BatchLog:
    """The batch journal: append-only, one fsynced JSON line per event; read back into `intents` on open."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.intents: dict[str, dict] = {}  # key -> {ids, t, teacher, base_url, batch, state}
        repair_torn_tail(self.path)
        if self.path.exists():
            for line in iter_jsonl(self.path):
                self._apply(line.data)

    def _apply(self, ev: dict) -> None:
        kind, key = ev["event"], ev["key"]
        if kind == "intent":
            self.intents[key] = {**ev, "batch": None, "state": "open"}
        elif kind == "created":
            self.intents[key]["batch"] = ev["batch"]
        elif kind in ("done", "void"):
            self.intents[key]["state"] = kind
        elif kind == "cancel":
            self.intents[key]["cancelled"] = True

    def write(self, event: str, key: str, **fields: Any) -> None:
        ev = {"event": event, "key": key, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (dumps(ev) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._apply(ev)

    def open_intents(self, teacher: str | None = None) -> list[dict]:
        """Open intents (of one teacher: several teachers' batches share OUT's log)."""
        return [i for i in self.intents.values() if i["state"] == "open" and teacher in (None, i.get("teacher"))]

    def held(self, teacher: str | None = None) -> set[str]:
        return {rid for i in self.open_intents(teacher) for rid in i["ids"]}
