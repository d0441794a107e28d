"""Batched generation of the hf teacher vs one prompt at a time, on a small random Llama (CPU unless CUDA is there).

    python benchmarks/hf_teacher_batching.py [--prompts 32] [--max-tokens 32] [--hidden 128] [--layers 4]

Prints answers/s for each batch size as a ratio to batch size 1, and whether greedy answers are identical to the
one-at-a-time answers (they must be: left padding may not change what the model says).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,8,32")
    args = ap.parse_args()

    from tiny import make_model

    from imitate.models import generate_batch, load_model

    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    chats = [
        [{"role": "user", "content": f"Write {i * 37 % 1000} in words. " + " ".join(words[: i % 12])}]
        for i in range(args.prompts)
    ]
    with tempfile.TemporaryDirectory() as d:
        make_model(d, hidden_size=args.hidden, num_layers=args.layers, intermediate_size=4 * args.hidden)
        model, tok = load_model(d)
        generate_batch(model, tok, chats[:2], max_tokens=4)  # warm-up
        rows, base, ref = [], None, None
        for bs in (int(x) for x in args.batch_sizes.split(",")):
            t0 = time.perf_counter()
            texts = []
            for s in range(0, len(chats), bs):
                texts += [c.text for c in generate_batch(model, tok, chats[s : s + bs], max_tokens=args.max_tokens)]
            dt = time.perf_counter() - t0
            base = base or dt
            ref = ref or texts
            same = sum(a == b for a, b in zip(texts, ref))
            rows.append((bs, len(chats) / dt, base / dt, f"{same}/{len(chats)}"))
    device = next(model.parameters()).device
    print(
        f"hf teacher, {args.prompts} prompts x {args.max_tokens} new tokens, hidden {args.hidden}, "
        f"{args.layers} layers, {device}"
    )
    print(f"{'batch':>6} {'answers/s':>10} {'x batch 1':>10} {'same as batch 1':>16}")
    for bs, rate, ratio, same in rows:
        print(f"{bs:>6} {rate:>10.2f} {ratio:>10.2f} {same:>16}")


if __name__ == "__main__":
    main()
