"""The hf teacher on a tiny random Llama: mechanics (padding, lengths, logprobs, grouping, errors), not quality."""

from __future__ import annotations

import asyncio
import math
import shutil

import pytest
from tiny import copy_without_chat_template

from imitate.collect.teachers import Request
from imitate.collect.teachers.local import LocalTeacher
from imitate.errors import ImitateError
from imitate.models import generate_batch, left_pad, load_model

# prompts of clearly different token lengths, so a batch needs padding
CHATS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France? Explain, summarize, translate."},
    ],
    [{"role": "user", "content": "Write 347 in words."}],
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def req(i: int, messages: list[dict], **params) -> Request:
    return Request(id=f"r{i}", messages=messages, params=params)


def test_left_pad_right_aligns_rows():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_equals_one_by_one(loaded):
    model, tok = loaded
    batch = generate_batch(model, tok, CHATS, max_tokens=10, temperature=0)
    alone = [generate_batch(model, tok, [c], max_tokens=10, temperature=0)[0] for c in CHATS]
    assert len({c.input_tokens for c in batch}) == 3  # really different lengths -> padding was exercised
    assert [c.text for c in batch] == [c.text for c in alone]
    assert [c.output_tokens for c in batch] == [c.output_tokens for c in alone]
    again = generate_batch(model, tok, CHATS, max_tokens=10, temperature=0)
    assert [c.text for c in again] == [c.text for c in batch]  # greedy is deterministic


def test_length_finish_and_usage(loaded):
    model, tok = loaded
    (c,) = generate_batch(model, tok, CHATS[:1], max_tokens=4, temperature=0)
    # a random model almost never emits EOS within 4 tokens: the cut must be reported
    assert c.finish_reason == "length"
    assert c.output_tokens == 4
    expected_in = len(tok.apply_chat_template(CHATS[0], add_generation_prompt=True, return_dict=True)["input_ids"])
    assert c.input_tokens == expected_in
    assert "<|pad|>" not in c.text and "<|end|>" not in c.text


def test_stop_at_eos(loaded, monkeypatch):
    """Force EOS as the 3rd token: the text is cut there, finish_reason is stop, EOS counted but not in logprobs."""
    model, tok = loaded
    eos = tok.eos_token_id
    real_forward = model.forward
    calls = {"n": 0}

    def forward(*a, **kw):
        out = real_forward(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            out.logits[:, -1, :] = -1e4
            out.logits[:, -1, eos] = 1e4
        return out

    monkeypatch.setattr(model, "forward", forward)
    (c,) = generate_batch(model, tok, CHATS[:1], max_tokens=8, temperature=0, logprobs=2)
    assert c.finish_reason == "stop"
    assert c.output_tokens == 3
    assert len(c.logprobs) == 2
    assert c.text == tok.decode([e["id"] for e in c.logprobs])


def test_logprobs_consistency(loaded):
    model, tok = loaded
    outs = generate_batch(model, tok, CHATS, max_tokens=6, temperature=0, logprobs=5)
    for c in outs:
        assert len(c.logprobs) == c.output_tokens  # no EOS in 6 tokens of a random model, so every token is there
        for e in c.logprobs:
            assert len(e["top"]) == 5
            assert e["top"][0]["id"] == e["id"]  # greedy picks the arg-max of the raw logits
            assert math.isclose(e["top"][0]["logprob"], e["logprob"], abs_tol=1e-6)
            lps = [t["logprob"] for t in e["top"]]
            assert all(lp <= 0 for lp in lps) and lps == sorted(lps, reverse=True)
            assert sum(math.exp(lp) for lp in lps) <= 1 + 1e-6
            assert e["token"] == tok.decode([e["id"]])
        assert "".join(e["token"] for e in c.logprobs) == tok.decode([e["id"] for e in c.logprobs])
        # the bytes spell the text too, and each alternative carries its own
        assert b"".join(bytes(e["bytes"]) for e in c.logprobs).decode(errors="replace") == c.text
        assert all(bytes(a["bytes"]).decode(errors="replace") == a["token"] for e in c.logprobs for a in e["top"]
                   if a["id"] not in tok.all_special_ids)


def test_logprobs_match_a_plain_forward(loaded):
    """The stored log-probs equal log_softmax of one ordinary forward pass over prompt + answer (naive reference)."""
    import torch

    model, tok = loaded
    (c,) = generate_batch(model, tok, CHATS[2:], max_tokens=5, temperature=0, logprobs=1)
    prompt = tok.apply_chat_template(CHATS[2], add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = list(prompt) + [e["id"] for e in c.logprobs]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    ref = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(ids[len(prompt) :])[:, None])[:, 0]
    assert torch.allclose(torch.tensor([e["logprob"] for e in c.logprobs]), ref, atol=1e-4)


def test_teacher_groups_params_and_keeps_order(tiny_model_dir, loaded):
    model, tok = loaded
    teacher = LocalTeacher(str(tiny_model_dir), batch_size=2)
    assert teacher.spec == f"hf:{tiny_model_dir}" and teacher.batch_size == 2
    reqs = [
        req(0, CHATS[0], temperature=0, max_tokens=3),
        req(1, CHATS[1], temperature=0, max_tokens=6, logprobs=2),
        req(2, CHATS[2], temperature=0, max_tokens=3),
        req(3, CHATS[1], temperature=0, max_tokens=3),
    ]

    async def go():
        # the event loop keeps running while the model generates in a worker thread
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        t = asyncio.create_task(ticker())
        out = await teacher.complete(reqs)
        t.cancel()
        await teacher.aclose()
        return out, ticks

    outs, ticks = asyncio.run(go())
    assert ticks > 0
    assert [c.output_tokens for c in outs] == [3, 6, 3, 3]
    assert outs[1].logprobs is not None and outs[0].logprobs is None
    ref = {
        i: generate_batch(model, tok, [r.messages], max_tokens=r.params["max_tokens"])[0].text
        for i, r in enumerate(reqs)
    }
    assert [c.text for c in outs] == [ref[i] for i in range(4)]


def test_sampling_seed_repeats(tiny_model_dir):
    teacher = LocalTeacher(str(tiny_model_dir))
    reqs = [req(i, c, temperature=1.5, top_p=0.9, max_tokens=8, seed=7) for i, c in enumerate(CHATS)]
    a = teacher.complete_sync(reqs)
    b = teacher.complete_sync(reqs)
    assert [c.text for c in a] == [c.text for c in b]
    greedy = teacher.complete_sync([req(i, c, temperature=0, max_tokens=8) for i, c in enumerate(CHATS)])
    assert [c.text for c in a] != [c.text for c in greedy]


def test_missing_path_fails_before_loading(tmp_path):
    with pytest.raises(ImitateError, match="does not exist"):
        LocalTeacher(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImitateError, match="no config.json"):
        LocalTeacher(str(tmp_path / "empty"))


def test_typo_under_a_local_directory_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """'runs/studnet' next to a runs/ directory is a path typo: fail now instead of minutes of hub retries."""
    from imitate.models import resolve_model
    from imitate.train.student import resolve_student

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ImitateError, match="runs/studnet does not exist"):
        resolve_model("runs/studnet")
    with pytest.raises(ImitateError, match="no such directory"):
        resolve_student("runs/studnet")
    assert resolve_model("org/name") == "org/name" and resolve_student("org/name") == "org/name"  # hub ids still pass


def test_uncached_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ImitateError, match="could not load") as info:
        load_model("nobody-org/no-such-model")
    assert "HF_HUB_OFFLINE" in info.value.hint


def test_no_chat_template_is_an_error(tiny_model_dir, tmp_path):

    d = copy_without_chat_template(tiny_model_dir, tmp_path / "m")
    teacher = LocalTeacher(str(d))
    with pytest.raises(ImitateError, match="no chat template"):
        teacher.complete_sync([req(0, CHATS[0], temperature=0)])
    # through `imitate collect`: the run stops with that error (exit 1), not one failures-file line per request
    from typer.testing import CliRunner

    from imitate.cli import app

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    res = CliRunner().invoke(app, ["collect", "--teacher", f"hf:{d}", "--prompts", str(prompts),
                                   "--out", str(tmp_path / "o.jsonl"), "--no-progress"])
    assert res.exit_code == 1 and "no chat template" in res.stderr, res.output
    assert not (tmp_path / "o.failures.jsonl").exists()


def test_model_generation_defaults_do_not_leak(tiny_model_dir, tmp_path, loaded):
    """A model whose generation_config asks for sampling and a repetition penalty still decodes greedily at T=0."""
    import json

    model, tok = loaded
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    gc = json.loads((d / "generation_config.json").read_text())
    gc.update(do_sample=True, temperature=0.3, top_k=2, repetition_penalty=3.0)
    (d / "generation_config.json").write_text(json.dumps(gc))
    outs = LocalTeacher(str(d)).complete_sync([req(i, c, temperature=0, max_tokens=8) for i, c in enumerate(CHATS)])
    assert [c.text for c in outs] == [c.text for c in generate_batch(model, tok, CHATS, max_tokens=8)]
