"""Run manifests: what a stage run read (content hashes), how it was configured, and what it wrote.

`imitate run` writes `OUT.manifest.json` beside a run's output after the run succeeds, and skips the run next time
when `stale_reason` finds nothing changed. Hashes are sha256 of contents (never sizes or modification times, which a
rewrite with equal size in the same second, a `touch`, a git checkout or a CI cache restore all get wrong); directories
hash their files' relative paths and contents, so a student or teacher model directory is an input like a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from imitate.config import MODEL_FIELDS, PATH_MARK, to_dict
from imitate.models import split_ref

# Path fields a stage WRITES. Every other path (and every local model directory) a run names is one of its inputs.
OUTPUT_FIELDS = {"out", "removed", "report", "failures"}
# Options that change only speed, display or retry behaviour, never what a run writes: changing them re-runs nothing.
SPEED_OPTIONS = {"progress", "workers", "concurrency", "rpm", "tpm", "retries", "timeout", "resume", "poll_interval", "poll_max", "wait_lock"}
SUFFIX = ".manifest.json"
CARD = "README.md"  # a model card: documentation that eval updates, not part of what a run read or wrote
VERSION = 1


def hash_path(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or of a directory's (relative path, file hash) list; None if it does not exist.

    Contents are read, not sizes or times: a file rewritten with the same size in the same second still changes the
    hash, and a file touched without a change does not. Manifests and temp files inside a directory are left out, and
    so is a model directory's card (README.md): `imitate eval` adds its scores there (imitate/cards.py).
    """
    p = Path(path)
    if p.is_file():
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if p.is_dir():
        h = hashlib.sha256(b"dir\0")
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for f in sorted(files):
                if f.endswith((SUFFIX, ".tmp", ".lock")) or (f == CARD and root == str(p)):
                    continue
                fp = Path(root) / f
                rel = fp.relative_to(p).as_posix()
                h.update(rel.encode() + b"\0" + (hash_path(fp) or "").encode() + b"\n")
        return h.hexdigest()
    return None


def path_values(cfg: Any) -> dict[str, list[Path]]:
    """Field -> the local paths it names: path fields, local model directories and `hf:` specs pointing at one."""
    found: dict[str, list[Path]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        paths = []
        for v in values:
            if not isinstance(v, (str, Path)):
                continue
            provider, rest = split_ref(str(v))
            if provider == "hf" and Path(rest).exists():
                paths.append(Path(rest))
            elif provider is None and f.metadata.get(PATH_MARK):
                paths.append(Path(v))
            elif provider is None and f.name in MODEL_FIELDS and Path(v).exists():
                paths.append(Path(v))  # a local model directory named without hf: (train's `student`)
        if paths:
            found[f.name] = paths
    return found


def input_hashes(cfg: Any) -> dict[str, Any]:
    """{field: {path: sha256 or None}} for every input the run names (outputs excluded)."""
    return {
        name: {str(p): hash_path(p) for p in paths}
        for name, paths in path_values(cfg).items()
        if name not in OUTPUT_FIELDS
    }


def output_hashes(cfg: Any) -> dict[str, Any]:
    """{field: {path: sha256 or None}} for what the run writes (None: not there)."""
    return {
        name: {str(p): hash_path(p) for p in paths} for name, paths in path_values(cfg).items() if name in OUTPUT_FIELDS
    }


def path_for(cfg: Any) -> Path | None:
    """OUT.manifest.json beside the run's `out` (a file or a directory); None when the run has no output path."""
    out = getattr(cfg, "out", None)
    if out is None:
        return None
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


def read(path: Path | None) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("version") == VERSION else None


def _jsonable(data: Any) -> Any:
    """`data` as it reads back from the manifest (tuples -> lists, odd types -> str), so comparisons are fair."""
    return json.loads(json.dumps(data, default=str))


def _defaults(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return _jsonable(out)


def stale_reason(cfg: Any, manifest: Path | None, inputs: dict) -> str | None:
    """Why the run must run again, or None when its manifest shows it is up to date."""
    if manifest is None:
        return "no output path to keep a manifest beside"
    old = read(manifest)
    if old is None:
        return "no manifest of an earlier successful run"
    opts, old_opts = _jsonable(to_dict(cfg)), dict(old.get("options", {}))
    for k, default in _defaults(
        cfg
    ).items():  # an option added by a newer imitate, left at its default, changes nothing
        old_opts.setdefault(k, default)
    changed = sorted(k for k in (set(opts) | set(old_opts)) - SPEED_OPTIONS if opts.get(k) != old_opts.get(k))
    if changed:
        return "options changed: " + ", ".join(k.replace("_", "-") for k in changed)
    old_inputs = old.get("inputs", {})
    changed = sorted(k for k in set(inputs) | set(old_inputs) if inputs.get(k) != old_inputs.get(k))
    if changed:
        return "inputs changed: " + ", ".join(k.replace("_", "-") for k in changed)
    if output_hashes(cfg) != old.get("outputs"):
        return "outputs missing or changed since the last run"
    return None


def write(manifest: Path, cfg: Any, inputs: dict, **info: Any) -> None:
    """Atomically write the manifest: `info` (stage, name, seconds, summary), options, input and output hashes."""
    from imitate.records import now_iso

    data = {
        "version": VERSION,
        **info,
        "finished": now_iso(),
        "options": _jsonable(to_dict(cfg)),
        "inputs": inputs,
        "outputs": output_hashes(cfg),
    }
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
