"""The one record format every stage reads and writes.

A record is one JSON object on one line of a JSONL file; the file loads unchanged with
`datasets.load_dataset("json", data_files=...)` and feeds conversational fine-tuning tools (TRL's SFTTrainer) as-is:

    {
      "id": "3f1c...",                      # stable hash of the request: teacher, rendered messages, params, sample index
      "teacher": "openai:gpt-4o-mini",      # provider:model
      "messages": [                         # what the student sees and trains on; the teacher's answer is the last turn
        {"role": "system", "content": "..."},
        {"role": "user", "content": "..."},
        {"role": "assistant", "content": "..."}
      ],
      "context": [                          # optional, see CONTEXT below: turns only the teacher saw, before `messages`
        {"role": "system", "content": "Answer in the house format ..."}
      ],
      "params": {"temperature": 0.7, "max_tokens": 512},
      "sample": 0,                          # index among the --n samples drawn for this prompt
      "finish_reason": "stop",              # "stop" | "length" | provider-specific
      "usage": {"input_tokens": 21, "output_tokens": 130},
      "source": {...},                      # the input row the request was rendered from
      "created": "2026-11-23T16:20:00Z",
      "logprobs": [...],                    # only with --logprobs K, see LOGPROBS below
      "answer_token_ids": [1169, 318, ...]  # hf teachers only: the answer's token ids as generated (no end token)
    }

CONTEXT: the turns the teacher saw in front of `messages` (a long system prompt, worked examples) that the student must
learn to do without. The teacher was asked `context + messages`; the student trains on `messages` alone, so tools that
know nothing of `context` (datasets, TRL) train the student's view unchanged. A record without `context` (every record
written before it existed) means the teacher saw `messages` only. `teacher_messages(record)` gives what the teacher saw.

ANSWER_TOKEN_IDS: the assistant text is the decoded `answer_token_ids`, kept exactly (leading space included).
`imitate train` re-tokenizes the answer in the student's chat template; when the record's teacher has the student's
tokenizer it checks that this gives back these ids (see imitate.train.teacher_tokens.check_teacher_tokens).

LOGPROBS: a list with one entry per generated token,
`{"token": str, "id": int | None, "logprob": float, "bytes": [int] | None, "top": [{"token": str, "id": int | None,
"logprob": float, "bytes": [int] | None}, ...]}`;
`id` is the teacher's token id when the teacher reports it (hf teachers, vLLM), else null. `bytes` is the token's UTF-8
bytes (OpenAI's field; hf teachers write it too): a token may hold part of a character, which its string cannot show.
Records without `bytes` (older ones) are read by their token strings. A student with another tokenizer is aligned with
these tokens by text (imitate/train/xtok.py).

CONTENT PARTS: a turn's `content` may also be a list of text parts, `[{"type": "text", "text": "..."}, ...]` (the
OpenAI and TRL conversational form). Every stage reads such a turn as its parts' texts concatenated in order (as chat
templates render them; `content_text`), and a file written back unchanged (clean's output) keeps the parts. A part of
another type (image, audio) is an error naming the turn and the part: students are text-only for now.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imitate.errors import InputError

ROLES = ("system", "user", "assistant", "tool")
TEXT_PART = "text"


def request_id(teacher: str, messages: list[dict], params: dict, sample: int, context: list[dict] | None = None) -> str:
    """Stable id of one request: same teacher, rendered messages, context, params and sample index -> same id.

    Without a context the id is the one every earlier version computed, so journals written before `context` existed
    still resume without asking again; any context (even one turn) gives other ids, so changing it asks anew.
    """
    payload: dict[str, Any] = {"teacher": teacher, "messages": messages, "params": params, "sample": sample}
    if context:
        payload["context"] = context
    blob = json.dumps(
        payload,
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def dumps(record: dict) -> str:
    """One JSONL line (no newline). Keys keep their insertion order so outputs are byte-stable."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Line:
    """A parsed input line with where it came from, for error messages."""

    path: Path
    lineno: int
    data: Any


def iter_jsonl(path: str | os.PathLike, *, on_bad_line: str = "error", bad: list | None = None) -> Iterator[Line]:
    """Yield every non-blank line of a JSONL file as a `Line`.

    on_bad_line: "error" raises InputError naming file and line; "skip" appends (path, lineno, reason) to `bad`.
    """
    from imitate.jsonl import lines, parse

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file", hint="check the path; relative paths are resolved from the current directory")
    for lineno, raw in lines(path):  # a huge line is refused with its size, never read whole (imitate/jsonl.py)
        if not isinstance(raw, bytes) or raw.strip():
            data, reason = parse(raw)  # not UTF-8, not JSON, nested too deeply, too long
            if reason is None:
                yield Line(path, lineno, data)
            elif on_bad_line == "skip":
                if bad is not None:
                    bad.append((str(path), lineno, reason))
            else:
                raise InputError(
                    f"{path}:{lineno}: {reason}",
                    hint="each line must be one JSON object; fix or delete that line and run the command again",
                )


NO_ASSISTANT = "no assistant turn in 'messages'"


def record_problem(data: Any, *, need_assistant: bool = False) -> str | None:
    """Why a parsed line is not a usable record (no location: the caller adds "file:line"), or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    problem = messages_problem(data.get("messages"), need_assistant=need_assistant)
    context = data.get("context")
    if problem is None and context is not None and context != []:  # [] is "no context", as an absent field
        problem = messages_problem(context, field="context")
    return problem


def messages_problem(messages: Any, *, need_assistant: bool = False, field: str = "messages") -> str | None:
    """Why `messages` (or another chat list named `field`, such as `context`) is not a valid chat list, or None."""
    if not isinstance(messages, list) or not messages:
        return f"field '{field}' must be a non-empty list of {{role, content}} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{field}[{i}] must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"{field}[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}"
        problem = content_problem(m["content"], f"{field}[{i}].content")
        if problem:
            return problem
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return NO_ASSISTANT
    return None


NOT_TEXT = "only text parts are read"
NOT_TEXT_HINT = "imitate's students are text-only for now: drop that part (or the record) from the input"


def content_problem(content: Any, at: str) -> str | None:
    """Why a turn's `content` (named `at`, e.g. "messages[1].content") is neither a string nor a list of text parts."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"{at} must be a string or a list of text parts, got {type(content).__name__}"
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != TEXT_PART:
            what = f"a {kind!r} part" if isinstance(kind, str) else "not a {type, ...} part"
            return f"{at}[{j}] is {what}; {NOT_TEXT}"
        if not isinstance(part.get("text"), str):
            return f"{at}[{j}] is a text part without a string 'text'"
    return None


def content_text(content: Any) -> str:
    """A turn's content as one string: a string as is, a list of text parts as their texts concatenated in order
    (what chat templates render for such a list). Call on validated content; anything else gives ''."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def text_messages(messages: list[dict]) -> list[dict]:
    """The chat list with every content as one string (turns whose content is a string are the same objects)."""
    return [m if isinstance(m.get("content"), str) else {**m, "content": content_text(m["content"])} for m in messages]


def as_text(record: dict) -> dict:
    """The record as the stages read it: `messages` and `context` with string contents (content parts joined).
    The record itself when nothing needs joining; else a shallow copy, so the original form can still be written."""
    fields = [f for f in ("messages", "context") if isinstance(record.get(f), list)]
    if all(isinstance(m.get("content"), str) for f in fields for m in record[f] if isinstance(m, dict)):
        return record
    return {**record, **{f: text_messages(record[f]) for f in fields}}


def _problem_error(where: str, problem: str) -> InputError:
    hint = None
    if problem == NO_ASSISTANT:
        hint = "records to train on need the teacher's answer"
    elif problem.endswith(NOT_TEXT):
        hint = NOT_TEXT_HINT
    return InputError(f"{where}: {problem}", hint=hint)


def check_messages(messages: Any, where: str, *, need_assistant: bool = False) -> list[dict]:
    """Validate a chat list and return it with string contents (content parts joined); `where` is "file:line" for the
    error message."""
    problem = messages_problem(messages, need_assistant=need_assistant)
    if problem:
        raise _problem_error(where, problem)
    return text_messages(messages)


def read_records(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    on_bad_line: str = "error",
    bad: list | None = None,
    need_assistant: bool = False,
) -> Iterator[Line]:
    """Yield records (as Lines) from one or more JSONL files, checking the fields every stage relies on.

    Each record comes as the stages read it (`as_text`: content parts joined into strings); to write a record back in
    its original form, read it with `iter_jsonl` and check it with `record_problem`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        for line in iter_jsonl(p, on_bad_line=on_bad_line, bad=bad):
            problem = record_problem(line.data, need_assistant=need_assistant)
            if problem is None:
                yield Line(line.path, line.lineno, as_text(line.data))
            elif on_bad_line == "skip":
                if bad is not None:
                    bad.append((str(line.path), line.lineno, problem))
            else:
                raise _problem_error(f"{line.path}:{line.lineno}", problem)


def assistant_text(record: dict) -> str:
    """The final assistant turn's content as one string ('' if there is none)."""
    msgs = record.get("messages")
    if type(msgs) is list and msgs:  # the common record first: its last turn is the answer, a string
        last = msgs[-1]
        if type(last) is dict and last.get("role") == "assistant" and type(last.get("content")) is str:
            return last["content"]
    for m in reversed(msgs or []):
        if m.get("role") == "assistant":
            return content_text(m.get("content"))
    return ""


def prompt_messages(record: dict) -> list[dict]:
    """The conversation up to (not including) the final assistant turn."""
    msgs = list(record.get("messages") or [])
    if msgs and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    return msgs


def context_of(record: dict) -> list[dict]:
    """The record's `context` (turns only the teacher saw) with string contents, or [] for a record without one."""
    return text_messages(record.get("context") or [])


def teacher_messages(record: dict) -> list[dict]:
    """What the teacher saw and answered: `context + messages` (just `messages` for a record without context), with
    string contents."""
    return context_of(record) + text_messages(record.get("messages") or [])


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records atomically (temp file + rename). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for r in records:
                fh.write(dumps(r) + "\n")
                n += 1
    except BaseException:  # a full disk, a signal: `path` stays as it was, and the part-written copy goes
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return n


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Cut a torn (partly written, unterminated) last line left by a crash. Returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # find the last newline; everything after it is a torn write
        pos = size
        chunk = 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            buf = fh.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                fh.truncate(cut)
                return size - cut
            pos = start
        fh.truncate(0)
        return size
