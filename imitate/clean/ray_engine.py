"""The Ray engine of `imitate clean` (`--engine ray`, extra `imitate[ray]`): the map step of scan.py on Ray Data.

The steps do not know where they run (datatrove's split of steps and executor): the same `Mapper` that the local
engine calls in its worker processes is called here in Ray Data's `map_batches`, one task per range of input lines,
and it returns the same `Chunk`s; the grouping by key and LSH band is a shuffle of Ray tasks that returns the same
edges.
The rest (the exact check, the survivor in input order, the mass-removal stop, writing, the report) is the local
code, so the two engines write the same bytes.

  ranges    this process splits each input (one file or many shards) into ranges of `chunk_size` lines at line
            boundaries and knows each range's first line number (one pass counting newlines, ~1 GB/s)
  map       Ray Data tasks read their range from the shared filesystem and run the `Mapper` (parse, filters, exact
            keys, MinHash band keys and sketches). The mapper -- with the filters, the decontamination index and the
            permutations -- is put in the object store once and shared by every task
  gather    the chunks come back in input order (sorted by range), as the local engine's do
  group     candidate pairs of each dedup stage: rows (band, key, record) are hash-partitioned by (band, key) in
            a shuffle of Ray tasks (map tasks split, one reduce task per partition), so a bucket lands whole in one
            partition, which emits its edges (`shuffle_edges`: the edges of `dedup.candidate_edges`, same order).
            Ray Data's own hash shuffle starts aggregator actors: ~10 s a shuffle on 2 cores, for the same result.
            The exact check and the survivor choice over the verified edges then run in this process, as locally

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
from imitate.clean.dedup import bucket_edges, unique_edges
from imitate.clean.minhash import fmix64
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


ROWS_PER_PARTITION = 1 << 22  # (band, key, node) rows per partition of the band shuffle: 4M rows = 96 MB


def _partition(keys: np.ndarray, lo: int, parts: int) -> list[np.ndarray] | np.ndarray:
    """Shuffle map: a block of records' band keys -> `parts` arrays of (band, key, node) rows, by hash of (band, key)
    (one array, not a list of one, when parts = 1: Ray returns a task's value as its single object then)."""
    n, bands = keys.shape
    rows = np.stack([np.tile(np.arange(bands, dtype=np.uint64), n), keys.ravel(),
                     np.repeat(np.arange(lo, lo + n, dtype=np.uint64), bands)], axis=1)  # fmt: skip
    dest = fmix64(rows[:, 1] ^ rows[:, 0]) % np.uint64(parts)
    order = np.argsort(dest, kind="stable")
    cuts = np.searchsorted(dest[order], np.arange(1, parts, dtype=np.uint64))
    return np.split(rows[order], cuts) if parts > 1 else rows


def _reduce(max_pairs_bucket: int, *blocks: np.ndarray) -> np.ndarray:
    """Shuffle reduce: every row of a (band, key) bucket is in this partition -> the edges of its buckets."""
    rows = np.concatenate(blocks)
    out = []
    for b in np.unique(rows[:, 0]):
        m = rows[:, 0] == b
        out.append(bucket_edges(rows[m, 1], rows[m, 2].astype(np.int64), max_pairs_bucket))
    return unique_edges(out)


def shuffle_edges(keys: np.ndarray, max_pairs_bucket: int = 0) -> np.ndarray:
    """`dedup.candidate_edges` as a shuffle on Ray: map tasks split blocks of records into partitions by a hash of
    (band, key), so a bucket lands whole in one partition; a reduce task per partition emits its buckets' edges.
    The same edges, in the same order. keys: [n, bands] uint64, node = row."""
    import ray

    keys = keys.reshape(len(keys), -1)
    n, bands = keys.shape
    if not n:
        return unique_edges([])
    parts = max(1, -(-n * bands // ROWS_PER_PARTITION))
    step = max(1, ROWS_PER_PARTITION // bands)  # records per map task
    split = ray.remote(num_returns=parts)(_partition)
    mapped = [split.remote(keys[lo : lo + step], lo, parts) for lo in range(0, n, step)]
    mapped = [m if isinstance(m, list) else [m] for m in mapped]  # (one partition: one ref, not a list)
    reduce = ray.remote(_reduce)
    return unique_edges(ray.get([reduce.remote(max_pairs_bucket, *[m[p] for m in mapped]) for p in range(parts)]))


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


class RayEngine:
    """The executor of `--engine ray`: `scan` (the map step) and `group` (the band shuffle) on Ray Data; `close`
    stops the Ray this engine started (never a cluster it attached to)."""

    def __init__(self, cfg: CleanConfig):
        self.ray, self.started = connect(cfg)
        import logging

        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # the local engine prints no progress either
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # nor per-operator progress lines

    def scan(self, cfg: CleanConfig, mapper: Mapper, paths: list[Path]) -> tuple[list[Chunk], list]:
        """The local `scan.scan`, on Ray Data: the same chunks and bad lines, in input order."""
        ray = self.ray
        ranges = line_ranges(paths, cfg.chunk_size)
        if not ranges:
            return [], []
        items = [{"order": i, "path": p, "start": s, "end": e, "lineno": ln} for i, (p, s, e, ln) in enumerate(ranges)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_map_ranges, batch_size=1, fn_kwargs={"mapper": ray.put(mapper)})
        got = [(r["order"], pickle.loads(r["chunk"])) for r in ds.iter_rows()]  # unpickled as they come: the pickled
        chunks = [c for _, c in sorted(got, key=lambda oc: oc[0])]  # bytes are not all held at once
        return chunks, check_bad(cfg, chunks)

    group = staticmethod(shuffle_edges)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
