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
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file", hint="check the path; relative paths are resolved from the current directory")
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{lineno + 1}: not valid UTF-8 ({exc.reason})") from None
            if not raw:
                break
            lineno += 1
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                reason = f"not valid JSON ({exc.msg} at column {exc.colno})"
                if on_bad_line == "skip":
                    if bad is not None:
                        bad.append((str(path), lineno, reason))
                    continue
                raise InputError(
                    f"{path}:{lineno}: {reason}",
                    hint="each line must be one JSON object; fix or delete that line and run the command again",
                ) from None
            yield Line(path, lineno, data)


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
        if not isinstance(m["content"], str):
            return f"{field}[{i}].content must be a string"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return NO_ASSISTANT
    return None


def _problem_error(where: str, problem: str) -> InputError:
    hint = "records to train on need the teacher's answer" if problem == NO_ASSISTANT else None
    return InputError(f"{where}: {problem}", hint=hint)


def check_messages(messages: Any, where: str, *, need_assistant: bool = False) -> list[dict]:
    """Validate a chat list; `where` is "file:line" for the error message."""
    problem = messages_problem(messages, need_assistant=need_assistant)
    if problem:
        raise _problem_error(where, problem)
    return messages


def read_records(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    on_bad_line: str = "error",
    bad: list | None = None,
    need_assistant: bool = False,
) -> Iterator[Line]:
    """Yield records (as Lines) from one or more JSONL files, checking the fields every stage relies on."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        for line in iter_jsonl(p, on_bad_line=on_bad_line, bad=bad):
            problem = record_problem(line.data, need_assistant=need_assistant)
            if problem is None:
                yield line
            elif on_bad_line == "skip":
                if bad is not None:
                    bad.append((str(line.path), line.lineno, problem))
            else:
                raise _problem_error(f"{line.path}:{line.lineno}", problem)


def assistant_text(record: dict) -> str:
    """The final assistant turn's content ('' if there is none)."""
    for m in reversed(record.get("messages") or []):
        if m.get("role") == "assistant":
            return m.get("content") or ""
    return ""


def prompt_messages(record: dict) -> list[dict]:
    """The conversation up to (not including) the final assistant turn."""
    msgs = list(record.get("messages") or [])
    if msgs and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    return msgs


def context_of(record: dict) -> list[dict]:
    """The record's `context` (turns only the teacher saw), or [] for a record without one."""
    return list(record.get("context") or [])


def teacher_messages(record: dict) -> list[dict]:
    """What the teacher saw and answered: `context + messages` (just `messages` for a record without context)."""
    return context_of(record) + list(record.get("messages") or [])


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records atomically (temp file + rename). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(dumps(r) + "\n")
            n += 1
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
