"""Records -> tokens with assistant-only targets, the batch plan and the collator (imitate.train.data)."""

from __future__ import annotations

import json

import pytest

from imitate.errors import InputError, UsageError
from imitate.train.data import (
    IGNORE,
    Example,
    collate,
    encode,
    load_examples,
    plan_batches,
    shift_targets,
    split_eval,
    teacher_written,
)

CONV = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write 347 in words."},
    {"role": "assistant", "content": "three hundred forty-seven"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def reference_mask(tok, messages: list[dict], turns: list[int]) -> list[bool]:
    """Naive reference: a token is a target iff it lies between the tokens of the prompt rendered up to turn i (with
    the generation prompt) and the tokens of the conversation rendered through turn i."""
    full = ids_of(tok, tok.apply_chat_template(messages, tokenize=False))
    mask = [False] * len(full)
    for i in turns:
        before = ids_of(tok, tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        through = ids_of(tok, tok.apply_chat_template(messages[: i + 1], tokenize=False))
        assert full[: len(before)] == before and full[: len(through)] == through
        for t in range(len(before), len(through)):
            mask[t] = True
    return mask


def test_mask_final_turn_token_by_token(tok):
    ids, mask = encode(tok, CONV, "final")
    assert mask == reference_mask(tok, CONV, [4])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "Paris is the capital of France.<|end|>\n"
    # every token before the answer (system, user, the first answer, role headers) is masked
    first = mask.index(True)
    assert not any(mask[:first]) and all(mask[first:])


def test_mask_all_turns_token_by_token(tok):
    ids, mask = encode(tok, CONV, "all")
    assert mask == reference_mask(tok, CONV, [2, 4])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == (
        "three hundred forty-seven<|end|>\nParis is the capital of France.<|end|>\n"
    )
    # the user turn between the answers is not a target
    assert "What" not in tok.decode([t for t, m in zip(ids, mask) if m])


def test_mask_with_chatml_template(tiny_tokenizer_dir):
    """A second template shape (ChatML, with a default system prompt injected like Qwen's)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|system|>default<|end|>{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    conv = CONV[1:3]
    ids, mask = encode(tok, conv, "final")
    assert mask == reference_mask(tok, conv, [1])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "three hundred forty-seven<|end|>"


def test_shift_targets_is_next_token():
    ids, mask = [5, 6, 7, 8], [False, False, True, True]
    assert shift_targets(ids, mask) == [IGNORE, 7, 8, IGNORE]


def test_missing_chat_template_names_flag(tmp_path):
    from tiny import make_tokenizer

    from imitate.train.data import check_chat_template

    tok = make_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(UsageError) as err:
        check_chat_template(tok, "some/student")
    assert "--chat-template FILE" in err.value.hint


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_examples_errors_name_file_and_line(tmp_path, tok):
    good = {"messages": CONV[1:3]}
    bad_json = write(tmp_path / "a.jsonl", [good, "{not json"])
    with pytest.raises(InputError, match=r"a\.jsonl:2"):
        load_examples([bad_json], tok, max_length=64)
    no_answer = write(tmp_path / "b.jsonl", [good, good, {"messages": CONV[:2]}])
    with pytest.raises(InputError, match=r"b\.jsonl:3: no assistant turn"):
        load_examples([no_answer], tok, max_length=64)


def test_overlong_truncate_and_drop_are_counted(tmp_path, tok):
    long = {"messages": [CONV[1], {"role": "assistant", "content": "one two three " * 40}]}
    short = {"messages": CONV[1:3]}
    f = write(tmp_path / "c.jsonl", [short, long, short])
    ex, st = load_examples([f], tok, max_length=40, overlong="truncate")
    assert len(ex) == 3 and st.truncated == 1 and st.longest > 40
    assert all(len(e.input_ids) <= 40 for e in ex) and "c.jsonl:2" in st.examples_overlong[0]
    ex, st = load_examples([f], tok, max_length=40, overlong="drop")
    assert len(ex) == 2 and st.dropped_overlong == 1
    # a prompt longer than max_length leaves no answer token: dropped and counted, never trained on empty
    ex, st = load_examples([f], tok, max_length=8, overlong="truncate")
    assert len(ex) == 0 and st.dropped_no_target == 3


def test_plan_covers_every_example_once_and_is_deterministic():
    lengths = [(i * 37) % 50 + 3 for i in range(103)]
    for packing in (False, True):
        p1 = plan_batches(lengths, 4, seed=1, epoch=0, packing=packing, max_length=60)
        assert p1 == plan_batches(lengths, 4, seed=1, epoch=0, packing=packing, max_length=60)
        assert p1 != plan_batches(lengths, 4, seed=1, epoch=1, packing=packing, max_length=60)
        assert sorted(i for b in p1 for i in b) == list(range(103))
        if packing:
            assert all(sum(lengths[i] for i in b) <= 4 * 60 for b in p1)
        else:
            assert all(len(b) <= 4 for b in p1)


def test_batches_mix_templates_by_default():
    """Prompts from a few templates: length is the template. Every batch must hold a mix, not one kind of question
    (length-grouped batches gave the student one template per step; issue #10)."""
    import random

    rng = random.Random(5)
    template = [rng.randrange(3) for _ in range(600)]  # three templates with distinct lengths, as users' data has
    lengths = [(20, 31, 47)[t] + rng.randrange(3) for t in template]
    for packing, size in ((False, 16), (True, 2)):
        plans = [plan_batches(lengths, size, seed=0, epoch=e, packing=packing, max_length=64) for e in range(3)]
        for plan in plans:
            assert sorted(i for b in plan for i in b) == list(range(600))
            mixed = [b for b in plan if len({template[i] for i in b}) > 1 and len(b) >= 4]
            assert len(mixed) >= 0.9 * sum(len(b) >= 4 for b in plan)
            # and the kinds are spread over the epoch: the first tenth of the batches covers all three templates
            assert {template[i] for b in plan[: len(plan) // 10] for i in b} == {0, 1, 2}
        assert plans[0] != plans[1] != plans[2]  # a fresh shuffle each epoch


def test_split_eval_is_disjoint_and_seeded():
    tr, ev = split_eval(100, 0.05, seed=3)
    assert len(ev) == 5 and not set(tr) & set(ev) and len(tr) + len(ev) == 100
    assert (tr, ev) == split_eval(100, 0.05, seed=3) and ev != split_eval(100, 0.05, seed=4)[1]
    assert split_eval(10, 0.0, 0)[1] == []


def test_collate_padded_and_packed():
    a = Example([1, 2, 3], [2, 3, IGNORE], "a")
    b = Example([4, 5], [IGNORE, IGNORE], "b")
    padded = collate([a, b], pad_id=0, packing=False)
    assert padded["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["labels"].tolist() == [[2, 3, IGNORE], [IGNORE] * 3]
    assert padded["n_targets"] == 2 and padded["n_tokens"] == 5
    packed = collate([a, b], pad_id=0, packing=True)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in packed


def naive_teacher_written(ids: list[int], labels: list[int], end_ids: set[int]) -> list[int]:
    """Walk the row: inside a run of targets, once the input token is an end-of-turn token, no later target of the run
    was written by the teacher."""
    out, after = list(labels), False
    for t, (x, y) in enumerate(zip(ids, labels)):
        if y == IGNORE:
            after = False
            continue
        after = after or x in end_ids
        if after:
            out[t] = IGNORE
    return out


def test_teacher_written_cuts_what_the_template_writes_after_a_turn(tok):
    """On real renderings (one and two trained turns, padded and packed): the KD labels stop at each turn's end token;
    CE's labels keep the template's "\n" after it. Then random rows against the naive walk."""
    import random

    import torch

    end = tok.eos_token_id
    for loss_on, answers in (("final", ["Paris is the capital of France."]),
                             ("all", ["three hundred forty-seven", "Paris is the capital of France."])):
        ids, mask = encode(tok, CONV, loss_on)
        ex = Example(ids, shift_targets(ids, mask), "x")
        short = Example(*(lambda i, m: (i, shift_targets(i, m)))(*encode(tok, CONV[:3], loss_on)), "y")
        for packing in (False, True):
            batch = collate([ex, short], pad_id=tok.pad_token_id, packing=packing)
            kd = teacher_written(batch["input_ids"], batch["labels"], [end])
            row = kd[0].tolist()
            got = tok.decode([t for t in row[: len(ids)] if t != IGNORE])
            assert got == "<|end|>".join(answers) + "<|end|>"  # every turn through its end token, no "\n"
            ce = [t for t in batch["labels"][0].tolist()[: len(ids)] if t != IGNORE]
            assert tok.decode(ce).endswith("<|end|>\n")
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        ids = [rng.choice([1, 2, 3, 9]) for _ in range(n)]
        labels = [rng.choice([IGNORE, 5, 6]) if rng.random() < 0.6 else IGNORE for _ in range(n)]
        got = teacher_written(torch.tensor([ids]), torch.tensor([labels]), [9, 3]).tolist()[0]
        assert got == naive_teacher_written(ids, labels, {9, 3})
