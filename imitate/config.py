"""Stage configs: frozen dataclasses, built from layers `defaults < config file < flags actually given`.

Each stage defines its config dataclass beside its code (imitate/collect/config.py, imitate/clean/config.py,
imitate/train/config.py, EvalConfig in imitate/evaluate.py), every field declared once with `imitate.options.opt`
(flag, help, example, bounds) and checked when the config is built. This module holds the machinery the layers share:
merging them, checking unknown keys ("did you mean"), coercing TOML values to the field types, and resolving paths
relative to the config file.

Field names are the long flag names with dashes turned into underscores, so `--max-tokens 256` and
`max_tokens = 256` (or `max-tokens = 256`) in a TOML section mean the same thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from imitate.errors import ConfigError, UsageError
from imitate.models import split_ref
from imitate.options import PATH_MARK, REQUIRED_MARK

T = TypeVar("T")


def path_field(default: Any = None, **kw: Any) -> Any:
    """A dataclass field holding a path (or list of paths), resolved relative to the config file."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={PATH_MARK: True}, **kw)
    return dataclasses.field(default=default, metadata={PATH_MARK: True}, **kw)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _norm_key(key: str) -> str:
    return key.replace("-", "_")


def check_keys(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Return `data` with normalized keys; unknown keys raise ConfigError with a suggestion."""
    if not isinstance(data, Mapping):  # `collect = 3` where a [collect] table belongs
        raise ConfigError(f"{where}: must be a table of options, got {type(data).__name__} {data!r}"[:300])
    names = field_names(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = _norm_key(key)
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0].replace('_', '-')}'?" if close else "known keys: " + ", ".join(
                n.replace("_", "-") for n in names
            )
            raise ConfigError(f"{where}: unknown key '{key}'", hint=hint)
        out[k] = value
    return out


def coerce(value: Any, tp: Any, name: str, where: str) -> Any:
    """Coerce a TOML/flag value to the annotated type where it is unambiguous (int -> float, str -> Path...)."""
    if value is None:
        return None
    at = "" if where == "options" else f"{where}: "  # flags: "--kd must be ..."; a file: "f.toml [train]: 'kd' must be"
    shown = name if name.startswith("--") else f"'{name}'"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        last_exc: Exception | None = None
        for a in non_none:
            try:
                return coerce(value, a, name, where)
            except ConfigError as exc:
                last_exc = exc
        if last_exc:
            raise last_exc
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{at}{shown} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{at}{shown} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{at}{shown} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{at}{shown} must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{at}{shown} must be a path string, got {value!r}")
        return Path(value)
    if origin in (list, tuple):
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{at}{shown} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(v, inner, name, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}{shown} must be a table, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{at}{shown} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    return value


# String fields that name a model which may be a local directory or a hub id ("student = 'models/init'"): given in a
# config file, they are resolved relative to the file only when that directory exists there.
MODEL_FIELDS = ("student", "model", "teacher")


def resolve_spec(value: Any, base: Path, *, bare: bool = False) -> Any:
    """'hf:REL' -> 'hf:BASE/REL' when that local path exists or starts with ./ or ../; other values are unchanged.

    A local teacher named in a config file is found relative to the file, like every other path in it; hub ids
    ('hf:Qwen/Qwen2.5-0.5B') and API specs ('openai:gpt-4o-mini') do not exist on disk and are left alone.
    bare: also resolve a value without the 'hf:' prefix (a model field such as `student`).
    """
    if not isinstance(value, str):
        return value
    provider, rest = split_ref(value)
    if provider not in (None, "hf") or (provider is None and not bare):
        return value
    p = Path(rest).expanduser()
    try:
        # './x' and '../x' are never hub ids: resolved even before they exist (a teacher an earlier run writes, TAKD)
        if p.is_absolute() or not ((base / p).exists() or rest.startswith(("./", "../"))):
            return value
    except OSError:  # a name too long to be a path (ENAMETOOLONG): not a local model
        return value
    return ("hf:" if provider else "") + os.path.normpath(base / p)


def resolve_paths(cls: type, data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative path fields in `data` relative to `base` (the config file's directory).

    Local teacher specs ('hf:./model') in any string field are resolved the same way (see resolve_spec).
    """
    out = dict(data)
    for f in dataclasses.fields(cls):
        if out.get(f.name) is None:
            continue
        if not f.metadata.get(PATH_MARK):
            bare = f.name in MODEL_FIELDS
            v = out[f.name]  # a list of specs: collect's `teacher = ["hf:a", "hf:b"]`
            out[f.name] = [resolve_spec(x, base, bare=bare) for x in v] if isinstance(v, list) else resolve_spec(
                v, base, bare=bare)
            continue

        def fix(v: Any) -> Any:
            if not isinstance(v, (str, Path)):
                return v  # a wrong type: building the config names it
            s = str(v)
            if split_ref(s)[0] is not None:  # a spec such as "hf:./model" or "openai:gpt-4o"
                return resolve_spec(s, base)
            p = Path(s).expanduser()
            return p if p.is_absolute() else Path(os.path.normpath(base / p))

        v = out[f.name]
        out[f.name] = [fix(x) for x in v] if isinstance(v, list) else fix(v)
    return out


def build(cls: type[T], *layers: Mapping[str, Any] | None, where: str = "options") -> T:
    """Build a frozen config: later layers override earlier ones; None values (flags not given) are ignored."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        for k, v in check_keys(cls, layer, where).items():
            if v is not None:
                merged[k] = v
    hints = typing.get_type_hints(cls)
    for k in list(merged):  # flags alone (where == "options") are named as flags: '--match', not 'match'
        label = ("--" if where == "options" else "") + k.replace("_", "-")
        merged[k] = coerce(merged[k], hints.get(k, Any), label, where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in merged and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing += [f.name for f in dataclasses.fields(cls)  # opt(required=True): None or empty is not enough
                if f.metadata.get(REQUIRED_MARK) and not merged.get(f.name)]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"{where}: missing required option(s): {flags}", hint="give them as flags or in the config file")
    try:
        return cls(**merged)  # the config checks itself (imitate.options.Checked)
    except UsageError as exc:
        if where == "options" or exc.message.startswith(where):
            raise
        raise type(exc)(f"{where}: {exc.message}", hint=exc.hint) from None


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start + 1})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config (paths as strings), for manifests and --json summaries."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
