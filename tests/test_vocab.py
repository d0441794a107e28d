"""Tokenizer compatibility, the real vocab size, and the alignment of collected log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from imitate.errors import ImitateError
from imitate.train.losses import shift_labels
from imitate.train.vocab import align_logprobs, check_tokenizers, pad_topk, real_vocab_size


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_same_tokenizer_passes(tok, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    check_tokenizers(tok, AutoTokenizer.from_pretrained(tiny_tokenizer_dir))


def test_different_vocabulary_is_refused_with_black_box_advice(tok, tmp_path):
    from tiny import make_tokenizer

    other = make_tokenizer(tmp_path / "other", vocab_size=300)
    with pytest.raises(ImitateError) as err:
        check_tokenizers(tok, other, teacher="hf:./big")
    assert "hf:./big" in err.value.message and "vocabularies differ" in err.value.message
    assert "black-box" in err.value.hint and "imitate collect" in err.value.hint


def test_same_vocabulary_with_other_special_tokens_is_refused(tok, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, eos_token="<|pad|>")
    with pytest.raises(ImitateError, match="special tokens differ"):
        check_tokenizers(tok, other)


def test_a_tokenizer_without_pad_matches_one_padded_with_eos(tiny_tokenizer_dir):
    """The student gets pad = eos when it has none (student.load_tokenizer) before the check; a teacher loaded from
    the same files keeps none (seen with a GGUF teacher on transformers 5.17): the same tokenizer, not another one.
    A pad token other than eos still differs."""
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    bare.pad_token = None
    assert bare.pad_token_id is None
    padded = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    padded.pad_token = padded.eos_token
    check_tokenizers(padded, bare)
    check_tokenizers(bare, padded)
    other = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    other.pad_token = other.bos_token if other.bos_token != other.eos_token else other.unk_token
    assert other.pad_token not in (None, other.eos_token)
    with pytest.raises(ImitateError, match="special tokens differ"):
        check_tokenizers(padded, other)


def test_check_runs_on_tokenizer_dirs_without_weights(tiny_tokenizer_dir):
    # the fixture directory holds no model weights at all: the check needs tokenizers only
    assert not list(tiny_tokenizer_dir.glob("*.safetensors"))
    from transformers import AutoTokenizer

    check_tokenizers(
        AutoTokenizer.from_pretrained(tiny_tokenizer_dir), AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    )


def test_real_vocab_size_cuts_padding_and_refuses_narrow_heads(tok):
    assert real_vocab_size(tok, len(tok) + 64, len(tok)) == len(tok)
    with pytest.raises(ImitateError, match="teacher's output head"):
        real_vocab_size(tok, len(tok), len(tok) - 1)


def _example(tok, answer="hello world 347"):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    p_ids = tok.encode(prompt, add_special_tokens=False)
    ids = tok.encode(full, add_special_tokens=False)
    labels = torch.tensor([-100] * len(p_ids) + ids[len(p_ids) :])
    return ids, labels, ids[len(p_ids) :]


def test_align_logprobs_uses_ids_and_maps_token_strings(tok):
    _, labels, answer = _example(tok)
    shifted = shift_labels(labels[None])[0]
    vocab_inv = {v: k for k, v in tok.get_vocab().items()}
    records = []
    for i, tid in enumerate(answer):
        entry = {"token": vocab_inv[tid], "id": tid if i % 2 == 0 else None, "logprob": math.log(0.5)}
        entry["top"] = [
            {"token": vocab_inv[tid], "id": None, "logprob": math.log(0.5)},  # the sampled token again: deduplicated
            {"token": "3", "id": None, "logprob": math.log(0.2)},  # text of exactly one token
            {"token": "ununmappable-piece", "id": None, "logprob": math.log(0.1)},  # several tokens: dropped
        ]
        records.append(entry)
    ids, lps, counts = align_logprobs(records, shifted, tok)
    positions = (shifted != -100).nonzero().squeeze(-1)
    assert counts == {"aligned": len(answer), "unaligned": 0, "unmapped_top": len(answer)}
    assert ids.shape == (len(shifted), 2)
    assert ids[positions, 0].tolist() == answer  # row p predicts labels[p]: the sampled token comes first (highest lp)
    assert ids[positions[0], 1] == tok.convert_tokens_to_ids("3")
    torch.testing.assert_close(lps[positions[0]], torch.tensor([math.log(0.5), math.log(0.2)]))
    assert (ids[shifted == -100] == -1).all()


def test_align_logprobs_stops_at_first_mismatch(tok):
    _, labels, answer = _example(tok)
    records = [{"token": "", "id": t, "logprob": -0.1, "top": []} for t in answer]
    records[3]["id"] = (answer[3] + 1) % len(tok)  # the teacher's text re-tokenized differently from here on
    ids, _, counts = align_logprobs(records, labels, tok)
    assert counts["aligned"] == 3 and counts["unaligned"] == len(answer) - 3
    assert int((ids[:, 0] >= 0).sum()) == 3


def test_pad_topk_right_pads_rows_and_width():
    a = torch.tensor([[1, 2], [3, -1]])
    b = torch.tensor([[4], [5], [6]])
    out = pad_topk([a, b], -1)
    assert out.tolist() == [[[1, 2], [3, -1], [-1, -1]], [[4, -1], [5, -1], [6, -1]]]
