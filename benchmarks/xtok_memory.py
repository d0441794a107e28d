"""Peak memory of the cross-tokenizer KD term against today's logit KD, forward + backward, on CPU.

    python benchmarks/xtok_memory.py [--vocab 32000] [--tokens 1024] [--chunk 256]

Each loss runs in a fresh process; the table gives the growth of its peak resident memory over the same process just
before the loss (inputs built), so the figures are the loss's own working memory: about one chunk's tensors, since both
losses are chunked. Cross-tokenizer inputs: two vocabularies of the same size, a map that merges a tenth of the teacher
tokens pairwise and leaves 1% unmatched (so the ULD part runs too)."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(kind: str, vocab: int, tokens: int, chunk: int) -> None:
    import torch

    from imitate.train.losses import chunked_kd_loss
    from imitate.train.xtok_loss import xtok_kd_loss

    torch.manual_seed(0)
    hidden = 64
    hs = torch.randn(1, tokens, hidden, requires_grad=True)
    ht = torch.randn(1, tokens, hidden)
    s_head, t_head = torch.randn(vocab, hidden) * 0.1, torch.randn(vocab, hidden) * 0.1
    labels = torch.randint(0, vocab, (1, tokens))
    t_map = torch.arange(vocab)
    t_map[: vocab // 10 : 2] += 1  # merges
    t_map[-(vocab // 100):] = -1  # unmatched
    idx = torch.arange(tokens)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "today":
        loss, _ = chunked_kd_loss(hs, s_head, ht, t_head, labels, chunk_size=chunk, vocab_size=vocab)
    else:
        loss, _ = xtok_kd_loss(hs, s_head, ht, t_head, idx, idx, labels[0], labels[0], t_map, chunk_size=chunk,
                               vocab_size=vocab, teacher_vocab_size=vocab)
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "peak_mb": (after - before) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.vocab, a.tokens, a.chunk)
    rows = {}
    for kind in ("today", "xtok"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--vocab", str(a.vocab), "--tokens",
                              str(a.tokens), "--chunk", str(a.chunk)], capture_output=True, text=True, check=True)
        rows[kind] = json.loads(out.stdout.splitlines()[-1])["peak_mb"]
    one = a.chunk * a.vocab * 4 / 2**20
    print(f"vocab {a.vocab}, {a.tokens} positions, chunk {a.chunk} (one float32 [chunk x vocab] = {one:.0f} MB)")
    print("| loss | peak growth MB | x one chunk's logits |")
    print("|---|---|---|")
    for kind, mb in rows.items():
        print(f"| {kind} | {mb:.0f} | {mb / one:.1f} |")
    print(f"xtok / today: {rows['xtok'] / max(rows['today'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
