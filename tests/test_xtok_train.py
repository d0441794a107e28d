"""Cross-tokenizer distillation in `imitate train`: gray-box from collected log-probs aligned by text (OpenAI format
with `bytes` over the loopback server; an hf teacher of another tokenizer), coverage, and white-box KD from a teacher
with another tokenizer (one process and 2 CPU ranks under SCKD)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fake_server import FakeServer
from test_distill import cfg_for, graybox_records, tokenized, write
from test_train import WORDS, make_records, metrics

from imitate.train import xtok
from imitate.train.loop import run


@pytest.fixture(scope="module")
def other_tok_model(tmp_path_factory):
    """A tiny teacher whose byte-level BPE has another vocabulary size (so other merges) than the student's."""
    from tiny import make_model

    d = tmp_path_factory.mktemp("other")
    make_model(d, hidden_size=48, num_layers=2, vocab_size=300, seed=3)
    return d


@pytest.fixture(scope="module")
def char_teacher(tmp_path_factory):
    """A tiny teacher with a character-level tokenizer (and the same chat template as the student's)."""
    from tiny import make_char_tokenizer, make_model

    d = tmp_path_factory.mktemp("char")
    make_char_tokenizer(d / "tok")
    make_model(d / "model", hidden_size=48, num_layers=2, seed=4, tokenizer_dir=d / "tok")
    return d / "model"


def openai_records(tmp_path, answers: list[str]) -> list[dict]:
    """Records collected with `imitate collect --teacher openai:...` from the loopback server, top-3 log-probs with
    `bytes`: each word is one teacher token, its space in front."""
    from imitate.collect.stage import CollectConfig
    from imitate.collect.stage import run as collect

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(len(answers))))
    by_prompt = {f"q{i}": a for i, a in enumerate(answers)}
    with FakeServer(latency=0.0, responder=lambda body, _: by_prompt[body["messages"][-1]["content"]]) as server:
        collect(CollectConfig(prompts=prompts, teacher="openai:fake", base_url=server.base_url + "/v1",
                              out=tmp_path / "c.jsonl", logprobs=3, progress=False))
    return [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]


def test_graybox_from_openai_logprobs_with_bytes(tiny_model_dir, tmp_path):
    """The API's tokens are not the student's (each word is one API token; the student splits some words), yet every
    token both start at the same offset is graded: the sampled token counts for the student's token there and the
    alternatives (" two~1" ...) merge onto the longest student token they begin with. Step 1's logged term equals a
    reference built here from the records by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imitate.train.losses import sparse_topk_divergence

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    answers = [" ".join(WORDS[: 2 + i % 6]) for i in range(8)] + ["seven 🙂 日本", "hello world, tiny"]
    records = openai_records(tmp_path, answers)
    assert all(r["logprobs"][0]["bytes"] for r in records)
    data = write(tmp_path / "lp.jsonl", records)
    summary = run(cfg_for(data, tiny_model_dir, tmp_path / "g", max_steps=1, grad_accum=3, batch_size=4))
    g = summary["distill"]["graybox"]
    assert summary["distill"]["mode"] == "graybox" and g["by_text"] == len(records)
    assert g["records"] == len(records) and 0.3 < g["coverage"] < 1.0  # split words, the end marker + "\n"
    assert g["per_record"]["min"] > 0 and g["taught_tokens"] == g["aligned"]

    # the reference: word-level teacher tokens over the student's tokens of the same words
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    table = xtok.token_bytes(tok)  # checked against the texts in test_xtok.py
    total, n_targets, aligned = 0.0, 0, 0
    for r, (ids, labels) in zip(records, tokenized(records, tok)):
        run_pos = [p for p, x in enumerate(labels) if x != -100]
        n_targets += len(run_pos)
        pieces = [table[labels[p]] for p in run_pos[:-2]]  # answer tokens, not <|end|> "\n"
        starts = [sum(len(x) for x in pieces[:k]) for k in range(len(pieces))]
        rows, want_ids, want_lps = [], [], []
        offset = 0
        for e in r["logprobs"]:
            if offset in starts:
                k = starts.index(offset)
                s_star = labels[run_pos[k]]
                mass = {s_star: math.exp(e["logprob"])}
                for alt in e["top"][1:]:  # " two~1": the longest student token it begins with
                    data_ = bytes(alt["bytes"])
                    best = max((i for i in range(len(tok)) if table[i] and data_.startswith(table[i])),
                               key=lambda i: len(table[i]))
                    mass[best] = mass.get(best, 0.0) + math.exp(alt["logprob"])
                rows.append(run_pos[k])
                want_ids.append(list(mass))
                want_lps.append([math.log(v) for v in mass.values()])
            offset += len(bytes(e["bytes"]))
        aligned += len(rows)
        if not rows:
            continue
        width = max(len(x) for x in want_ids)
        t_ids = torch.tensor([x + [-1] * (width - len(x)) for x in want_ids])
        t_lps = torch.tensor([x + [0.0] * (width - len(x)) for x in want_lps])
        with torch.no_grad():
            logits = student(input_ids=torch.tensor([ids])).logits[0]
            total += sparse_topk_divergence(logits[rows], t_ids, t_lps).sum().item()
    assert aligned == g["aligned"]
    # coverage: graded tokens over the answers' tokens through the end marker (not the template's "\n" after it)
    assert g["answer_tokens"] == n_targets - len(records) and g["coverage"] == pytest.approx(aligned / (
        n_targets - len(records)))
    assert metrics(tmp_path / "g")[0]["graybox_kd"] == pytest.approx(total / n_targets, rel=1e-5)


def test_graybox_from_an_hf_teacher_of_another_tokenizer_aligns_by_text(tiny_model_dir, other_tok_model, tmp_path):
    """Records of an hf teacher with another vocabulary (its ids and byte-level token strings, no `bytes`: records
    written before bytes were stored) align by text through the teacher's tokenizer; they used to train CE only."""
    from transformers import AutoTokenizer

    t_tok = AutoTokenizer.from_pretrained(other_tok_model)
    records = graybox_records(make_records(6), t_tok, f"hf:{other_tok_model}")
    # graybox_records tokenizes with the tokenizer it is given: the teacher's
    summary = run(cfg_for(write(tmp_path / "lp.jsonl", records), tiny_model_dir, tmp_path / "g", max_steps=2))
    g = summary["distill"]["graybox"]
    assert summary["distill"]["mode"] == "graybox" and g["by_text"] == 6 and g["text_mismatch"] == 0
    assert g["coverage"] > 0.3 and "graybox_kd" in metrics(tmp_path / "g")[0]


def test_graybox_text_mismatch_trains_ce_only_with_a_note(tiny_model_dir, other_tok_model, tmp_path, capsys):
    """Log-probs whose text is not the answer's (here: the student's ids read as the teacher's) align nothing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = graybox_records(make_records(6), tok, f"hf:{other_tok_model}")
    for r in records:
        for e in r["logprobs"]:
            e["id"] = (e["id"] * 7 + 3) % 300
    summary = run(cfg_for(write(tmp_path / "lp.jsonl", records), tiny_model_dir, tmp_path / "g", max_steps=1))
    d = summary["distill"]
    assert d["mode"] == "none" and d["graybox"]["aligned"] == 0 and "CE only" in d["graybox"]["note"]
    assert d["graybox"]["text_mismatch"] == 6 and d["graybox"]["coverage"] == 0.0
    err = capsys.readouterr().err  # warned before training, with the reason
    assert "Warning: the teacher's distribution covers only 0% of the answer tokens (floor 50%)" in err
    assert err.index("Warning") < err.index("trained 1 step")
    assert "graybox_kd" not in metrics(tmp_path / "g")[0]
    # and --no-graybox ignores the logprobs altogether
    assert "distill" not in run(cfg_for(write(tmp_path / "lp.jsonl", records), tiny_model_dir, tmp_path / "n",
                                        max_steps=1, graybox=False))


def test_same_tokenizer_graybox_by_text_equals_todays_alignment(tiny_model_dir):
    """Identical tokenizers: aligning by text gives today's token-by-token rows (ids and log-probs), row for row."""
    from transformers import AutoTokenizer

    from imitate.train.teacher_tokens import _rows_to_tensors
    from imitate.train.vocab import align_logprobs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    table = xtok.token_bytes(tok)
    proj = xtok.Projector(tok)
    for r, (ids, labels) in zip(graybox_records(make_records(8, seed=5), tok, "openai:x"), tokenized(make_records(
            8, seed=5), tok)):
        r["logprobs"] = r["logprobs"][:-1]  # as collected: no entry for the end token
        for e in r["logprobs"]:
            e["bytes"] = list(table[e["id"]])
            for a in e["top"]:
                a["bytes"] = list(table[a["id"]]) if table[a["id"]] else None  # special: by name
        want_ids, want_lps, counts = align_logprobs(r["logprobs"], torch.tensor(labels), tok)
        rows, got_counts = xtok.graybox_rows(r["logprobs"], labels, proj)
        got_ids, got_lps = _rows_to_tensors(rows, len(labels))
        assert got_counts["aligned"] == counts["aligned"] == len(r["logprobs"])
        torch.testing.assert_close(got_ids, want_ids)
        torch.testing.assert_close(got_lps, want_lps, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# white-box: a teacher with another tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_white_box_kd_from_a_teacher_with_another_tokenizer(tiny_model_dir, other_tok_model, tmp_path):
    """--teacher hf:X with another vocabulary used to be refused; now it trains, reports what differs and how much
    of the answers the teacher grades (summary, metrics, model card)."""
    from test_train import invoke

    data = write(tmp_path / "d.jsonl", make_records(12))
    out = tmp_path / "x"
    res = invoke("--data", data, "--student", tiny_model_dir, "--teacher", f"hf:{other_tok_model}", "--out", out,
                 "--max-steps", "2", "--batch-size", "4", "--no-progress", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)["distill"]
    assert d["mode"] == "logit" and d["terms"] == ["logit_kd"] and "vocabularies differ" in d["cross_tokenizer"]
    cov = d["coverage"]
    assert 0.3 < cov["coverage"] <= 1.0 and cov["records"] == 12 and cov["per_record"]["min"] > 0
    rows = [r for r in metrics(out) if "loss" in r]
    assert all(r["logit_kd"] > 0 and 0 < r["kd_coverage"] <= 1 for r in rows)
    card = (out / "README.md").read_text()
    assert "kd_coverage" in card and "another tokenizer" in card


@pytest.mark.parametrize("args, expect", [(["--feature-kd", "auto"], "--feature-kd needs a teacher that shares"),
                                          (["--on-policy", "0.5"], "--on-policy needs a teacher that shares")])
def test_cross_tokenizer_refuses_what_needs_the_same_tokens(args, expect, tiny_model_dir, other_tok_model, tmp_path):
    from test_train import invoke

    res = invoke("--data", write(tmp_path / "d.jsonl", make_records(4)), "--student", tiny_model_dir, "--teacher",
                 f"hf:{other_tok_model}", "--out", tmp_path / "o", "--no-progress", *args)
    assert res.exit_code in (1, 2) and expect in res.stderr, res.stderr


def test_white_box_term_in_the_loop_equals_a_naive_reference(tiny_model_dir, char_teacher, tmp_path):
    """Step 1's logged cross-tokenizer term (the LoRA B = 0 student is the base model) == a reference built here:
    a character-level teacher starts a token at every character, so every student answer token (and the end token)
    is paired with the teacher's character at its byte offset; the divergence is test_xtok's float64 loop."""
    from test_xtok import naive_xtok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = make_records(8, seed=4)
    data = write(tmp_path / "d.jsonl", records)
    summary = run(cfg_for(data, tiny_model_dir, tmp_path / "o", teacher=f"hf:{char_teacher}", max_steps=1,
                          grad_accum=2, kd_chunk_size=5, temperature=1.3))
    row = metrics(tmp_path / "o")[0]
    s_tok, t_tok = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(char_teacher)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(char_teacher).eval()
    s_vocab = {s_tok.decode([i]): i for i in range(len(s_tok)) if i not in s_tok.all_special_ids}
    t_map = []
    for i in range(len(t_tok)):
        name = t_tok.convert_ids_to_tokens(i)
        if i == t_tok.eos_token_id:
            t_map.append(s_tok.eos_token_id)
        elif i in t_tok.all_special_ids:
            t_map.append(s_tok.convert_tokens_to_ids(name) if name in s_tok.get_vocab() else -1)
        else:
            t_map.append(s_vocab.get(name, -1))  # one ASCII character: the student's byte token of it
    t_map = torch.tensor(t_map)
    total, n_targets, n_pairs = 0.0, 0, 0
    for (s_ids, s_lab), (t_ids, t_lab) in zip(tokenized(records, s_tok), tokenized(records, t_tok)):
        s_run = [p for p, x in enumerate(s_lab) if x != -100]
        t_run = [p for p, x in enumerate(t_lab) if x != -100]
        n_targets += len(s_run)
        pairs, offset = [], 0
        for p in s_run[:-2]:  # answer tokens: each starts at a character, which the teacher has at that offset
            pairs.append((p, t_run[offset]))
            offset += len(s_tok.decode([s_lab[p]]))
        pairs.append((s_run[-2], t_run[-2]))  # the end tokens
        with torch.no_grad():
            s_logits = student(input_ids=torch.tensor([s_ids])).logits[0]
            t_logits = teacher(input_ids=torch.tensor([t_ids])).logits[0]
        sp, tp = [a for a, _ in pairs], [b for _, b in pairs]
        s_star, t_star = torch.tensor([s_lab[p] for p in sp]), torch.tensor([t_lab[p] for p in tp])
        total += naive_xtok(s_logits[sp], t_logits[tp], t_map, s_star, t_star, 0.0, 1.3).sum().item() * 1.3**2
        n_pairs += len(pairs)
    cov = summary["distill"]["coverage"]
    assert cov["taught_tokens"] == n_pairs and cov["coverage"] == 1.0  # every answer token and the end token
    assert row["kd_coverage"] == 1.0
    # packed rows (one row per micro-batch, the teacher's side padded) pair the same positions: the same term
    run(cfg_for(data, tiny_model_dir, tmp_path / "p", teacher=f"hf:{char_teacher}", max_steps=1, grad_accum=2,
                kd_chunk_size=5, temperature=1.3, packing=True, batch_size=1, max_length=256))
    assert metrics(tmp_path / "p")[0]["logit_kd"] == pytest.approx(total / n_targets, rel=1e-4)
    assert row["logit_kd"] == pytest.approx(total / n_targets, rel=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_identical_tokenizers_through_the_text_path_give_todays_kd(tiny_model_dir, tiny_teacher_dir, tmp_path, beta):
    """Identical tokenizers keep today's path (plan_teacher); forced through the cross-tokenizer path instead, the
    same micro-batch gives today's logit KD term to 1e-5 (relative; float32 rounding: today's forward KL is
    written by hand, the text path's goes through `divergence`): every answer token and the end token are paired with
    themselves, the map is the identity, no mass is unmatched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imitate.train.data import collate, load_examples, teacher_written
    from imitate.train.losses import chunked_kd_loss
    from imitate.train.xtok_loss import xtok_kd_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write(tmp_path / "d.jsonl", make_records(6, seed=7))
    examples, _ = load_examples([data], tok, max_length=256, with_messages=True)
    plan = xtok.WhiteBox(tokenizer=AutoTokenizer.from_pretrained(tiny_teacher_dir), vocab_size=len(tok), why="")
    report = xtok.prepare_whitebox(examples, tok, plan, 256)
    assert report["coverage"] == 1.0 and report["answer_tokens"] == sum(e.n_targets for e in examples) - 6  # no "\n"
    assert torch.equal(plan.t_map, torch.arange(len(tok)))
    batch = collate(examples, pad_id=tok.pad_token_id, packing=False)
    batch.update(xtok.batch_tensors(examples, batch, tok.pad_token_id))
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    with torch.no_grad():
        hs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True).hidden_states[-1]
        ht = teacher(input_ids=batch["xtok_input_ids"], attention_mask=batch["xtok_attention_mask"],
                     output_hidden_states=True).hidden_states[-1]
    assert torch.equal(batch["xtok_input_ids"], batch["input_ids"])
    labels = teacher_written(batch["input_ids"], batch["labels"], [tok.eos_token_id])
    kw = dict(beta=beta, temperature=1.7, chunk_size=7, vocab_size=len(tok))
    today, n = chunked_kd_loss(hs, student.lm_head, ht, teacher.lm_head, labels, **kw)
    new, m = xtok_kd_loss(hs, student.lm_head, ht, teacher.lm_head, batch["xtok_s_index"], batch["xtok_t_index"],
                          batch["xtok_s_star"], batch["xtok_t_star"], plan.t_map, teacher_vocab_size=len(tok), **kw)
    assert n == m
    assert new.item() == pytest.approx(today.item(), rel=1e-5)


def test_sckd_with_a_cross_tokenizer_term_two_processes_match_one(tiny_model_dir, other_tok_model, tmp_path):
    """2 CPU ranks (gloo) x grad-accum 1 == 1 process x grad-accum 2 under --sckd with the cross-tokenizer term gated
    (threshold -1 forces it on): the same decisions, gradients and logged terms on both."""
    from test_train import two_ranks_match_accumulation

    data = write(tmp_path / "d.jsonl", make_records(12, seed=3))
    args = ["--data", data, "--student", tiny_model_dir, "--teacher", f"hf:{other_tok_model}", "--sckd",
            "--sckd-threshold", "-1", "--max-steps", "3", "--batch-size", "2", "--lora-dropout", "0",
            "--eval-split", "0", "--lr", "1e-2", "--no-progress"]
    summary, ddp, single = two_ranks_match_accumulation(args, tmp_path)
    assert summary["devices"] == 2 and summary["distill"]["on_rate"]["logit_kd"] == 1.0
    for x, y in zip(metrics(ddp), metrics(single)):
        for key in ("loss", "logit_kd", "kd_coverage"):
            assert x[key] == pytest.approx(y[key], rel=1e-4)
