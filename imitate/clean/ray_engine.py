"""The Ray engine of `imitate clean` (`--engine ray`, extra `imitate[ray]`): the map step of scan.py on Ray Data.

The steps do not know where they run (datatrove's split of steps and executor): the same `Mapper` that the local
engine calls in its worker processes is called here in Ray Data's `map_batches`, one task per range of input lines,
and it returns the same `Chunk`s. Everything after the map (grouping by key and LSH band, the exact check, the
survivor in input order, the mass-removal stop, writing, the report) is the local code, so the two engines write the
same bytes.

  ranges    this process splits each input (one file or many shards) into ranges of `chunk_size` lines at line
            boundaries and knows each range's first line number (one pass counting newlines, ~1 GB/s)
  map       Ray Data tasks read their range from the shared filesystem and run the `Mapper` (parse, filters, exact
            keys, MinHash band keys and sketches). The mapper -- with the filters, the decontamination index and the
            permutations -- is put in the object store once and shared by every task
  gather    the chunks come back in input order (sorted by range), as the local engine's do

A worker that dies mid-task is retried by Ray (map tasks retry on system failures); a task computes a pure function
of its range, so a retried range gives the same chunk.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from imitate.clean.config import CleanConfig
from imitate.clean.scan import Chunk, Mapper, check_bad
from imitate.errors import ImitateError

_BLOCK = 1 << 26  # bytes read at a time while cutting ranges (64 MiB)


def import_ray() -> Any:
    """`ray` with Ray Data, or a clear error naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImitateError(
            f"--engine ray needs Ray Data, which is not installed ({exc})",
            hint="pip install 'imitate[ray]'  (or run with --engine local)",
        ) from None
    return ray


def line_ranges(paths: list[Path], lines: int) -> list[tuple[str, int, int, int]]:
    """(path, start byte, end byte, line number of the first line) of ranges of `lines` lines, cut at line ends."""
    out = []
    for path in paths:
        start, lineno, seen, offset = 0, 1, 0, 0
        with open(path, "rb") as fh:
            while block := fh.read(_BLOCK):
                ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + offset + 1  # byte after each newline
                for k in range(lines - seen - 1, len(ends), lines):
                    out.append((str(path), start, int(ends[k]), lineno))
                    start, lineno = int(ends[k]), lineno + lines
                seen = (seen + len(ends)) % lines
                offset += len(block)
        if offset > start:  # the last lines (with or without a final newline)
            out.append((str(path), start, offset, lineno))
    return out


def read_range(path: str, start: int, end: int, lineno: int) -> list[tuple[int, bytes]]:
    """The non-blank lines of bytes [start, end) of `path`, numbered from `lineno` (as scan's `_raw_chunks`)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    lines = [raw + b"\n" for raw in data.split(b"\n")]  # b"\n" only, as iterating a binary file does
    lines[-1] = lines[-1][:-1]  # (the range's last line has no newline of its own here: empty, or the file's end)
    return [(lineno + k, raw) for k, raw in enumerate(lines) if raw.strip()]


_MAPPERS: dict[str, Mapper] = {}  # object-store mappers already fetched by this worker process


def _shared(ref: Any) -> Mapper:
    """The mapper behind an object ref, fetched and unpickled once per worker process."""
    import ray

    key = ref.hex()
    if key not in _MAPPERS:
        _MAPPERS.clear()
        _MAPPERS[key] = ray.get(ref)
    return _MAPPERS[key]


def _map_ranges(batch: dict[str, np.ndarray], mapper: Any) -> dict[str, list]:
    """map_batches: each row is a range of lines -> its pickled Chunk (the mapper comes from the object store)."""
    if not isinstance(mapper, Mapper):
        mapper = _shared(mapper)
    out = []
    for path, start, end, lineno in zip(batch["path"], batch["start"], batch["end"], batch["lineno"]):
        lines = read_range(str(path), int(start), int(end), int(lineno))
        out.append(pickle.dumps(mapper((str(path), lines)), protocol=pickle.HIGHEST_PROTOCOL))
    return {"order": batch["order"], "chunk": out}


def connect(cfg: CleanConfig) -> tuple[Any, bool]:
    """(ray, whether this call started Ray): attach to --ray-address or RAY_ADDRESS, else start a local Ray with the
    machine's CPUs. A Ray already initialized in this process (a notebook, the tests) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    except ConnectionError as exc:
        raise ImitateError(f"cannot attach to the Ray cluster at {address}: {exc}",
                           hint="check --ray-address / RAY_ADDRESS (e.g. ray://head:10001 or auto), or unset it "
                           "to start a local Ray") from None  # fmt: skip
    return ray, True


def scan(cfg: CleanConfig, mapper: Mapper, paths: list[Path]) -> tuple[list[Chunk], list[tuple[str, int, str]]]:
    """The local `scan.scan`, on Ray Data: the same chunks and bad lines, in input order."""
    ray, started = connect(cfg)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # the local engine prints no progress either
        ranges = line_ranges(paths, cfg.chunk_size)
        if not ranges:
            return [], []
        items = [{"order": i, "path": p, "start": s, "end": e, "lineno": ln} for i, (p, s, e, ln) in enumerate(ranges)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_map_ranges, batch_size=1, fn_kwargs={"mapper": ray.put(mapper)})
        rows = sorted(ds.iter_rows(), key=lambda r: r["order"])
        chunks = [pickle.loads(r["chunk"]) for r in rows]
        return chunks, check_bad(cfg, chunks)
    finally:
        if started:
            ray.shutdown()
