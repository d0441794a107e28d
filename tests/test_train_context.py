"""`imitate train` on records with `context`: the student trains on `messages` alone, a white-box teacher grades the
same answer tokens with the context in front (logit KD, feature KD, on-policy), and a teacher whose template renders the
answer differently is refused. Tiny models, naive references."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_distill import write
from test_train import cfg_for as sft_cfg
from test_train import invoke, metrics

from imitate.train.data import IGNORE, collate, encode, load_examples, shift_targets
from imitate.train.loop import run

# the context holds a token no record's messages use (<|tool|>), so "the student never saw it" is checkable
CONTEXT = [
    {"role": "system", "content": "<|tool|> Answer tersely, in words."},
    {"role": "user", "content": "Write 347 in words."},
    {"role": "assistant", "content": "three hundred forty-seven"},
]
MESSAGES = [  # shapes: arithmetic, number words, a multi-turn chat, non-English, code, a long answer
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "forty-two"}],
    [{"role": "user", "content": "Count to 5 in words."}, {"role": "assistant", "content": "one two three four five"}],
    [{"role": "user", "content": "Écris trois en lettres."}, {"role": "assistant", "content": "trois"},
     {"role": "user", "content": "Et sept ?"}, {"role": "assistant", "content": "sept, comme les sept jours"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "def f(x): return x*2  # what is f(21)?"}, {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 3 + "hello world"}],
    [{"role": "user", "content": "Translate: the quick brown fox"}, {"role": "assistant", "content": "der Fuchs"}],
]


def records(context=CONTEXT) -> list[dict]:
    return [{"messages": m, **({"context": context} if context else {})} for m in MESSAGES]


def cfg_for(data, student, out, **kw):
    return sft_cfg(data, student, out, **{"eval_split": 0, "lora_dropout": 0.0, **kw})


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def tool_id(tok) -> int:
    return tok.convert_tokens_to_ids("<|tool|>")


def test_student_examples_hold_only_messages_and_the_teacher_view_shares_the_answer(tiny_model_dir, tmp_path):
    _, tok = load(tiny_model_dir)
    data = write(tmp_path / "d.jsonl", records())
    for loss_on in ("final", "all"):
        exs, _ = load_examples([data], tok, max_length=256, loss_on=loss_on, teacher_tokenizer=tok)
        for ex, m in zip(exs, MESSAGES):
            ids, mask = encode(tok, m, loss_on)
            assert ex.input_ids == ids and tool_id(tok) not in ex.input_ids  # the student's view: messages only
            assert tool_id(tok) in ex.teacher_ids  # the teacher's: context in front
            t_ids, _ = encode(tok, CONTEXT + m)
            assert ex.teacher_ids == t_ids
            # the same answer tokens are targets on both sides, never the context's example answer
            assert [t for t in ex.labels if t != IGNORE] == [t for t in ex.teacher_labels if t != IGNORE]
    # --max-length cuts the student's side; the teacher keeps exactly as many targets
    exs, _ = load_examples([data], tok, max_length=40, teacher_tokenizer=tok)
    for ex in exs:
        assert [t for t in ex.labels if t != IGNORE] == [t for t in ex.teacher_labels if t != IGNORE]
    # without a white-box teacher no teacher view is built
    exs, _ = load_examples([data], tok, max_length=256)
    assert all(ex.teacher_ids is None for ex in exs)


def spy(monkeypatch, target: str, seen: list) -> None:
    """Wrap a loader so every forward of the model it returns records its input_ids."""
    import importlib

    mod_name, fn_name = target.rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    orig = getattr(mod, fn_name)

    def wrapped(*a, **kw):
        model = orig(*a, **kw)
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                        with_kwargs=True)
        return model

    monkeypatch.setattr(mod, fn_name, wrapped)


@pytest.mark.parametrize("packing", [False, True])
def test_kd_teacher_logits_are_taken_after_the_context(packing, tiny_model_dir, tiny_teacher_dir, tmp_path,
                                                       monkeypatch):
    """Step 1's logged KD (LoRA B = 0: the student is its base model) == a full-logit reference where the teacher
    reads context + messages and the student messages alone; the student's inputs never hold a context token."""
    student_in, teacher_in = [], []
    spy(monkeypatch, "imitate.train.loop.load_student", student_in)
    spy(monkeypatch, "imitate.train.distill.load_teacher", teacher_in)
    data = write(tmp_path / "d.jsonl", records())
    run(cfg_for(data, tiny_model_dir, tmp_path / "o", teacher=f"hf:{tiny_teacher_dir}", kd="forward-kl",
                temperature=1.3, max_steps=1, batch_size=3, grad_accum=2, kd_chunk_size=5, packing=packing))
    row = metrics(tmp_path / "o")[0]
    student, tok = load(tiny_model_dir)
    teacher, _ = load(tiny_teacher_dir)
    assert student_in and all(tool_id(tok) not in x for x in student_in)
    # every record's teacher row held the context (a window's padding micro-batch has no records: no teacher view)
    assert sum(int((x == tool_id(tok)).any(dim=1).sum()) for x in teacher_in) == len(MESSAGES)

    def reference(with_context: bool) -> tuple[float, int]:
        T, kl, n = 1.3, 0.0, 0
        with torch.no_grad():
            for m in MESSAGES:
                ids, mask = encode(tok, m)
                t_ids, t_mask = encode(tok, (CONTEXT if with_context else []) + m)
                lab, t_lab = torch.tensor(shift_targets(ids, mask)), torch.tensor(shift_targets(t_ids, t_mask))
                keep, t_keep = lab != IGNORE, t_lab != IGNORE
                taught = keep & (torch.tensor(ids) != tok.eos_token_id)  # no KD on the template's text after <|end|>
                t_taught = t_keep & (torch.tensor(t_ids) != tok.eos_token_id)
                s = student(input_ids=torch.tensor([ids])).logits[0].double()[taught]
                t = teacher(input_ids=torch.tensor([t_ids])).logits[0].double()[t_taught]
                kl += F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                               reduction="sum").item() * T * T
                n += int(keep.sum())
        return kl / n, n

    with_ctx, _ = reference(True)
    assert row["logit_kd"] == pytest.approx(with_ctx, rel=1e-4)
    assert row["logit_kd"] != pytest.approx(reference(False)[0], rel=1e-2)  # the context changes what is taught


def test_feature_kd_pairs_the_teacher_layer_at_the_same_answer_tokens(tiny_model_dir, tiny_teacher_dir, tmp_path):
    """The teacher's hidden states moved to the student's positions (packed student rows, padded teacher rows) equal
    the teacher's hidden states at the same answer tokens computed on context + messages one record at a time."""
    from imitate.train.context import realign

    teacher, tok = load(tiny_teacher_dir)
    data = write(tmp_path / "d.jsonl", records()[:2] + [{"messages": MESSAGES[2]}] + records()[3:])  # one without
    exs, _ = load_examples([data], tok, max_length=256, teacher_tokenizer=tok)
    batch = collate(exs, pad_id=tok.pad_token_id, packing=True)
    with torch.no_grad():
        out = teacher(**{k: batch["teacher"][k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        moved = realign(out, batch).hidden_states[2][0]  # [N, H]: the packed student row
        want, offset = torch.zeros_like(moved), 0
        for ex, r in zip(exs, json.loads("[" + ",".join(data.read_text().splitlines()) + "]")):
            t_ids, t_mask = encode(tok, r.get("context", []) + r["messages"])
            t_lab = torch.tensor(shift_targets(t_ids, t_mask))
            h = teacher(input_ids=torch.tensor([t_ids]), output_hidden_states=True).hidden_states[2][0]
            pos = torch.tensor([offset + t for t, x in enumerate(ex.labels) if x != IGNORE])
            want[pos] = h[t_lab != IGNORE]
            offset += len(ex.input_ids)
    torch.testing.assert_close(moved, want, rtol=1e-4, atol=1e-5)


def test_on_policy_student_writes_without_the_context_teacher_grades_with_it(tiny_model_dir, tiny_teacher_dir,
                                                                             tmp_path):
    """λ = 1, greedy: the logged on-policy KD == a naive reverse KL where the student's answer is generated from the
    prompt WITHOUT the context and the teacher's logits on the same answer tokens are taken WITH it."""
    from test_onpolicy import greedy_naive

    from imitate.models import eos_ids, prompt_ids

    data = write(tmp_path / "d.jsonl", records())
    run(cfg_for(data, tiny_model_dir, tmp_path / "o", teacher=f"hf:{tiny_teacher_dir}", kd="reverse-kl",
                on_policy=1.0, on_policy_warmup=0.0, on_policy_temperature=0.0, on_policy_max_tokens=6,
                batch_size=6, max_steps=1))
    row = metrics(tmp_path / "o")[0]
    student, tok = load(tiny_model_dir)
    teacher, _ = load(tiny_teacher_dir)
    stop = set(eos_ids(student, tok))

    def reference(with_context: bool) -> float:
        kd, n = 0.0, 0
        with torch.no_grad():
            for m in MESSAGES:
                s_prompt = prompt_ids(tok, m[:-1])
                assert tool_id(tok) not in s_prompt
                answer = greedy_naive(student, s_prompt, stop, 6)
                t_prompt = prompt_ids(tok, (CONTEXT if with_context else []) + m[:-1])
                k = len(answer)
                s = student(input_ids=torch.tensor([s_prompt + answer])).logits[0, -k - 1 : -1].double()
                t = teacher(input_ids=torch.tensor([t_prompt + answer])).logits[0, -k - 1 : -1].double()
                kd += F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="sum").item()
                n += k
        return kd / n

    assert row["onpolicy/share"] == 1.0
    assert row["onpolicy_kd"] == pytest.approx(reference(True), rel=1e-4)
    assert row["onpolicy_kd"] != pytest.approx(reference(False), rel=1e-2)


def test_cli_sckd_feature_kd_with_context_and_a_refused_teacher(tiny_model_dir, tiny_teacher_dir, tmp_path):
    data = write(tmp_path / "d.jsonl", records())
    res = invoke("--data", data, "--student", tiny_model_dir, "--teacher", f"hf:{tiny_teacher_dir}", "--sckd",
                 "--feature-kd", "auto", "--out", tmp_path / "kd", "--max-steps", "2", "--batch-size", "3",
                 "--eval-split", "0", "--no-progress", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["distill"]["terms"] == ["logit_kd", "feature_s1_t2", "feature_s2_t3"]
    # a teacher whose chat template renders the answer differently (upper case): KD is refused, naming the record
    other = tmp_path / "upper"
    shutil.copytree(tiny_teacher_dir, other)
    conf = json.loads((other / "tokenizer_config.json").read_text())
    from tiny import CHAT_TEMPLATE

    upper = CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    conf["chat_template"] = upper
    (other / "tokenizer_config.json").write_text(json.dumps(conf))
    if (other / "chat_template.jinja").exists():
        (other / "chat_template.jinja").write_text(upper)
    res = invoke("--data", data, "--student", tiny_model_dir, "--teacher", f"hf:{other}", "--out", tmp_path / "x",
                 "--max-steps", "1", "--no-progress")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "d.jsonl:1: the answer's tokens differ after the context" in res.output
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()
    # the same records without a teacher train (SFT on messages), and without context the teacher is accepted
    assert invoke("--data", data, "--student", tiny_model_dir, "--out", tmp_path / "sft", "--max-steps", "1",
                  "--no-progress").exit_code == 0
    plain = write(tmp_path / "plain.jsonl", records(context=None))
    assert invoke("--data", plain, "--student", tiny_model_dir, "--teacher", f"hf:{other}", "--out", tmp_path / "p",
                  "--max-steps", "1", "--no-progress").exit_code == 0


def test_teacher_ids_put_in_by_the_round_trip_check_reach_the_teacher_view(tiny_model_dir, tiny_teacher_dir,
                                                                           tmp_path):
    """An hf teacher's generated ids that re-tokenizing its text does not give back (one token a character here) replace
    the student's answer tokens (teacher_tokens.check_teacher_tokens); the teacher view must grade those same ids, with
    the context still in front, and training runs (it stopped with 'target counts differ' before)."""
    _, tok = load(tiny_model_dir)

    def char_ids(text):
        pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        return [tok.convert_tokens_to_ids(c) for p in pieces for c in p]

    recs = [{**r, "teacher": f"hf:{tiny_teacher_dir}", "answer_token_ids": char_ids(r["messages"][-1]["content"])}
            for r in records()]
    assert any(len(r["answer_token_ids"]) > len(tok(r["messages"][-1]["content"])["input_ids"]) for r in recs)
    data = write(tmp_path / "d.jsonl", recs)
    summary = run(cfg_for(data, tiny_model_dir, tmp_path / "o", teacher=f"hf:{tiny_teacher_dir}", max_steps=1,
                          batch_size=6))
    assert summary["data"]["teacher_tokens"]["retokenized"] >= 3
    from imitate.train.teacher_tokens import check_teacher_tokens

    exs, _ = load_examples([data], tok, max_length=256, teacher_tokenizer=tok)
    check_teacher_tokens(exs, tok, 256)
    from imitate.train.context import resplice

    resplice(exs)
    for ex, r in zip(exs, recs):
        s_t = [t for t in ex.labels if t != IGNORE]
        assert s_t == [t for t in ex.teacher_labels if t != IGNORE]
        assert s_t[: len(r["answer_token_ids"])] == r["answer_token_ids"]
        assert tool_id(tok) in ex.teacher_ids and tool_id(tok) not in ex.input_ids
