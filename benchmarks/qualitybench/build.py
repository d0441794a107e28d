"""Building a task: tokenizer, teacher, student init, collected records; greedy scoring of a trained model."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# the demo's special tokens and model builder (examples/make_demo_teacher.py)
from make_demo_teacher import SPECIAL, new_model

from . import ROOT
from .tasks import Task

TEACHER_SHAPE = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4}
STUDENT_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}  # the demo student's


def make_tokenizer(out: Path, corpus: list[str], template: str, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|end|>", unk_token=None)
    fast.chat_template = template
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def answer_batches(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(ids, number of prompt ids) per pair: the prompt as the chat template's generation prompt, then the answer
    text exactly as the rendered conversation continues it, then the end token."""
    out = []
    for p, a in pairs:
        msgs = [{"role": "user", "content": p}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": a}], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        n = f_ids.index(tok.eos_token_id, len(p_ids)) + 1  # through the answer's end token
        out.append((f_ids[:n], len(p_ids)))
    return out


def fit(model, encoded: list[tuple[list[int], int]], *, steps: int, batch_size: int, lr: float, seed: int,
        pad_id: int, warmup: float = 0.03) -> None:
    """THE REFERENCE LOOP (also trains the teachers): random batches, AdamW, linear warm-up then cosine decay to 0,
    mean CE over the answer tokens of the batch, gradient clipping at 1."""
    import torch
    import torch.nn.functional as F

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n_warm = int(warmup * steps)

    def lr_at(step: int) -> float:
        if step < n_warm:
            return lr * step / max(1, n_warm)
        return lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))

    order: list[int] = []
    model.train()
    for step in range(steps):
        if len(order) < batch_size:  # a fresh shuffle each epoch
            order += rng.sample(range(len(encoded)), len(encoded))
        batch, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (x, n_prompt) in enumerate(batch):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, n_prompt : len(x)] = torch.tensor(x[n_prompt:])
            mask[r, : len(x)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def greedy(model_dir: Path | object, tok, prompts: list[str], max_tokens: int) -> list[str]:
    from imitate.models import generate_batch

    model = model_dir
    if isinstance(model_dir, Path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    out = []
    for i in range(0, len(prompts), 100):
        msgs = [[{"role": "user", "content": p}] for p in prompts[i : i + 100]]
        out += [c.text for c in generate_batch(model, tok, msgs, max_tokens=max_tokens, temperature=0.0)]
    return out


def cli(*args: object) -> dict:
    """Run an `imitate` command in this process (as the CLI parses it) and return its --json summary."""
    from typer.testing import CliRunner

    from imitate.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args] + ["--json"], catch_exceptions=False)
    if res.exit_code != 0:
        raise SystemExit(f"imitate {' '.join(map(str, args[:1]))} failed ({res.exit_code}):\n{res.output[-3000:]}")
    return json.loads(res.stdout)


@dataclass
class Built:
    """A task ready to train on; plain data, so it can travel to worker processes (--jobs)."""

    task: Task
    teacher: Path
    student: Path  # the random init every mode starts from
    records: Path
    held: list[tuple[str, object]]
    teacher_acc: float
    train_cfg: dict  # lr, batch_size, epochs -> steps
    weak: Path | None = None  # a weaker teacher, for the team modes (teams.py)
    # cross-tokenizer modes (x_*): a student whose tokenizer is not the teacher's, and records with top-20 / top-5
    # log-probs (collected once more, with --logprobs 20); None unless an x_ mode runs
    xstudent: Path | None = None
    records_lp: dict | None = None  # {20: path, 5: path}

    @property
    def tok(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.teacher)

    @property
    def xtok(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.xstudent)


XSTUDENT_VOCAB = 272  # the teacher's BPE has 320 tokens; 272 leaves 9 merges past the byte alphabet: nearly bytes


def build_cross(b: Built, teach_text: list[str], work: Path) -> Built:
    """The cross-tokenizer side of a task: a student with its own byte-level BPE (XSTUDENT_VOCAB tokens, so other
    merges: digits and most words fall apart into bytes) and the same random-init shape, and the training prompts
    collected once more with --logprobs 20 (top-5 records cut from them)."""
    d = work / b.task.name
    xstudent = d / "xstudent"
    if not (xstudent / "model.safetensors").exists():
        tok = make_tokenizer(xstudent, teach_text, b.task.template, vocab_size=XSTUDENT_VOCAB)
        new_model(tok, STUDENT_SHAPE, seed=7).save_pretrained(xstudent, safe_serialization=True)
    lp20, lp5 = d / "collected_lp20.jsonl", d / "collected_lp5.jsonl"
    if not lp20.exists():
        flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
                 for k, v in b.task.collect.items()]
        cli("collect", "--teacher", f"hf:{b.teacher}", "--prompts", d / "prompts.jsonl", "--out", lp20,
            "--max-tokens", b.task.max_tokens, "--batch-size", 100, "--no-progress", "--logprobs", 20, *flags)
    rows = [json.loads(x) for x in lp20.read_text().splitlines()]
    for r in rows:
        for e in r.get("logprobs") or []:
            e["top"] = e["top"][:5]
    lp5.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dataclasses.replace(b, xstudent=xstudent, records_lp={20: lp20, 5: lp5})


def build(task: Task, work: Path, quick: bool, cross: bool = False) -> Built:
    from transformers import AutoTokenizer

    rng = random.Random(1234)
    teach, prompts, held = task.make(rng)
    d = work / task.name
    if task.demo:
        teacher, student = ROOT / "data/demo_teacher", ROOT / "data/demo_student"
        tok = AutoTokenizer.from_pretrained(teacher)
    else:
        teacher, student = d / "teacher", d / "student"
        if (teacher / "model.safetensors").exists():  # built by an earlier run with the same --work
            tok = AutoTokenizer.from_pretrained(teacher)
        else:
            tok = make_tokenizer(teacher, [f"{p} {a}" for p, a in teach[:5000]] + ["system user assistant"],
                                 task.template)
            model = new_model(tok, task.teacher_shape or TEACHER_SHAPE, seed=1)
            t0 = time.time()
            steps = task.teacher_steps // (3 if quick else 1)
            fit(model, answer_batches(tok, teach), steps=steps, batch_size=64, lr=3e-3, seed=1,
                pad_id=tok.pad_token_id, warmup=0.05)
            model.save_pretrained(teacher, safe_serialization=True)
            print(f"[{task.name}] teacher: {steps} steps in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if not (student / "model.safetensors").exists():
            tok.save_pretrained(student)
            new_model(tok, STUDENT_SHAPE, seed=7).save_pretrained(student, safe_serialization=True)
    teacher_acc = score(task, model_dir=teacher, tok=tok, held=held)
    prompt_file = d / "prompts.jsonl"
    prompt_file.parent.mkdir(parents=True, exist_ok=True)
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    records = d / "collected.jsonl"
    t0 = time.time()
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in task.collect.items()]
    cli("collect", "--teacher", f"hf:{teacher}", "--prompts", prompt_file, "--out", records, "--max-tokens",
        task.max_tokens, "--batch-size", 100, "--no-progress", *flags)
    n = sum(1 for _ in records.open())
    print(f"[{task.name}] collected {n} records in {time.time() - t0:.0f}s; teacher held-out {teacher_acc:.3f}",
          file=sys.stderr)
    cfg = dict(task.train)
    if quick:
        cfg["epochs"] = max(1, cfg["epochs"] // 3)
    cfg["steps"] = math.ceil(n / cfg["batch_size"]) * cfg["epochs"]
    built = Built(task, teacher, student, records, held, teacher_acc, cfg)
    return build_cross(built, [f"{p} {a}" for p, a in teach[:5000]], work) if cross else built


def score(task: Task, *, model_dir: Path, tok, held: list[tuple[str, object]]) -> float:
    answers = greedy(model_dir, tok, [p for p, _ in held], task.max_tokens)
    return sum(task.check(a, t) for a, (_, t) in zip(answers, held)) / len(held)
