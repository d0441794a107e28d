"""Records whose `content` is a list of text parts (the OpenAI / TRL conversational form), through every stage.

Each stage must read such a turn as its parts' texts joined, so a record in parts form behaves exactly like the same
record with string contents; clean writes it back unchanged; an image or audio part is an error naming file:line,
the field and the part.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate import records
from imitate.cli import app
from imitate.errors import InputError


def parts(text: str, *cuts: int) -> list[dict]:
    """`text` cut at the given offsets into text parts (joined back, they give `text`)."""
    bounds = [0, *cuts, len(text)]
    return [{"type": "text", "text": text[a:b]} for a, b in zip(bounds, bounds[1:])]


def as_parts(messages: list[dict]) -> list[dict]:
    """Every turn's content as two text parts (one when it is too short to cut)."""
    return [{**m, "content": parts(m["content"], len(m["content"]) // 2) if len(m["content"]) > 1
             else parts(m["content"])} for m in messages]  # fmt: skip


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
CHAT = [
    {"role": "system", "content": "Réponds en français."},
    {"role": "user", "content": "Write 347 in words."},
    {"role": "assistant", "content": "trois cent quarante-sept"},
]


# --- the record format ------------------------------------------------------------------------------------------------


def test_parts_read_as_joined_text_in_messages_and_context(tmp_path):
    ctx = [{"role": "system", "content": "Answer in the house format: one line."}]
    p = write(tmp_path / "r.jsonl", [{"messages": as_parts(CHAT), "context": as_parts(ctx)}, {"messages": CHAT}])
    got = [line.data for line in records.read_records(p, need_assistant=True)]
    assert got[0]["messages"] == CHAT and got[0]["context"] == ctx and got[1] == {"messages": CHAT}
    assert records.teacher_messages(got[0]) == ctx + CHAT
    raw = next(records.iter_jsonl(p)).data  # the file itself is untouched: the original form is still there
    assert raw["messages"][1]["content"] == parts("Write 347 in words.", 9)
    assert records.assistant_text(raw) == "trois cent quarante-sept"
    assert records.teacher_messages(raw) == ctx + CHAT and records.context_of(raw) == ctx
    assert records.content_text([]) == ""
    assert records.record_problem({"messages": [{"role": "user", "content": []}]}) is None


@pytest.mark.parametrize(
    ("row", "where"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe:"}, IMAGE]}]},
         "messages[0].content[1] is a 'image_url' part"),
        ({"messages": CHAT, "context": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "context[0].content[0] is a 'input_audio' part"),
        ({"messages": [{"role": "user", "content": ["plain string"]}]}, "messages[0].content[0] is not a {type"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
         "messages[0].content[0] is a text part without a string 'text'"),
        ({"messages": [{"role": "user", "content": {"type": "text", "text": "x"}}]},
         "messages[0].content must be a string or a list of text parts, got dict"),
    ],
)  # fmt: skip
def test_a_part_that_is_not_text_names_file_line_field_and_part(tmp_path, row, where):
    p = write(tmp_path / "r.jsonl", [{"messages": CHAT}, row])
    with pytest.raises(InputError) as err:
        list(records.read_records(p))
    assert str(err.value).startswith(f"{p}:2: {where}")


# --- collect (re-asking a teacher for records' prompts) ---------------------------------------------------------------


def test_collect_reasks_parts_as_joined_text(tmp_path):
    rows = [{"messages": as_parts(CHAT)}, {"messages": as_parts(CHAT[1:2])}]
    src = write(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with FakeServer(latency=0.0) as server:
        args = ["collect", "--prompts", str(src), "--out", str(out), "--teacher", "openai:fake-model",
                "--base-url", server.base_url + "/v1", "--no-progress"]  # fmt: skip
        res = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": "sk-test"})
        assert res.exit_code == 0, res.output
        sent = sorted((h["body"]["messages"] for h in server.history), key=len)
    assert sent == [CHAT[1:2], CHAT[:2]]  # the teacher was asked the joined text, without the old answer
    got = sorted((json.loads(x) for x in out.read_text().splitlines()), key=lambda r: len(r["messages"]))
    params = got[0]["params"]
    assert got[0]["id"] == records.request_id("openai:fake-model", CHAT[1:2], params, 0)  # = the string form's id
    assert got[1]["messages"][:2] == CHAT[:2] and got[1]["messages"][2]["role"] == "assistant"

    bad = write(tmp_path / "bad.jsonl", [rows[0], {"messages": [{"role": "user", "content": [IMAGE]}]}])
    with FakeServer(latency=0.0) as server:
        args[2], args[4] = str(bad), str(tmp_path / "out2.jsonl")
        args[8] = server.base_url + "/v1"
        res = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": "sk-test"})
        assert res.exit_code == 1 and server.count() == 0  # stopped before any request
    assert f"{bad}:2: messages[0].content[0] is a 'image_url' part" in res.stderr and "Hint:" in res.stderr


# --- clean ------------------------------------------------------------------------------------------------------------


def test_clean_reads_parts_as_text_and_writes_them_back_unchanged(tmp_path):
    qa = [("What is the capital of France?", "Paris is the capital of France, on the Seine."),
          ("Write 347 in words.", "three hundred forty-seven"),
          ("Translate 'hello' to German.", "Hallo, so sagt man das auf Deutsch.")]  # fmt: skip
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in qa]
    refusal = "I'm sorry, but I can't help with that request."
    rows = [
        {"id": "a", "messages": as_parts(chats[0])},
        {"id": "b", "messages": as_parts(chats[1]), "context": as_parts(CHAT[:1])},
        {"id": "a-again", "messages": chats[0]},  # the same conversation in string form: an exact duplicate of "a"
        {"id": "refusal", "messages": [chats[2][0], {"role": "assistant", "content": parts(refusal, 5, 20)}]},
        {"id": "c", "messages": as_parts(chats[2])},
    ]
    src = write(tmp_path / "in.jsonl", rows)
    out, rem = tmp_path / "clean.jsonl", tmp_path / "removed.jsonl"
    args = ["clean", str(src), "--out", str(out), "--removed", str(rem), "--json", "--no-near-dedup"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = src.read_text(encoding="utf-8").splitlines()
    assert out.read_text(encoding="utf-8").splitlines() == [lines[0], lines[1], lines[4]]  # byte for byte, parts kept
    removed = {r["id"]: r["removed"] for r in map(json.loads, rem.read_text().splitlines())}
    assert removed["a-again"]["filter"] == "exact_dup" and removed["a-again"]["duplicate_of"] == "a"
    assert removed["refusal"]["filter"] == "refusal"  # the phrase spans three parts

    write(src, [rows[0], {"messages": [chats[0][0], {"role": "assistant", "content": [IMAGE]}]}])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and f"{src}:2: messages[1].content[0] is a 'image_url' part" in res.stderr


# --- train and eval on tiny models ------------------------------------------------------------------------------------


def test_train_encodes_parts_as_the_string_form(tmp_path, tiny_model_dir, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from imitate.train.data import load_examples

    chats = [CHAT, [{"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "one two three"}]]
    plain = write(tmp_path / "plain.jsonl", [{"messages": c} for c in chats])
    split = write(tmp_path / "parts.jsonl", [{"messages": as_parts(c)} for c in chats])
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    a, _ = load_examples([plain], tok, max_length=128)
    b, _ = load_examples([split], tok, max_length=128)
    assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b] and len(a) == 2

    def train(data: Path, out: Path):
        return CliRunner().invoke(app, ["train", "--data", str(data), "--student", str(tiny_model_dir), "--out",
                                        str(out), "--max-steps", "2", "--batch-size", "2", "--eval-split", "0",
                                        "--no-progress", "--json"])  # fmt: skip

    res = train(split, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 2
    write(split, [{"messages": as_parts(CHAT)}, {"messages": [CHAT[1], {"role": "assistant", "content": [IMAGE]}]}])
    res = train(split, tmp_path / "bad")
    assert res.exit_code == 1 and f"{split}:2: messages[1].content[0] is a 'image_url' part" in res.stderr


def test_eval_scores_parts_as_the_string_form(tmp_path, tiny_model_dir):
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("Write 347 in words.", "three hundred forty-seven"), ("hello world", "hello")]]  # fmt: skip

    def evaluate(rows: list[dict], name: str) -> dict:
        f = write(tmp_path / f"{name}.jsonl", rows)
        res = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--prompts", str(f), "--max-tokens",
                                       "4", "--json"])  # fmt: skip
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    plain = evaluate([{"messages": c} for c in chats], "plain")
    split = evaluate([{"messages": as_parts(c)} for c in chats], "parts")
    assert plain["n"] == split["n"] == 2
    assert math.isclose(plain["loss"], split["loss"], rel_tol=1e-6) and plain["agreement"] == split["agreement"]
