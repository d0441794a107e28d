"""Build the offline demo's teacher, student init and prompt files: a tiny Llama that writes numbers in words.

    python examples/make_demo_teacher.py     # rebuilds data/demo_teacher, data/demo_student, data/numbers_*.jsonl
    python examples/make_demo_teacher.py --steps 200 --out /tmp/demo   # a quick (and bad) teacher somewhere else

The task: "Write 347 in words." -> "three hundred forty-seven", for every integer 0..9999 (American style, no "and").
Everything is seeded (and single-threaded by default), so the same torch version rebuilds the same files. The default
run (1,500 steps) took 366 s on one core of a busy 2-core machine and got all 1,000 held-out numbers right (numbers the
teacher never trained on); the result is written to data/demo_teacher/demo_teacher.json.

What it writes (all safetensors + a fast tokenizer with a chat template; each directory loads with transformers alone):
- `data/demo_teacher/`   the teacher: LlamaForCausalLM, hidden 128, 4 layers (~0.8M parameters, ~3 MB).
- `data/demo_student/`   a randomly initialised smaller Llama (hidden 64, 2 layers, ~0.13M parameters) with the
                         SAME tokenizer, which the demo trains by imitation (`--student data/demo_student --full`).
- `data/numbers_train.jsonl`  prompts the demo collects the teacher's answers to (`{"prompt": ..., "number": N}`).
- `data/numbers_eval.jsonl`   held-out prompts with the true answer (`{"prompt", "reference", "number"}`); the teacher
                         is never trained on these numbers, so its score on them is an honest held-out accuracy.

The tokenizer is a byte-level BPE trained on the task's own text, with every digit a single token (so the model reads
"347" as 3, 4, 7) and special tokens <|user|>, <|assistant|>, <|end|> ... used by the chat template below.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

LIMIT = 10_000  # the task covers 0 .. LIMIT-1
SEED = 1234
N_HELD_OUT = 1000  # numbers the teacher never trains on; the eval file is drawn from them
N_EVAL = 200  # rows in data/numbers_eval.jsonl
N_TRAIN_PROMPTS = 400  # rows in data/numbers_train.jsonl (what the demo collects)

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]

# Model shapes. The teacher is big enough to learn the task from ~9,000 numbers in a few thousand steps on CPU; the
# student is about 8x smaller, so imitation has something to do.
TEACHER_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}
STUDENT_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def in_words(n: int) -> str:
    """0 <= n < 1,000,000 in American English words: 347 -> 'three hundred forty-seven', 1005 -> 'one thousand five'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"{n} out of range")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + in_words(n % 100) if n % 100 else "")
    return in_words(n // 1000) + " thousand" + (" " + in_words(n % 1000) if n % 1000 else "")


def prompt_for(n: int) -> str:
    return f"Write {n} in words."


def split_numbers(seed: int = SEED) -> tuple[list[int], list[int]]:
    """(train numbers, held-out numbers): a fixed random split of 0..LIMIT-1."""
    rng = random.Random(seed)
    held = rng.sample(range(LIMIT), N_HELD_OUT)
    held_set = set(held)
    return [n for n in range(LIMIT) if n not in held_set], held


def make_tokenizer(out: Path):
    """A byte-level BPE trained on the task's text, digits as single tokens, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [f"{prompt_for(n)} {in_words(n)}" for n in range(0, LIMIT, 7)]
    corpus += ["You are a helpful assistant. Write the number in words.", "system user assistant"]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|end|>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def new_model(tok, shape: dict, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 24
    return model


def encode(tok, n: int) -> tuple[list[int], int]:
    """Token ids of the whole chat for number n, and how many of them are prompt (no loss on those)."""
    msgs = [{"role": "user", "content": prompt_for(n)}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": in_words(n)}], tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids, "chat template must extend the prompt"
    return f_ids, len(p_ids)


def generate(model, tok, numbers: list[int], batch_size: int = 100) -> list[str]:
    """Greedy answers for `numbers` (left padding, the chat template), as the hf teacher in `imitate collect` does."""
    import torch

    tok.padding_side = "left"
    outs: list[str] = []
    model.eval()
    for i in range(0, len(numbers), batch_size):
        chunk = numbers[i : i + batch_size]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": prompt_for(n)}], tokenize=False, add_generation_prompt=True
            )
            for n in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        outs += [t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    return outs


def accuracy(model, tok, numbers: list[int]) -> float:
    answers = generate(model, tok, numbers)
    return sum(a == in_words(n) for a, n in zip(answers, numbers)) / len(numbers)


def train_teacher(
    tok, train_numbers: list[int], *, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 250
):
    """Plain next-token training on the answers (prompt tokens masked), AdamW + warmup + cosine decay."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = new_model(tok, TEACHER_SHAPE, seed)
    encoded = {n: encode(tok, n) for n in train_numbers}
    # Sample by digit count first so 1- and 2-digit numbers (1% of the range) are learnt as well as 4-digit ones.
    by_len: dict[int, list[int]] = {}
    for n in train_numbers:
        by_len.setdefault(len(str(n)), []).append(n)
    lengths = sorted(by_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))

    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = [rng.choice(by_len[rng.choice(lengths)]) for _ in range(batch_size)]
        seqs = [encoded[n] for n in batch]
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((batch_size, width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            mask[i, : len(ids)] = 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(
                f"step {step:5d}/{steps}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - t0:.0f}s",
                file=sys.stderr,
            )
    return model


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_prompt_files(out: Path, seed: int = SEED) -> None:
    train, held = split_numbers(seed)
    rng = random.Random(seed + 1)
    write_jsonl(
        out / "numbers_train.jsonl",
        [{"prompt": prompt_for(n), "number": n} for n in rng.sample(train, N_TRAIN_PROMPTS)],
    )
    write_jsonl(
        out / "numbers_eval.jsonl",
        [{"prompt": prompt_for(n), "reference": in_words(n), "number": n} for n in held[:N_EVAL]],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "data", help="where to write (default: data/)")
    ap.add_argument("--steps", type=int, default=1500, help="teacher optimizer steps (default 1500)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the shipped files were built so)"
    )
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out: Path = args.out
    teacher_dir, student_dir = out / "demo_teacher", out / "demo_student"
    tok = make_tokenizer(teacher_dir)
    make_tokenizer(student_dir)
    write_prompt_files(out, args.seed)
    train, held = split_numbers(args.seed)

    student = new_model(tok, STUDENT_SHAPE, args.seed + 7)
    student.save_pretrained(student_dir, safe_serialization=True)

    t0 = time.time()
    teacher = train_teacher(tok, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    teacher.save_pretrained(teacher_dir, safe_serialization=True)
    acc = accuracy(teacher, tok, held)
    n_params = sum(p.numel() for p in teacher.parameters())
    summary = {
        "teacher": teacher_dir.name,
        "student": student_dir.name,
        "steps": args.steps,
        "threads": args.threads,
        "seed": args.seed,
        "teacher_parameters": n_params,
        "held_out_numbers": len(held),
        "held_out_exact": round(acc, 4),
        "train_seconds": round(time.time() - t0, 1),
    }
    (teacher_dir / "demo_teacher.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
