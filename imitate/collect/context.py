"""`imitate collect --context FILE`: turns only the teacher sees, sent in front of every request.

The context is what a user prompt-engineered for the teacher (a long system prompt, worked examples, a rubric) and
wants the student to do without. It goes into the record's `context` field, never into `messages` (see
imitate.records), and the record id covers it, so changing the context asks the teacher anew.

FILE is one of:
  * .json   a list of {role, content} turns (or an object whose "context" field is that list);
  * .jsonl  one turn a line;
  * .txt / .md   the whole text is one system turn;
  * .j2     a Jinja2 template rendered per input row in the same sandbox as --template (every field of the row is a
            variable; a missing one is an error naming the line). Its output is either a JSON list of turns (build it
            with a loop and `|tojson`) or plain text, which becomes one system turn.
Without --context, input rows that are records with a `context` field keep it (re-asking records of another teacher
sends what the first one saw); --context replaces it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.errors import InputError, UsageError
from imitate.records import messages_problem

HINT = ("a context file is .json (a list of {role, content} turns), .jsonl (one turn a line), .txt/.md (one system "
        "turn) or .j2 (a template rendered per row)")


@dataclass
class Context:
    """Fixed turns, or a template rendering turns for each row."""

    name: str
    fixed: list[dict] | None = None
    template: Any = None  # imitate.collect.templates.Template

    def turns(self, row: dict, where: str = "") -> list[dict]:
        """The context for one input row (a fresh list: callers may extend it)."""
        if self.fixed is not None:
            return [dict(m) for m in self.fixed]
        text = _render(self.template, row, where)
        turns = _parse_rendered(text)
        problem = messages_problem(turns, field="context")
        if problem:
            raise InputError(f"{where + ': ' if where else ''}context template {self.name!r}: {problem}", hint=HINT)
        return turns


def _render(template: Any, row: dict, where: str) -> str:
    from jinja2 import UndefinedError

    try:
        return template.compiled.render(**row).strip()
    except UndefinedError as exc:
        from imitate.collect.templates import _undefined_name

        missing = _undefined_name(str(exc))
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise InputError(
            f"{where + ': ' if where else ''}context template {template.name!r} uses variable {missing!r}, "
            "which this row lacks",
            hint=f"the row's fields are: {keys}; add '{missing}' to every row or change the template",
        ) from None
    except Exception as exc:  # a sandbox violation or an error raised inside the template
        raise InputError(f"{where + ': ' if where else ''}context template {template.name!r} failed: {exc}") from None


def _parse_rendered(text: str) -> Any:
    """A rendered context: a JSON list of turns when it reads as one, else one system turn."""
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return [{"role": "system", "content": text}] if text else []


def load(path: str | Path) -> Context:
    """Read and check a context file (errors name the file and line)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--context {p}: no such file", hint=HINT)
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix == ".j2":
        from imitate.collect.templates import from_string

        return Context(str(p), template=from_string(text, str(p)))
    if suffix in (".txt", ".md"):
        if not text.strip():
            raise InputError(f"{p}: the context file is empty", hint=HINT)
        return Context(str(p), fixed=[{"role": "system", "content": text.strip()}])
    if suffix == ".jsonl":
        from imitate.records import iter_jsonl

        turns: Any = [line.data for line in iter_jsonl(p)]
    elif suffix == ".json":
        try:
            turns = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})", hint=HINT) from None
        if isinstance(turns, dict) and "context" in turns:
            turns = turns["context"]
    else:
        raise UsageError(f"--context {p}: unknown file type {suffix or '(none)'!r}", hint=HINT)
    problem = messages_problem(turns, field="context")
    if problem:
        raise InputError(f"{p}: {problem}", hint=HINT)
    return Context(str(p), fixed=turns)
