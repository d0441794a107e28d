"""The trained text is what the teacher wrote (issue #10): hf teachers record their generated ids, a template's separator
is not doubled, the round-trip check finds answers that do not tokenize back, KD refuses them; thread selection."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny import make_model
from typer.testing import CliRunner

from imitate.cli import app
from imitate.collect.teachers import Request
from imitate.config import build
from imitate.errors import InputError
from imitate.models import choose_threads
from imitate.train.data import encode, load_examples, without_doubled_separators
from imitate.train.loop import TrainConfig, run
from imitate.train.teacher_tokens import check_teacher_tokens, refuse_token_mismatch

# a space between the role and the content, while the generation prompt stops at the role (many real templates do this)
SPACE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ["Write 347 in words.", "What is the capital of France?", "hello world", "Explain why: seven eight",
           "quick brown fox?", "twelve thirteen", "Translate: one two three", "how? what?"]
ANSWERS = ["three hundred forty-seven", "Paris is the capital of France.", "hello", "because 0123",
           "the lazy dog", "fourteen", "four five six", "why"]


@pytest.fixture(scope="module")
def space_dirs(tmp_path_factory, tiny_tokenizer_dir):
    """(student, teacher) tiny models sharing a tokenizer whose chat template writes a space after the role."""
    tok_dir = tmp_path_factory.mktemp("space_tok")
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, tok_dir / f.name)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = SPACE_TEMPLATE
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tok_dir / "chat_template.jinja").unlink(missing_ok=True)
    student, teacher = tmp_path_factory.mktemp("space_s"), tmp_path_factory.mktemp("space_t")
    make_model(student, tokenizer_dir=tok_dir, hidden_size=32, num_layers=2, seed=0)
    make_model(teacher, tokenizer_dir=tok_dir, hidden_size=48, num_layers=2, seed=1)
    return student, teacher


def tok_of(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


def records(path, teacher_dir, tok, answers, *, lead: str, ids_of=None):
    """Records as `imitate collect` writes them for an hf teacher: the text as generated (`lead` + answer) and the
    generated ids (`ids_of(text)`, default: the text's own tokens)."""
    with open(path, "w") as fh:
        for p, a in zip(PROMPTS * 4, answers * 4):
            text = lead + a
            ids = (ids_of or (lambda t: tok(t, add_special_tokens=False)["input_ids"]))(text)
            rec = {"teacher": f"hf:{teacher_dir}", "messages": [{"role": "user", "content": p},
                                                                  {"role": "assistant", "content": text}],
                   "answer_token_ids": ids}
            fh.write(json.dumps(rec) + "\n")
    return path


def test_separator_the_answer_already_has_is_not_doubled(space_dirs, tiny_model_dir):
    tok = tok_of(space_dirs[0])
    msgs = [{"role": "user", "content": "Write 347 in words."}, {"role": "assistant", "content": " three hundred"}]
    assert without_doubled_separators(tok, msgs)[1]["content"] == "three hundred"
    assert msgs[1]["content"] == " three hundred"  # the record is not modified
    clean = [msgs[0], {"role": "assistant", "content": "three hundred"}]
    assert encode(tok, msgs) == encode(tok, clean)
    # the rendered answer continues the generation prompt with exactly the teacher's tokens
    ids, mask = encode(tok, msgs)
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids[: len(prompt)] == list(prompt)
    answer = tok(" three hundred", add_special_tokens=False)["input_ids"]
    assert ids[len(prompt) : len(prompt) + len(answer)] == answer and all(mask[len(prompt) : len(prompt) + len(answer)])
    # a template whose generation prompt already holds the separator: a leading space is the answer's own text, kept
    plain = tok_of(tiny_model_dir)
    assert without_doubled_separators(plain, msgs) is msgs
    assert plain.decode(encode(plain, msgs)[0]).count("\n three hundred") == 1


def test_round_trip_check_catches_a_template_that_adds_a_separator(space_dirs, tmp_path):
    """The teacher wrote "Paris..." right after `<|assistant|>`; the student's template puts a space there."""
    student, teacher = space_dirs
    tok = tok_of(student)
    bad = records(tmp_path / "bad.jsonl", teacher, tok, ANSWERS, lead="")
    ex, _ = load_examples([bad], tok, max_length=64)
    rep = check_teacher_tokens(ex, tok)
    assert rep["checked"] == len(ex) and rep["mismatched"] == len(ex) and rep["first"][0].startswith(str(bad))
    with pytest.raises(InputError) as err:
        refuse_token_mismatch(rep)
    assert "--chat-template" in err.value.hint
    # the same answers as the teacher really generated them (leading space, as after its generation prompt): clean
    good = records(tmp_path / "good.jsonl", teacher, tok, ANSWERS, lead=" ")
    ex, _ = load_examples([good], tok, max_length=64)
    rep = check_teacher_tokens(ex, tok)
    assert rep["checked"] == len(ex) and rep["mismatched"] == 0
    refuse_token_mismatch(rep)  # no error
    # records of a teacher with another tokenizer are not checked, not counted as mismatches
    other = tmp_path / "other"
    make_model(other, hidden_size=32, num_layers=1, vocab_size=300, seed=3)
    ex, _ = load_examples([records(tmp_path / "o.jsonl", other, tok, ANSWERS, lead="")], tok, max_length=64)
    assert check_teacher_tokens(ex, tok)["unchecked"] == len(ex)


def test_kd_refuses_mismatched_records_through_the_cli(space_dirs, tmp_path):
    student, teacher = space_dirs
    data = records(tmp_path / "bad.jsonl", teacher, tok_of(student), ANSWERS, lead="")
    args = ["train", "--data", str(data), "--student", str(student), "--out", str(tmp_path / "o"), "--full",
            "--max-steps", "1", "--eval-split", "0", "--save-every", "0", "--no-progress"]
    res = CliRunner().invoke(app, args + ["--teacher", f"hf:{teacher}"])
    assert res.exit_code == 1, res.output
    assert "Error:" in res.output and "do not tokenize back" in res.output and "Hint:" in res.output
    # SFT trains, and its summary reports the mismatches
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["data"]["teacher_tokens"]["mismatched"] == summary["data"]["teacher_tokens"]["checked"] == 32


def test_kd_on_teacher_text_matches_kd_on_clean_text(space_dirs, tmp_path):
    """Answers that start with the template's separator (as the teacher generated them) train exactly like answers
    without it: same examples, same KD losses step for step."""
    student, teacher = space_dirs
    tok = tok_of(student)
    as_generated = records(tmp_path / "gen.jsonl", teacher, tok, ANSWERS, lead=" ")
    clean = records(tmp_path / "clean.jsonl", teacher, tok, ANSWERS, lead="",
                    ids_of=lambda t: tok(" " + t, add_special_tokens=False)["input_ids"])
    a, _ = load_examples([as_generated], tok, max_length=64)
    b, _ = load_examples([clean], tok, max_length=64)
    assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]
    summaries = []
    for data, out in ((as_generated, "a"), (clean, "b")):
        cfg = build(TrainConfig, dict(data=[str(data)], student=str(student), out=str(tmp_path / out), full=True,
                                      max_steps=3, batch_size=4, lr=5e-3, eval_split=0.0, save_every=0,
                                      progress=False, teacher=f"hf:{teacher}"))
        summaries.append(run(cfg))
    assert summaries[0]["data"]["teacher_tokens"]["mismatched"] == 0
    assert summaries[0]["data"]["teacher_tokens"]["checked"] == 32
    ra = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["logit_kd"]) for r in ra] == [(r["loss"], r["logit_kd"]) for r in rb]


def test_hf_teacher_records_its_generated_ids_and_exact_text(tiny_model_dir, tmp_path):
    from imitate.collect.teachers.local import LocalTeacher

    teacher = LocalTeacher(str(tiny_model_dir), batch_size=4)
    reqs = [Request(id=str(i), messages=[{"role": "user", "content": p}],
                    params={"temperature": 1.0, "max_tokens": 12, "seed": i}) for i, p in enumerate(PROMPTS[:4])]
    tok = tok_of(tiny_model_dir)
    for c in teacher.complete_sync(reqs):
        ids = c.extra["answer_token_ids"]
        assert ids and tok.decode(ids, clean_up_tokenization_spaces=False) == c.text
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    out = tmp_path / "rec.jsonl"
    res = CliRunner().invoke(app, ["collect", "--teacher", f"hf:{tiny_model_dir}", "--prompts", str(prompts),
                                   "--out", str(out), "--max-tokens", "8", "--temperature", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(tok.decode(r["answer_token_ids"]) == r["messages"][-1]["content"] for r in recs)
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out), split="train")  # the schema still loads with datasets
    assert ds[0]["answer_token_ids"] == recs[0]["answer_token_ids"]


def test_threads_by_model_size():
    assert choose_threads(130_000, cpus=16, env={}) == 1  # the demo student: tiny
    assert choose_threads(30_000_000, cpus=16, env={}) == 4
    assert choose_threads(30_000_000, cpus=2, env={}) == 2
    assert choose_threads(500_000_000, cpus=16, env={}) == 16
    assert choose_threads(500_000_000, cpus=16, requested=3, env={}) == 3  # --threads wins
    assert choose_threads(130_000, cpus=16, env={"OMP_NUM_THREADS": "6"}) == 6  # so does the user's environment
    assert choose_threads(130_000, cpus=16, requested=2, env={"OMP_NUM_THREADS": "6"}) == 2


def test_threads_option_reaches_torch(tiny_model_dir, tmp_path):
    import torch

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for p, a in zip(PROMPTS, ANSWERS)))
    before = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["train", "--data", str(data), "--student", str(tiny_model_dir), "--out",
                                       str(tmp_path / "o"), "--max-steps", "1", "--eval-split", "0", "--threads",
                                       "2", "--no-progress"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 2
        res = CliRunner().invoke(app, ["train", "--data", str(data), "--student", str(tiny_model_dir), "--out",
                                       str(tmp_path / "z"), "--threads", "0"])
        assert res.exit_code != 0 and "--threads" in res.output
    finally:
        torch.set_num_threads(before)


def test_same_text_in_other_tokens_trains_on_the_teachers_ids(space_dirs, tmp_path):
    """A real model often samples a tokenization of its answer that re-tokenizing the text does not give back (one
    character a token here, where the tokenizer merges). The text is what the teacher wrote, so the example takes the
    teacher's ids (not a mismatch, KD is not refused), and the end-of-turn marker stays the template's."""
    student, teacher = space_dirs
    tok = tok_of(student)

    def char_ids(text):  # the same text, one token per character (all in the byte-level alphabet)
        return [tok.convert_tokens_to_ids(c) for c in tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)
                                                                                 ["input_ids"]) for c in c]

    data = records(tmp_path / "chars.jsonl", teacher, tok, ANSWERS, lead=" ", ids_of=char_ids)
    canonical, _ = load_examples([records(tmp_path / "c.jsonl", teacher, tok, ANSWERS, lead=" ")], tok, max_length=64)
    ex, _ = load_examples([data], tok, max_length=64)
    assert all(tok.unk_token_id not in char_ids(" " + a) for a in ANSWERS)
    assert sum(len(char_ids(" " + a)) > len(tok(" " + a, add_special_tokens=False)["input_ids"]) for a in ANSWERS) >= 4
    rep = check_teacher_tokens(ex, tok, max_length=64)
    assert rep["mismatched"] == 0 and rep["retokenized"] >= 16 and rep["checked"] == len(ex)
    for e, c, (p, a) in zip(ex, canonical, zip(PROMPTS * 4, ANSWERS * 4)):
        targets = [x for x in e.labels if x != -100]
        want = char_ids(" " + a)
        assert targets[: len(want)] == want  # the answer trains on the teacher's ids
        assert targets[len(want):] == [x for x in c.labels if x != -100][-(len(targets) - len(want)):]  # end marker
        assert tok.decode(e.input_ids) == tok.decode(c.input_ids)  # the same text
    refuse_token_mismatch(rep)  # no error
    # a text that differs (the template's separator) is still a mismatch, not re-tokenized
    bad, _ = load_examples([records(tmp_path / "bad.jsonl", teacher, tok, ANSWERS, lead="", ids_of=char_ids)], tok,
                           max_length=64)
    rep = check_teacher_tokens(bad, tok, max_length=64)
    assert rep["retokenized"] == 0 and rep["mismatched"] == len(bad)
