"""One definition per option: a stage config field declared with `opt(...)` is the flag, the TOML key and the docs.

    max_tokens: int = opt(1024, "Answer length cap in tokens.", example="256", ge=1)

From that one line come
  - the typer option of the stage's command (`--max-tokens`, from the field name; `flag=` for other spellings),
  - its `--help` text: the help, "Example: --max-tokens 256" and "[default: 1024]" (never written by hand),
  - the TOML key of the stage's section (`max-tokens` or `max_tokens`) and its type (checked by imitate.config),
  - the check run when the config is built (`ge`/`gt`/`le`/`lt` bounds; `Literal[...]` choices from the annotation),
  - the option table of the stage in the docs (`python -m imitate._docs FILE.md` rewrites it, see imitate/_docs.py;
    a test keeps it true).

The configs: CollectConfig in imitate/collect/config.py, CleanConfig in imitate/clean/config.py, TrainConfig in
imitate/train/config.py, EvalConfig in imitate/evaluate.py. Each subclasses `Checked`: building one coerces every field
to its annotation, applies the bounds and choices, then runs the class's `check()` (cross-field rules), so a config that
exists is valid and `imitate run` can build all of them before the first stage runs.

This module is a leaf: it imports no stage config (the configs import it). The tables that list every stage's options
are rendered by imitate/_docs.py, which imports the configs and is used only by the tests and the docs tooling.

Porting an option written the older way (a field in the stage module's config class, a `typer.Option` in cli.py, an
entry in the command's flags dict, a range check in the stage's check function):
  1. move the field into the config module as `name: T = opt(default, "Help.", example="VALUE", ...)`: the help says
     what it does, never its default; `flag="--x/--no-x"` for a boolean pair or another spelling, `short="-o"`,
     `metavar=`, `cli=False` for a TOML-only key, `path=True` / `input=True` for a path written / read;
     bounds as `ge=`, `gt=`, `le=`, `lt=` (+ `hint=`); choices as `Literal[...]`; cross-field rules in `check()`;
  2. drop the `typer.Option` parameter and the flags-dict entry (the command is generated from the fields);
  3. run `python -m imitate._docs FILE.md` and commit the regenerated tables (tests/test_readme.py checks them).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

MISSING = dataclasses.MISSING
META = "imitate"  # key of the field metadata this module writes
PATH_MARK = "path"  # metadata flag: a path (or list of paths), resolved relative to the config file
INPUT_MARK = "input"  # metadata flag: a file that must exist before the stage runs (checked before a pipeline starts)
REQUIRED_MARK = "required"  # metadata flag: built from flags or a file, the value must be given (not None or empty)


def opt(
    default: Any = MISSING,
    help: str = "",
    *,
    example: str | None = None,
    flag: str | None = None,
    short: str | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    argument: bool = False,
    cli: bool = True,
    path: bool = False,
    input: bool = False,
    required: bool = False,
    parse: Callable[[list[str], str], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    hint: str | None = None,
    default_text: str | None = None,
) -> Any:
    """A config field carrying its flag, help, example and bounds (see the module docstring).

    example: the value part ("256"), or a whole command fragment when it starts with "-" ("--max-tokens 256 --n 2").
    required: a None/empty default that must be given when built from flags or a config file (a unit test may leave
        it out); path: resolved relative to the config file; input: a path that must exist before the run.
    parse: turns the strings given on the command line into the field's value (e.g. ROLE=N pairs into a dict).
    hint: the Hint: line shown when a value is out of bounds.
    default_text: how the default reads in --help and the docs when the value alone says too little.
    """
    meta = {
        META: dict(help=help, example=example, flag=flag, short=short, aliases=aliases, metavar=metavar, argument=argument, cli=cli,
                   parse=parse, bounds={k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                                        if v is not None}, hint=hint, default_text=default_text),
        PATH_MARK: path or input,
        INPUT_MARK: input,
        REQUIRED_MARK: required,
    }
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def spec(f: dataclasses.Field) -> dict:
    """The opt() metadata of a field ({} for a plain field)."""
    return f.metadata.get(META, {})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def default_text(f: dataclasses.Field) -> str:
    """The default as --help and the option reference show it ('required' when there is none)."""
    s = spec(f)
    if s.get("default_text"):
        return s["default_text"]
    d = default_of(f)
    if d is MISSING:
        return "required"
    if d is None or d == [] or d == {}:
        return "none"
    if isinstance(d, bool):
        return "on" if d else "off"
    if isinstance(d, list):
        return " ".join(map(str, d))
    return str(d)


def example_text(f: dataclasses.Field) -> str:
    ex = spec(f).get("example")
    if ex is None:
        return ""
    if ex.startswith("-") or spec(f).get("argument"):
        return ex
    return f"{primary_flag(f)} {ex}".rstrip()


def primary_flag(f: dataclasses.Field) -> str:
    s = spec(f)
    if s.get("argument"):
        return s.get("metavar") or f.name.upper()
    if s.get("flag"):
        return s["flag"].split("/")[0]
    return flag_name(f.name)


def help_text(f: dataclasses.Field, code: str = "") -> str:
    """help + choices + range + example: the --help text of the option and its cell in the option reference (code="`")."""
    s = spec(f)
    text = s.get("help", "").strip()
    choices = literal_choices(f.type)
    if choices:
        text += f" One of: {', '.join(map(str, choices))}."
    bounds = s.get("bounds") or {}
    if bounds:
        signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        text += " Range: " + ", ".join(f"{signs[k]} {_num(b)}" for k, b in bounds.items()) + "."
    ex = example_text(f)
    if ex:
        text += f" Example: {code}{ex}{code}"
    return text


def literal_choices(tp: Any) -> tuple:
    """The values of a Literal annotation (inside Optional too); () otherwise."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if typing.get_origin(a) is Literal:
                return typing.get_args(a)
    return ()


def fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config class with their annotations resolved."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        f.type = hints.get(f.name, f.type)
        out.append(f)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# checks run when a config is built
# ---------------------------------------------------------------------------------------------------------------------


def check_bounds(cfg: Any) -> None:
    """Each field's ge/gt/le/lt bounds (None passes: an optional option left out)."""
    from imitate.errors import UsageError

    tests = {"ge": (float.__ge__, ">="), "gt": (float.__gt__, ">"), "le": (float.__le__, "<="), "lt": (float.__lt__, "<")}
    for f in dataclasses.fields(cfg):
        bounds = spec(f).get("bounds") or {}
        value = getattr(cfg, f.name)
        if not bounds or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if all(tests[k][0](float(value), float(b)) for k, b in bounds.items()):
            continue
        if list(bounds) == ["ge"]:
            rule = f"at least {_num(bounds['ge'])}"
        else:
            rule = " and ".join(f"{tests[k][1]} {_num(b)}" for k, b in bounds.items())
        hint = spec(f).get("hint") or (f"leave {flag_name(f.name)} out for no limit" if f.default is None else None)
        raise UsageError(f"{flag_name(f.name)} must be {rule}, got {value}", hint=hint)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


class Checked:
    """Base of the stage configs: building one coerces and checks every field, then runs the class's `check()`.

    So a config that exists is a valid one: `imitate run` builds every stage's config before the first stage runs,
    and a bad value in a late section stops it before anything is spent.
    """

    def __post_init__(self) -> None:
        from imitate.config import coerce

        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            fixed = coerce(value, hints.get(f.name, Any), flag_name(f.name), "options")
            if fixed is not value:
                object.__setattr__(self, f.name, fixed)
        check_bounds(self)
        self.check()

    def check(self) -> None:
        """Cross-field rules of the stage (override)."""


# ---------------------------------------------------------------------------------------------------------------------
# the typer command of a stage, generated from its config's fields
# ---------------------------------------------------------------------------------------------------------------------


def _cli_type(f: dataclasses.Field) -> Any:
    """The type typer parses a flag into: choices as str (the config checks them), dicts as repeated strings."""
    tp = f.type
    if spec(f).get("parse"):
        return list[str]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return str
    return tp


def _metavar(f: dataclasses.Field) -> str | None:
    """What --help shows after the flag: the opt's metavar, the choices, or the kind of value."""
    if spec(f).get("metavar"):
        return spec(f)["metavar"]
    choices = literal_choices(f.type)
    if choices:
        return "|".join(map(str, choices))
    tp = _cli_type(f)
    inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    return {Path: "PATH", int: "INT", float: "NUMBER", str: "TEXT"}.get(inner)


def parameters(cls: type) -> list[inspect.Parameter]:
    """One typer parameter per CLI field of a config class; every default is None (a flag not given)."""
    import typer

    params = []
    for f in fields(cls):
        s = spec(f)
        if not s.get("cli", True):
            continue
        help_ = help_text(f)
        d = default_text(f)
        if d != "required" and s:
            help_ += f" [default: {d}]"
        if s.get("argument"):
            info = typer.Argument(None, help=help_, metavar=_metavar(f), show_default=False)
        else:
            decls = [s.get("flag") or flag_name(f.name)] + ([s["short"]] if s.get("short") else []) + list(
                s.get("aliases") or ())
            info = typer.Option(None, *decls, help=help_, metavar=_metavar(f), show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=Optional[_cli_type(f)]))
    return params


def flags_from(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """The values typer parsed, as a config layer: empty lists are 'not given'; parse= fields converted."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in given:
            continue
        value = given[f.name]
        if isinstance(value, (list, tuple)) and not value:
            value = None
        if value is not None and spec(f).get("parse"):
            value = spec(f)["parse"](list(value), primary_flag(f))
        out[f.name] = value
    return out


def command(cls: type, extra: list[inspect.Parameter], body: Callable[..., None]) -> Callable[..., None]:
    """A function typer turns into a command: the config's options + `extra`, calling body(given, **extra values);
    `given` holds what typer parsed for the config's options (turn it into a config layer with `flags_from`)."""
    names = {p.name for p in extra}

    def cmd(**kwargs: Any) -> None:
        given = {k: v for k, v in kwargs.items() if k not in names}
        body(given, **{k: v for k, v in kwargs.items() if k in names})

    params = parameters(cls) + extra
    args = [p for p in params if isinstance(p.default, _argument_info())]
    params = args + [p for p in params if p not in args]
    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__doc__ = body.__doc__
    cmd.__name__ = body.__name__
    return cmd


def _argument_info() -> type:
    from typer.models import ArgumentInfo

    return ArgumentInfo
