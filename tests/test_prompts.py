"""Prompt templates: blocks, built-ins, StrictUndefined errors that name template/variable/line, the sandbox."""

from __future__ import annotations

import pytest

from imitate.collect import templates as prompts
from imitate.errors import InputError, UsageError


def test_plain_template_is_the_user_turn():
    t = prompts.from_string("Q: {{ question }}\nA:", "qa")
    assert t.render({"question": "why?"}) == [{"role": "user", "content": "Q: why?\nA:"}]


def test_blocks_give_system_and_user_turns():
    t = prompts.from_string("{% block system %}Be {{ tone }}.{% endblock %}{% block user %}{{ prompt }}{% endblock %}")
    assert t.render({"tone": "brief", "prompt": "hi"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


def test_builtin_templates_load_and_render():
    names = prompts.builtin_names()
    assert {"default", "chat", "instruction", "self_instruct"} <= set(names)
    assert prompts.render("default", {"prompt": "x"}) == [{"role": "user", "content": "x"}]
    msgs = prompts.render("chat", {"prompt": "x"})
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert prompts.render("instruction", {"instruction": "Sum", "input": "1 2"})[0]["content"] == "Sum\n\nInput:\n1 2"
    assert prompts.render("instruction", {"instruction": "Sum"})[0]["content"] == "Sum"
    si = prompts.render("self_instruct", {"examples": ["a b c", "d e f"], "count": 5})[1]["content"]
    assert "Task 2: d e f" in si and "numbered list" in si


def test_missing_variable_names_template_variable_and_line():
    t = prompts.from_string("{{ title }}: {{ body }}", "mine.j2")
    with pytest.raises(InputError) as err:
        t.render({"title": "x"}, "rows.jsonl:7")
    msg = err.value.message
    assert "rows.jsonl:7" in msg and "'mine.j2'" in msg and "'body'" in msg
    assert "title" in err.value.hint


def test_missing_attribute_is_named():
    t = prompts.from_string("{{ doc.title }}", "t")
    with pytest.raises(InputError, match="'title'"):
        t.render({"doc": {}}, "f:1")


def test_sandbox_blocks_python_internals():
    t = prompts.from_string("{{ ''.__class__.__mro__[1].__subclasses__() }}", "evil")
    with pytest.raises(InputError, match="evil"):
        t.render({})


def test_template_from_path_and_unknown_name(tmp_path):
    p = tmp_path / "mine.j2"
    p.write_text("Hello {{ name }}")
    assert prompts.render(str(p), {"name": "Ada"})[0]["content"] == "Hello Ada"
    with pytest.raises(UsageError) as err:
        prompts.load("no_such_template")
    assert "chat" in err.value.hint  # lists the built-ins


def test_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.j2"
    p.write_text("line one\n{% if x %}never closed")
    with pytest.raises(UsageError, match=r"bad\.j2:\d"):
        prompts.load(p)


def test_empty_user_turn_is_an_error():
    t = prompts.from_string("{% block system %}sys{% endblock %}", "sys-only")
    with pytest.raises(InputError, match="empty user turn"):
        t.render({})
