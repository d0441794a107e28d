"""Cross-tokenizer alignment by text (imitate/train/xtok.py) and its KD term (imitate/train/xtok_loss.py), on hand-made
token sequences and on tokenizers trained on the fly: byte-level BPE of two sizes, character-level, SentencePiece-style
with byte fallback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import make_char_tokenizer, make_sp_tokenizer, make_tokenizer

from imitate.train import xtok
from imitate.train.losses import divergence
from imitate.train.xtok_loss import sorted_l1, xtok_divergence, xtok_kd_loss

TEXTS = ["three hundred forty-seven", "Hello, world! 日本語のテキスト", "emoji 🙂 and 👩‍👩‍👧 family", " leading spaces",
         "def f(x):\n    return [1, 2]", "naïve café ∑ x²"]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("xtok")
    return {"bpe384": make_tokenizer(d / "a"), "bpe300": make_tokenizer(d / "b", vocab_size=300),
            "char": make_char_tokenizer(d / "c", extra="".join(TEXTS)), "sp": make_sp_tokenizer(d / "s")}


@pytest.mark.parametrize("name", ["bpe384", "bpe300", "char", "sp"])
def test_token_bytes_spell_the_text_back(toks, name):
    """Every tokenizer's pieces, read as bytes, concatenate to the text's UTF-8 (the SentencePiece dummy prefix adds
    one leading space): emoji and CJK split over byte tokens included."""
    tok = toks[name]
    table = xtok.token_bytes(tok)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        joined = b"".join(table[i] for i in ids)
        assert joined == (b" " if name == "sp" else b"") + text.encode()
    if name == "sp":  # byte fallback: the emoji is four <0x..> pieces, each one byte
        ids = tok.encode("🙂", add_special_tokens=False)
        assert [tok.convert_ids_to_tokens(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
        assert [table[i] for i in ids[-4:]] == [b"\xf0", b"\x9f", b"\x99", b"\x82"]
    assert all(table[i] is None for i in tok.all_special_ids)


def test_boundaries_on_hand_made_cases():
    text = b"the quick brown"
    # merges across words: the teacher's "the quick" holds two student tokens; a boundary in the middle of a teacher
    # token (student " quick" starts inside it) is not shared
    t = [b"the quick", b" brown"]
    s = [b"the", b" quick", b" brown"]
    ts, t_done = xtok.answer_starts(t, text)
    ss, s_done = xtok.answer_starts(s, text)
    assert ts == [0, 9] and ss == [0, 3, 9] and t_done and s_done
    assert xtok.shared_boundaries(ss, ts) == [(0, 0), (2, 1)]
    # leading space: SentencePiece's ▁, byte-level Ġ and a template separator all start at 0 of the stripped text
    for pieces in ([b" March", b" 7"], [b"\n", b" March", b" 7"], [b"March", b" 7"]):
        starts, done = xtok.answer_starts(pieces, b"March 7")
        assert starts[-2:] == [0, 5] and done
    # byte fallback against a byte-level emoji: byte offsets line up inside the character
    emoji = "a🙂b".encode()
    fallback = [b"a", b"\xf0", b"\x9f", b"\x99", b"\x82", b"b"]
    merged = [b"a\xf0\x9f", b"\x99\x82b"]
    assert xtok.shared_boundaries(xtok.answer_starts(fallback, emoji)[0], xtok.answer_starts(merged, emoji)[0]) == \
        [(0, 0), (3, 1)]
    # a special token ends the pieces; a truncated answer is a prefix; text that is not the answer aligns nothing
    assert xtok.answer_starts([b"the", None, b"x"], text) == ([0], False)
    assert xtok.answer_starts([b"the", b" qu"], text) == ([0, 3], False)
    assert xtok.answer_starts([b"other"], text) == ([None], False)


@pytest.mark.parametrize("student, teacher", [("bpe384", "bpe300"), ("bpe384", "char"), ("sp", "bpe384"),
                                              ("char", "sp")])
def test_real_tokenizers_share_boundaries_at_every_common_offset(toks, student, teacher):
    """On real tokenizations the shared boundaries are exactly the offsets where both start a token (naive set
    intersection), CJK and emoji included; the character-level side starts a token at every character."""
    for text in TEXTS:
        body = text.lstrip().encode()
        pieces = {}
        for side, name in (("s", student), ("t", teacher)):
            tok = toks[name]
            table = xtok.token_bytes(tok)
            pieces[side] = [table[i] for i in tok.encode(text, add_special_tokens=False)]
        ss, s_done = xtok.answer_starts(pieces["s"], body)
        ts, t_done = xtok.answer_starts(pieces["t"], body)
        assert s_done and t_done
        pairs = xtok.shared_boundaries(ss, ts)
        assert sorted({ss[k] for k, _ in pairs}) == sorted({o for o in ss if o is not None} & set(ts) - {None})
        assert all(ss[k] == ts[m] for k, m in pairs)
        if teacher == "char":  # every student token starting on a character (not inside one) is shared
            assert len(pairs) == len({o for o in ss if o is not None and (o == len(body) or body[o] & 0xC0 != 0x80)})


def test_projector_rules(toks):
    s = toks["bpe384"]
    proj = xtok.Projector(s)
    table = xtok.token_bytes(s)
    three = s.encode(" three", add_special_tokens=False)
    assert len(three) == 1 and proj.text(b" three") == three[0]  # exact text
    longest = proj.text(b" threeXYZ")  # merged: the longest student token the text begins with
    assert longest == three[0]
    assert proj.text("🙂".encode()) is not None and table[proj.text("🙂".encode())] == b"\xf0"  # first byte token
    assert proj.special("<|im_end|>", True) == s.eos_token_id  # the teacher's end token
    assert proj.special("<|user|>", False) == s.convert_tokens_to_ids("<|user|>")  # the same name
    assert proj.special("<|other|>", False) is None
    char = xtok.Projector(toks["char"])
    assert char.text("Ω".encode()) is None  # text the student cannot spell is unmatched
    t_map = proj.teacher_map(toks["bpe384"])
    assert t_map == list(range(len(s)))  # identical tokenizers: the identity


def entry(text: str, lp: float, top: list[tuple[str, float]]) -> dict:
    return {"token": text, "logprob": lp, "bytes": list(text.encode()),
            "top": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}


def test_graybox_rows_merge_alternatives_and_count_the_sampled_token_once(toks):
    s = toks["bpe384"]
    proj = xtok.Projector(s)
    ids = s.encode(" three hundred", add_special_tokens=False)
    labels = [-100] + ids + [s.eos_token_id, -100]  # shifted labels: position p predicts labels[p]
    # teacher tokens " thr" + "ee" + " hundred": " three" starts at 0 in both, " hundred" at 6
    logprobs = [entry(" thr", -0.1, [(" thr", -0.1), (" threeX", -4.0), (" threeY", -4.0)]),
                entry("ee", -0.05, [("ee", -0.05)]),
                entry(" hundred", -0.2, [(" hundred", -0.2), ("🙂", -4.0)])]
    rows, counts = xtok.graybox_rows(logprobs, labels, proj)
    assert len(ids) == 2 and sorted(rows) == [1, 2] and counts["aligned"] == 2
    assert counts["unaligned"] == 1  # the end marker: collected log-probs stop before EOS
    row0 = dict(rows[1])
    assert math.exp(row0[ids[0]]) == pytest.approx(math.exp(-0.1) + 2 * math.exp(-4.0))  # merged onto " three"
    assert len(row0) == 1
    row1 = dict(rows[2])
    assert math.exp(row1[ids[1]]) == pytest.approx(math.exp(-0.2))  # the sampled token, counted once
    assert math.exp(row1[proj.text("🙂".encode())]) == pytest.approx(math.exp(-4.0))


def naive_xtok(s_logits, t_logits, t_map, s_star, t_star, beta, T):
    """Loop-by-loop reference of xtok_divergence in float64."""
    out = []
    for n in range(s_logits.shape[0]):
        p = torch.softmax(t_logits[n].double() / T, -1).tolist()
        q = torch.softmax(s_logits[n].double() / T, -1).tolist()
        merged, image, unmatched = {}, set(), []
        for t, pt in enumerate(p):
            dest = int(s_star[n]) if t == int(t_star[n]) else int(t_map[t])
            if dest < 0:
                unmatched.append(pt)
            else:
                merged[dest] = merged.get(dest, 0.0) + pt
                image.add(dest)
        P = [merged[i] for i in sorted(image)] + [sum(unmatched)]
        Q = [q[i] for i in sorted(image)] + [1 - sum(q[i] for i in image)]
        P, Q = torch.tensor(P), torch.tensor(Q)
        d = divergence(Q.clamp(min=1e-30).log()[None], P.clamp(min=1e-30).log()[None], beta)[0].item()
        a = sorted(unmatched, reverse=True)
        b = sorted((q[i] for i in range(len(q)) if i not in image), reverse=True)
        w = max(len(a), len(b))
        a, b = a + [0.0] * (w - len(a)), b + [0.0] * (w - len(b))
        out.append(d + sum(abs(x - y) for x, y in zip(a, b)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_xtok_divergence_equals_a_naive_reference(beta):
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(5, 7, generator=g) * 2, torch.randn(5, 9, generator=g) * 2
    t_map = torch.tensor([0, 1, 1, 2, -1, 3, 3, -1, 4])  # merges (1, 3 twice), unmatched (4, 7), 5 and 6 unused
    s_star, t_star = torch.tensor([0, 5, 1, 6, 2]), torch.tensor([0, 4, 2, 8, 7])  # rule 1 moves mass anywhere
    got = xtok_divergence(s_logits, t_logits, t_map, s_star, t_star, beta=beta, temperature=1.3)
    want = naive_xtok(s_logits, t_logits, t_map, s_star, t_star, beta, 1.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (got >= 0).all()


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_identity_map_is_todays_divergence(beta):
    """Same vocabulary, identity map, rule 1 on the same id: exactly `losses.divergence` (no rest, no ULD)."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 11, generator=g) * 3, torch.randn(6, 11, generator=g) * 3
    star = torch.randint(0, 11, (6,), generator=g)
    got = xtok_divergence(s, t, torch.arange(11), star, star, beta=beta, temperature=0.7)
    torch.testing.assert_close(got, divergence(s, t, beta, 0.7), rtol=1e-5, atol=1e-6)


def test_sorted_l1_is_uld():
    a, b = torch.tensor([[0.1, 0.5, 0.0]]), torch.tensor([[0.2, 0.3]])
    assert sorted_l1(a, b).item() == pytest.approx(abs(0.5 - 0.3) + abs(0.1 - 0.2))
    assert sorted_l1(b, b).item() == 0.0
    # the top-k shortcut against a full sort, sparse and dense rows, either side wider
    g = torch.Generator().manual_seed(3)
    for wa, wb, keep in ((50, 40, 0.1), (30, 60, 0.5), (20, 20, 1.0)):
        a = torch.rand(4, wa, generator=g) * (torch.rand(4, wa, generator=g) < keep)
        b = torch.rand(4, wb, generator=g)
        w = max(wa, wb)
        full = (F.pad(a, (0, w - wa)).sort(-1, descending=True).values
                - F.pad(b, (0, w - wb)).sort(-1, descending=True).values).abs().sum(-1)
        torch.testing.assert_close(sorted_l1(a, b), full, rtol=1e-5, atol=1e-6)


def test_chunked_term_equals_unchunked_and_its_gradient_matches():
    g = torch.Generator().manual_seed(2)
    hs = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 12, bias=False)
    ht, t_head = torch.randn(2, 5, 10, generator=g), torch.randn(15, 10, generator=g)
    s_idx, t_idx = torch.tensor([0, 2, 3, 7, 11]), torch.tensor([1, 2, 4, 5, 9])
    s_star, t_star = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 13, 14])
    t_map = torch.tensor([0, 1, 2, 3, 4, 5, 5, 6, 7, 8, -1, 9, 10, 11, -1])
    kw = dict(beta=0.0, temperature=1.5, vocab_size=12, teacher_vocab_size=15)
    one, n = xtok_kd_loss(hs, head, ht, t_head, s_idx, t_idx, s_star, t_star, t_map, chunk_size=100, **kw)
    (g_one,) = torch.autograd.grad(one, hs)
    two, _ = xtok_kd_loss(hs, head, ht, t_head, s_idx, t_idx, s_star, t_star, t_map, chunk_size=2, **kw)
    (g_two,) = torch.autograd.grad(two, hs)
    s_logits = head(hs.reshape(-1, 8)[s_idx])
    t_logits = ht.reshape(-1, 10)[t_idx] @ t_head.T
    ref = xtok_divergence(s_logits, t_logits, t_map, s_star, t_star, beta=0.0, temperature=1.5).sum() * 1.5**2
    (g_ref,) = torch.autograd.grad(ref, hs)
    assert n == 5
    torch.testing.assert_close(one, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_one, g_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_two, g_ref, rtol=1e-4, atol=1e-6)


def test_coverage_report_and_warning():
    rep = xtok.coverage_report([3, 0, 4], [4, 4, 4], ["a:1", "a:2", "a:3"])
    assert rep["coverage"] == pytest.approx(7 / 12) and rep["per_record"]["min"] == 0.0
    assert rep["per_record"]["lowest"][0] == "a:2 (0%)"
    assert xtok.low_coverage(rep) is None
    low = xtok.coverage_report([1, 0], [4, 4], ["b:1", "b:2"])
    msg = xtok.low_coverage(low)
    assert "12%" in msg and "tokenizers" in msg and "b:2 (0%)" in msg


