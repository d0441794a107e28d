"""The Jinja sandbox of prompt templates, with caps: a template can neither reach Python internals (Jinja's
SandboxedEnvironment) nor run away with time or memory (this module).

A shared template is untrusted input, like a prompts file. Without caps `{{ "x" * 10**10 }}`, `{{ "x"|center(10**10) }}`
or two nested `range(100000)` loops render gigabytes or run for hours before the first request. Here:
  * the rendered text of one row stops at MAX_CHARS characters (streamed: never built past the cap);
  * `range` counts every item it hands out during one render, up to MAX_LOOP in all (nested loops multiply);
  * `*` (repeating a string or list), `**` (huge powers), `%` formatting, `.format()`, `center`, `indent`,
    `wordwrap`, `format` and `lipsum` are checked against MAX_CHARS before they allocate.
Every cap is a `TemplateTooBig` error, which the template code reports as `FILE:LINE: template NAME failed: ...`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from jinja2.sandbox import SandboxedEnvironment, SecurityError

MAX_CHARS = 4_000_000  # a prompt of ~1M tokens: past any model's context
MAX_LOOP = 1_000_000  # range() items per render
_WIDTH = re.compile(r"\d{7,}")  # a width or precision of 1,000,000 or more in a format string


class TemplateTooBig(SecurityError):
    """The template asked for more output, loop iterations or memory than a prompt can use."""


def _check_size(n: int | float, what: str) -> None:
    if n > MAX_CHARS:
        raise TemplateTooBig(f"{what} would make {n:,.0f} characters or items, over the {MAX_CHARS:,} limit")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDTH.search(fmt):
        raise TemplateTooBig(f"format string asks for a width or precision over {MAX_CHARS:,} characters")


class CappedEnvironment(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.loops = 0
        self.globals["range"] = self._range
        self.globals["lipsum"] = self._lipsum
        for name in ("center", "indent", "wordwrap"):
            self.filters[name] = self._width_checked(self.filters[name])
        fmt = self.filters["format"]
        self.filters["format"] = lambda value, *a, **k: (_check_format(value), fmt(value, *a, **k))[1]

    def reset(self) -> None:
        """A new render: its own loop budget."""
        self.loops = 0

    def _range(self, *args: int) -> range:
        r = range(*args)
        self.loops += len(r)
        if self.loops > MAX_LOOP:
            raise TemplateTooBig(f"loops ran over {MAX_LOOP:,} range() items in one render")
        return r

    def _lipsum(self, n: int = 5, *args: Any, **kw: Any) -> str:
        from jinja2.utils import generate_lorem_ipsum

        _check_size(int(n) * 1000, "lipsum")
        return generate_lorem_ipsum(n, *args, **kw)

    @staticmethod
    def _width_checked(filt: Any) -> Any:
        def checked(*args: Any, **kw: Any) -> Any:
            for v in [*args[1:], *kw.values()]:
                if isinstance(v, int) and not isinstance(v, bool):
                    _check_size(v, "a width")
            return filt(*args, **kw)

        checked.__dict__.update(filt.__dict__)  # keep jinja's pass_environment / pass_eval_context marks
        return checked

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(k, int):
                    _check_size(len(seq) * k, "repeating a sequence")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            _check_size(abs(left).bit_length() * right / 3.3, "a power")  # its decimal digits
        elif operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Any:
        if getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format(getattr(value, "__self__", None))  # "{:>999999999}".format(1)
        return super().wrap_str_format(value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        name = getattr(__obj, "__name__", "")
        if isinstance(getattr(__obj, "__self__", None), str):
            for v in [*args, *kwargs.values()]:  # "x".center(10**9), "x".ljust(...), "x".zfill(...)
                if isinstance(v, int) and not isinstance(v, bool):
                    _check_size(v, f"str.{name}")
        return super().call(__context, __obj, *args, **kwargs)


def capped_join(parts: Iterable[str]) -> str:
    """Join a template's streamed output, stopping at MAX_CHARS."""
    out: list[str] = []
    n = 0
    for part in parts:
        n += len(part)
        if n > MAX_CHARS:
            raise TemplateTooBig(f"the rendered prompt passed {MAX_CHARS:,} characters")
        out.append(part)
    return "".join(out)
