"""The record's `context`: turns only the teacher saw, kept apart from the student's `messages`."""

from __future__ import annotations

import json

import pytest

from imitate import records
from imitate.errors import InputError

MSGS = [{"role": "user", "content": "2 plus 3?"}, {"role": "assistant", "content": "ANSWER: 5"}]
CTX = [
    {"role": "system", "content": "Answer as 'ANSWER: <number>'."},
    {"role": "user", "content": "1 plus 1?"},
    {"role": "assistant", "content": "ANSWER: 2"},
]


def test_round_trip_with_and_without_context(tmp_path):
    with_ctx = {"id": "a", "teacher": "openai:m", "messages": MSGS, "context": CTX}
    without = {"id": "b", "teacher": "openai:m", "messages": MSGS}
    p = tmp_path / "r.jsonl"
    records.write_jsonl(p, [with_ctx, without])
    got = [line.data for line in records.read_records(p, need_assistant=True)]
    assert got == [with_ctx, without]
    assert records.teacher_messages(got[0]) == CTX + MSGS
    assert records.teacher_messages(got[1]) == MSGS
    assert records.context_of(got[1]) == []
    # the student's view holds none of the context
    assert all(m not in got[0]["messages"] for m in CTX)


def test_request_id_covers_context_and_keeps_old_ids():
    prompt = MSGS[:1]
    old = records.request_id("openai:m", prompt, {}, 0)
    assert records.request_id("openai:m", prompt, {}, 0, context=None) == old
    assert records.request_id("openai:m", prompt, {}, 0, context=[]) == old
    a = records.request_id("openai:m", prompt, {}, 0, context=CTX)
    assert a != old
    assert a != records.request_id("openai:m", prompt, {}, 0, context=CTX[:1])


@pytest.mark.parametrize(
    "context, match",
    [
        ("be brief", r"field 'context' must be a non-empty list"),
        ({"role": "system"}, r"field 'context' must be a non-empty list"),
        ([{"role": "robot", "content": "x"}], r"context\[0\]\.role is 'robot'"),
        ([{"role": "system", "content": 3}], r"context\[0\]\.content must be a string"),
        ([{"role": "system"}], r"context\[0\] must be an object"),
    ],
)
def test_bad_context_names_file_line_and_field(tmp_path, context, match):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"messages": MSGS}) + "\n" + json.dumps({"messages": MSGS, "context": context}) + "\n")
    with pytest.raises(InputError, match=r"r\.jsonl:2: " + match):
        list(records.read_records(p))
    bad: list = []
    assert len(list(records.read_records(p, on_bad_line="skip", bad=bad))) == 1 and bad[0][1] == 2
