"""Prompt templates: Jinja2 in a sandbox with StrictUndefined, built-in (`prompts/`) or from a path; render(template, row) -> messages.

A template turns one input row (a dict) into the chat messages sent to the teacher. Two forms:

  * plain text: the whole rendered template is the user turn;
  * blocks: `{% block system %}...{% endblock %}` and `{% block user %}...{% endblock %}` give the system and user turns
    separately (either may be left out).

Every field of the row is a template variable. A variable the row lacks is an error (StrictUndefined) that names the
template, the variable and the input line. Templates run in Jinja's SandboxedEnvironment: a template file cannot reach
Python internals, so a shared template is as safe as a shared prompt; loops, output size and memory are capped
(imitate/collect/sandbox.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.errors import InputError, UsageError
from imitate.resources import prompts_dir

SUFFIX = ".j2"
BLOCKS = ("system", "user")


def builtin_names() -> list[str]:
    return sorted(p.name[: -len(SUFFIX)] for p in prompts_dir().glob(f"*{SUFFIX}"))


@dataclass
class Template:
    """A compiled template; `name` is what error messages call it (the built-in name or the file path)."""

    name: str
    compiled: Any

    def render(self, row: dict, where: str = "") -> list[dict]:
        """Render `row` into chat messages; `where` ("file:line") goes into error messages."""
        from jinja2 import UndefinedError

        from imitate.collect.sandbox import capped_join  # output, loops and sizes are capped (see sandbox.py)

        try:
            reset = getattr(self.compiled.environment, "reset", None)
            if reset is not None:
                reset()
            blocks = {b: self.compiled.blocks[b] for b in BLOCKS if b in self.compiled.blocks}
            if blocks:
                ctx = self.compiled.new_context(dict(row))
                parts = {b: capped_join(fn(ctx)).strip() for b, fn in blocks.items()}
            else:
                parts = {"user": capped_join(self.compiled.generate(**row)).strip()}
        except UndefinedError as exc:
            missing = _undefined_name(str(exc))
            keys = ", ".join(sorted(map(str, row))) or "none"
            raise InputError(
                f"{where + ': ' if where else ''}template {self.name!r} uses variable {missing!r}, which this row lacks",
                hint=f"the row's fields are: {keys}; add '{missing}' to every row or change the template",
            ) from None
        except Exception as exc:  # a sandbox violation or an error raised inside the template
            raise InputError(f"{where + ': ' if where else ''}template {self.name!r} failed: {exc}") from None
        messages = [{"role": r, "content": parts[r]} for r in BLOCKS if parts.get(r)]
        if not any(m["role"] == "user" for m in messages):
            raise InputError(f"{where + ': ' if where else ''}template {self.name!r} rendered an empty user turn")
        return messages


def _undefined_name(message: str) -> str:
    # jinja: "'foo' is undefined" or "'dict object' has no attribute 'bar'"
    m = re.search(r"has no attribute '([^']+)'", message) or re.search(r"'([^']+)' is undefined", message)
    return m.group(1) if m else message


def _environment() -> Any:
    from jinja2 import StrictUndefined

    from imitate.collect.sandbox import CappedEnvironment

    return CappedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


def from_string(source: str, name: str = "<string>") -> Template:
    from jinja2 import TemplateSyntaxError

    try:
        compiled = _environment().from_string(source)
    except TemplateSyntaxError as exc:
        raise UsageError(f"template {name}:{exc.lineno}: {exc.message}", hint="fix the Jinja2 syntax") from None
    return Template(name, compiled)


def load(name_or_path: str | Path) -> Template:
    """A template by built-in name (`prompts/NAME.j2`) or by path to a file."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        try:
            return from_string(p.read_text(encoding="utf-8"), str(p))
        except UnicodeDecodeError as exc:
            raise UsageError(f"template {p}: not valid UTF-8 ({exc.reason} at byte {exc.start + 1})") from None
    name = p.name.removesuffix(SUFFIX)
    builtin = prompts_dir() / f"{name}{SUFFIX}"
    if builtin.is_file():
        return from_string(builtin.read_text(encoding="utf-8"), name)
    raise UsageError(
        f"template {str(name_or_path)!r} is neither a file nor a built-in template",
        hint=f"built-in templates: {', '.join(builtin_names()) or 'none'}; or give --template path/to/file.j2",
    )


def render(template: Template | str | Path, row: dict, where: str = "") -> list[dict]:
    """Render one row with a template (a Template, a built-in name or a path) into chat messages."""
    if not isinstance(template, Template):
        template = load(template)
    return template.render(row, where)
