"""Does `imitate train` teach a student what a plain training loop would? Held-out accuracy on 4 tasks (+2 on request).

    python benchmarks/quality.py                          # all tasks, all modes, 3 seeds
    python benchmarks/quality.py --quick                  # fewer steps and 1 seed: a smoke run
    python benchmarks/quality.py --tasks lists,choice --seeds 2 --modes reference,sft
    python benchmarks/quality.py --tasks carry --modes sft,sft_kd,sft_op100     # long answers, on request only
    python benchmarks/quality.py --tasks sums --modes sft,gkd50_pure,op50_rkl_pure   # issue #27, on request only

Each task looks like users' data: several prompt templates (so length says which kind of question it is), answers of
its own length, held-out prompts the teacher never trained on. For each task the benchmark
1. trains a tokenizer (digits as single tokens) and a tiny Llama TEACHER with a plain loop (the demo task uses the
   shipped data/demo_teacher, see examples/make_demo_teacher.py),
2. collects the teacher's answers to the training prompts with `imitate collect --teacher hf:DIR`,
3. trains the same randomly initialised STUDENT on those records in each MODE (table columns), for each seed,
4. scores the student's greedy answers to the held-out prompts with the task's checker (exact answer, or any valid one).

Modes (MODES below; add a row by adding an entry):
- reference: a minimal PyTorch loop written here: random batches, AdamW, warm-up + cosine LR, CE on answer tokens
             through the end token and what the template writes after it (here "\n"), as imitate trains them. (Without
             that tail this loop scored 0.467 on `choice` instead of 0.618, 3 seeds: a target that matters.)
- sft:       `imitate train --full` with the same lr / batch size / steps.
- kd:        the same plus `--teacher hf:DIR` (imitate's KD defaults).
- sckd:      kd plus `--sckd`.
- op50, op100: kd plus `--on-policy 0.5` / `1.0` (issue #12): after the default warm-up (the first half of the steps
  off-policy) that fraction of micro-batches is answered by the student and graded by the teacher; answers capped at
  the task's max_tokens. op50_sckd: op50 plus `--sckd`. Also printed: the step-time ratio on-policy / off-policy,
  measured inside each on-policy run (its on-policy steps against its own warm-up steps, same load), the share of an
  on-policy step spent generating, and how often generation hit the cap.
- sft_sft, sft_kd, sft_op50, sft_op100, sft_op100_sckd, sft_op50_sckd, sft_op100_pure: from the `sft` mode's student
  of the same seed, as many steps again as plain SFT / off-policy KD / on-policy KD with λ 0.5 or 1 and no warm-up
  (the student already answers) / the same with --sckd / λ 1 with --no-on-policy-ce (on-policy micro-batches train
  KD only, never the records' answers). On request only: sft_op50_pure, and without CE as well sft_op100_t05 /
  sft_op100_t0 (on-policy sampling temperature 0.5 / greedy) and sft_op100_rkl (--kd reverse-kl). The README's
  advice for on-policy KD is to start from an SFT'd student; these rows compare it with the other ways of spending
  the same extra steps. Also printed: the mean step time of each sft_op mode over sft_kd's.
- kd_weak, team, team_sckd, team_mean, sel_none, sel_agree, takd (issue 25, on request): teams of teachers, answer
  selection and teacher assistants; see benchmarks/quality_teams.py.
- x_sft, x_kd, x_gb5, x_gb20 (issue #22, on request): a student whose tokenizer is NOT the teacher's (a byte-level BPE
  of XSTUDENT_VOCAB tokens trained here, so other merges; the same shape and init seed as the student) on the training
  prompts collected once more with --logprobs 20: SFT (--no-graybox), white-box KD from the teacher aligned by text
  (--teacher), gray-box KD from the records' top-5 and top-20 log-probs. Printed: each minus x_sft, and x_kd's gain over
  x_sft as a share of kd's gain over sft (the same-tokenizer student). Target: that share >= 0.5 on `choice`, no x_ mode
  below x_sft by more than the seed spread, x_gb20 >= x_sft.
- gkd50, gkd100 (+ _pure): the reference GKD loop (`fit_gkd`, written here, sharing only data and models with
  imitate): `fit`'s batches and schedule, 0.5·CE + 0.5·reverse KL on the collected answers; from half-way, with
  probability λ a step is on-policy (the student samples at temperature 1 with a plain no-cache, no-padding loop
  and trains 0.5·token-mean reverse KL on its tokens, + 0.5·CE on the records' answers unless _pure).
  op50_rkl, op100_rkl (+ _pure): imitate with the same loss (`--kd reverse-kl`, `--no-on-policy-ce` for _pure).
  All on request (--modes).
Targets (issue #10): sft within 0.02 of reference on every task; kd >= sft where the teacher's distribution carries more
than its argmax (the `choice` task: several valid answers, sampled at collect time); sckd not below kd by more than the
seed spread. Issue #12: on-policy KD above off-policy KD by more than the seed spread on a task with multi-token
answers, and never below SFT beyond it. The table prints mean ± standard deviation over seeds and the wall time per
mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
# the demo's chat template, special tokens and model builder (examples/make_demo_teacher.py)
from make_demo_teacher import CHAT_TEMPLATE, SPECIAL, new_model  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import quality_teams as teams  # noqa: E402

# Like many real templates, this one writes a space between the role and the content, while its generation prompt
# stops at the role: a teacher trained on its renderings answers with a leading space (" March 7, 2024").
SPACE_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|> {{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


# ---------------------------------------------------------------------------------------------------------------------
# tasks: prompts, the answers the teacher learns from, a checker for held-out answers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    make: Callable[[random.Random], tuple[list[tuple[str, str]], list[str], list[tuple[str, object]]]]
    # make(rng) -> (teacher's training pairs (prompt, answer), collect prompts, held-out (prompt, truth))
    check: Callable[[str, object], bool]  # (student answer, truth) -> correct
    template: str = CHAT_TEMPLATE
    teacher_steps: int = 1500
    collect: dict = field(default_factory=lambda: {"temperature": 0})  # imitate collect options
    train: dict = field(default_factory=dict)  # lr, batch_size, epochs for every mode
    max_tokens: int = 24
    demo: bool = False  # the shipped demo teacher / student / prompt files
    teacher_shape: dict | None = None  # None: TEACHER_SHAPE


def _lists(rng: random.Random):
    def one(nums: list[int]) -> tuple[str, str]:
        kind = rng.randrange(4)
        s, c = " ".join(map(str, nums)), ", ".join(map(str, nums))
        if kind == 0:
            return f"Sort: {s}", " ".join(map(str, sorted(nums)))
        if kind == 1:
            return f"Put these numbers in ascending order: {c}.", " ".join(map(str, sorted(nums)))
        if kind == 2:
            return f"Reverse: {s}", " ".join(map(str, nums[::-1]))
        return f"Write the list {c} backwards, please.", " ".join(map(str, nums[::-1]))

    def lists(n: int) -> list[list[int]]:
        return [[rng.randrange(10) for _ in range(rng.randint(3, 8))] for _ in range(n)]

    teach = [one(x) for x in lists(20000)]
    held_lists = lists(200)
    held_keys = {" ".join(map(str, x)) for x in held_lists}
    teach = [(p, a) for p, a in teach if not any(k in p for k in held_keys)]
    collect = [one(x)[0] for x in lists(400)]
    collect = [p for p in collect if not any(k in p for k in held_keys)]
    held = [one(x) for x in held_lists]
    return teach, collect, held


def _date_prompt(rng: random.Random, y: int, m: int, d: int) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return f"Convert {y}-{m:02d}-{d:02d} to words."
    if kind == 1:
        return f"Write the date {d:02d}/{m:02d}/{y} (day/month/year) in full."
    return f"Which date is {m}/{d}/{y}? Answer with month, day and year."


def _split(draw: Callable[[], tuple], pair: Callable[[tuple], tuple[str, str]], n_collect: int = 400):
    """200 distinct held-out inputs, then inputs drawn apart from them: (the teacher's 20000 training pairs, the
    n_collect prompts to collect, the held-out inputs in sorted order)."""
    held = {draw() for _ in range(200)}
    pool = [x for x in (draw() for _ in range(30000)) if x not in held]
    teach = [pair(x) for x in pool[:20000]]
    collect = [pair(x)[0] for x in pool[20000 : 20000 + n_collect]]
    return teach, collect, sorted(held)


def _dates(rng: random.Random):
    def date() -> tuple[int, int, int]:
        return rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)

    def pair(x):
        return _date_prompt(rng, *x), f"{MONTHS[x[1] - 1]} {x[2]}, {x[0]}"

    teach, collect, held = _split(date, pair)
    return teach, collect, [pair(x) for x in held]


def _choice(rng: random.Random):
    """Several valid answers per prompt: the teacher learns a spread over them and collect samples from it."""

    def prompt() -> tuple[str, tuple[int, int, str]]:
        a = rng.randint(0, 80)
        b = a + rng.randint(3, 15)
        kind = rng.randrange(3)
        if kind == 0:
            return f"Name a number between {a} and {b}.", (a + 1, b - 1, "any")
        if kind == 1:
            return f"Give me any integer greater than {a} and less than {b}, nothing else.", (a + 1, b - 1, "any")
        return f"Pick an even number from {a} to {b}.", (a, b, "even")

    def valid(t: tuple[int, int, str]) -> list[int]:
        return [n for n in range(t[0], t[1] + 1) if t[2] == "any" or n % 2 == 0]

    held = [prompt() for _ in range(200)]
    held_p = {p for p, _ in held}
    teach = []
    while len(teach) < 20000:
        p, t = prompt()
        if p not in held_p:
            teach.append((p, str(rng.choice(valid(t)))))
    collect = []
    while len(collect) < 200:
        p, _ = prompt()
        if p not in held_p:
            collect.append(p)
    return teach, collect, held


def _carry(rng: random.Random):
    """Long answers where an early slip derails the rest: column addition written out step by step, right to left
    ("6+7=13, 9+5+1=15, 2+0+1=3, so 353"), each step's carry feeding the next."""

    def pair(x: tuple[int, int]) -> tuple[str, str]:
        a, b = x
        kind = rng.randrange(3)
        if kind == 0:
            p = f"Add {a} and {b} step by step."
        elif kind == 1:
            p = f"What is {a} + {b}? Work through the columns."
        else:
            p = f"Column by column, compute the sum of {a} and {b}."
        da, db, steps, carry = str(a)[::-1], str(b)[::-1], [], 0
        for i in range(max(len(da), len(db))):
            x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={x + y + carry}")
            carry = (x + y + carry) // 10
        return p, ", ".join(steps) + f", so {a + b}"

    def operands() -> tuple[int, int]:
        return rng.randint(10, 999), rng.randint(10, 999)

    teach, collect, held = _split(operands, pair, n_collect=1200)  # a small student needs more than 400 for this
    return teach, collect, [(pair(x)[0], sum(x)) for x in held]


def _sums(rng: random.Random):
    """Two-number addition asked in words, four templates; the answer restates the question: "47 plus 38 is 85."
    (issue #27: the shape on which on-policy KD pulled a trained student from about 0.9 to 0.3-0.5)."""

    templates = ["What is {a} plus {b}?", "Add {a} and {b}.", "Could you tell me the sum of {a} and {b}, please?",
                 "If I have {a} apples and get {b} more, how many apples do I have?"]

    def pair(x: tuple[int, int]) -> tuple[str, str]:
        a, b = x
        return rng.choice(templates).format(a=a, b=b), f"{a} plus {b} is {a + b}."

    def operands() -> tuple[int, int]:
        return rng.randint(10, 99), rng.randint(10, 99)

    teach, collect, held = _split(operands, pair, n_collect=1500)
    return teach, collect, [(pair(x)[0], f"{x[0]} plus {x[1]} is {sum(x)}.") for x in held]


def _check_carry(answer: str, truth: object) -> bool:
    """Only the final sum counts (what a user of the answer reads)."""
    return answer.strip().rsplit("so ", 1)[-1].strip() == str(truth)


def _check_choice(answer: str, truth: object) -> bool:
    lo, hi, kind = truth  # type: ignore[misc]
    a = answer.strip()
    return a.isdigit() and lo <= int(a) <= hi and (kind == "any" or int(a) % 2 == 0)


def _demo(rng: random.Random):
    rows = [json.loads(x) for x in (ROOT / "data/numbers_train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (ROOT / "data/numbers_eval.jsonl").read_text().splitlines()]
    return [], [r["prompt"] for r in rows], [(r["prompt"], r["reference"]) for r in held]


def _exact(answer: str, truth: object) -> bool:
    return answer.strip() == str(truth).strip()


TASKS: dict[str, Task] = {
    # the offline demo: one template, mid-length answers in words (examples/demo.toml's data, lr and batch size)
    "numbers": Task("numbers", _demo, _exact, demo=True, train={"lr": 3e-3, "batch_size": 16, "epochs": 12}),
    # four templates (two of them ask for the same operation), answers of 3..8 digits
    "lists": Task("lists", _lists, _exact, teacher_steps=400, train={"lr": 3e-3, "batch_size": 16, "epochs": 12}),
    # three date formats in, one out; the template puts a space after the role (answers start with a space)
    "dates": Task("dates", _dates, _exact, template=SPACE_TEMPLATE, teacher_steps=500,
                  train={"lr": 3e-3, "batch_size": 16, "epochs": 12}),
    # several valid answers: answers sampled from the teacher (temperature 1, 2 samples per prompt)
    "choice": Task("choice", _choice, _check_choice, teacher_steps=500, max_tokens=6,
                   collect={"temperature": 1.0, "n": 2}, train={"lr": 3e-3, "batch_size": 16, "epochs": 12}),
    # on request (--tasks carry): long answers (20-40 tokens) whose steps depend on each other, for on-policy KD
    "carry": Task("carry", _carry, _check_carry, teacher_steps=1500, max_tokens=48,
                  train={"lr": 3e-3, "batch_size": 16, "epochs": 12}),
    # on request (--tasks sums), issue #27: addition in words, four templates, a leading space (SPACE_TEMPLATE), answers
    # of 13-14 tokens, 1463 records; the teacher (0.41M parameters, 3.3x the student: the 15x teacher took too
    # long to train on a shared CPU) reaches 1.000 held-out and is near-deterministic; batch 32 and 1472 steps as there
    "sums": Task("sums", _sums, _exact, template=SPACE_TEMPLATE, teacher_steps=900, max_tokens=16,
                 teacher_shape={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                                "num_attention_heads": 4},
                 train={"lr": 3e-3, "batch_size": 32, "epochs": 32}),
}
EXTRA_TASKS = ("carry", "sums")

TEACHER_SHAPE = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4}
STUDENT_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}  # the demo student's


# ---------------------------------------------------------------------------------------------------------------------
# building a task: tokenizer, teacher, student init, collected records
# ---------------------------------------------------------------------------------------------------------------------


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
    weak: Path | None = None  # a weaker teacher, for the team modes (benchmarks/quality_teams.py)
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


# ---------------------------------------------------------------------------------------------------------------------
# modes: (built task, seed, output dir) -> trained student directory
# ---------------------------------------------------------------------------------------------------------------------


def reference_records(b: Built) -> list[tuple[list[int], int, int]]:
    """The records as the reference loops train them: (prompt as generation prompt + the teacher's answer text as
    written + end token + what the template writes after it (here "\n"), number of prompt ids, number of ids through
    the end token). imitate trains that tail too, so the reference does, and the columns differ only in the loop."""
    from imitate.records import read_records

    tok = b.tok
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    rendered = tok.apply_chat_template(probe, tokenize=False)
    tail = tok(rendered[rendered.rindex(tok.eos_token) + len(tok.eos_token):], add_special_tokens=False)["input_ids"]
    out = []
    for ln in read_records([b.records], need_assistant=True):
        msgs = ln.data["messages"]
        p_ids = tok.apply_chat_template([{"role": "user", "content": msgs[-2]["content"]}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
        a_ids = tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
        ids = list(p_ids) + a_ids + [tok.eos_token_id]
        out.append((ids + tail, len(p_ids), len(ids)))
    return out


def reference(b: Built, seed: int, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(b.student)
    fit(model, [(ids, n) for ids, n, _ in reference_records(b)], steps=b.train_cfg["steps"],
        batch_size=b.train_cfg["batch_size"], lr=b.train_cfg["lr"], seed=seed, pad_id=b.tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    return out


def sample_answers(model, prompts: list[list[int]], *, eos_id: int, max_tokens: int, gen) -> list[list[int]]:
    """The student's answers at temperature 1, the plain way: prompts of equal length together (no padding at all),
    a full forward per new token (no cache), a token drawn from softmax of the last position, stop after the end
    token (kept) or at max_tokens."""
    import torch

    answers: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    with torch.no_grad():
        for rows in groups.values():
            seqs = torch.tensor([prompts[i] for i in rows])
            live = list(range(len(rows)))
            for _ in range(max_tokens):
                probs = torch.softmax(model(input_ids=seqs[live]).logits[:, -1].double(), -1)
                nxt = torch.multinomial(probs, 1, generator=gen)
                seqs = torch.cat([seqs, torch.zeros(len(rows), 1, dtype=torch.long)], 1)
                seqs[live, -1] = nxt[:, 0]
                for k, r in enumerate(live):
                    answers[rows[r]].append(int(nxt[k, 0]))
                live = [r for k, r in enumerate(live) if int(nxt[k, 0]) != eos_id]
                if not live:
                    break
    return answers


def gkd_losses(model, teacher, seqs: list[list[int]], starts: list[int], ends: list[int], pad_id: int):
    """(CE summed over each sequence's tokens [starts, len), reverse KL(student || teacher) at temperature 1 summed
    over the positions predicting tokens [starts, ends), and the two token counts): full logits, one padded batch
    (right padding, so positions need no care)."""
    import torch
    import torch.nn.functional as F

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    ce_at = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions t whose NEXT token is trained
    kd_at = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (x, a, e) in enumerate(zip(seqs, starts, ends)):
        ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
        ce_at[r, a - 1 : len(x) - 1] = True
        kd_at[r, a - 1 : e - 1] = True
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    nxt = torch.roll(ids, -1, 1)
    ce = F.cross_entropy(logits[ce_at], nxt[ce_at], reduction="sum")
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float()[kd_at], -1)
    s_logp = torch.log_softmax(logits[kd_at], -1)
    rkl = (s_logp.exp() * (s_logp - t_logp)).sum()
    return ce, rkl, int(ce_at.sum()), int(kd_at.sum())


def fit_gkd(model, teacher, encoded: list[tuple[list[int], int, int]], *, steps: int, batch_size: int, lr: float,
            seed: int, pad_id: int, eos_id: int, lam: float, max_tokens: int, w: float = 0.5, ce: bool = True,
            first: int | None = None, warmup: float = 0.03, trace: list | None = None) -> None:
    """THE REFERENCE GKD LOOP: `fit`'s batches, schedule and clipping; each step's loss is token means. Off-policy
    steps: (1 - w)·CE + w·reverse KL on the collected answers (KL through the end token, not the template's tail).
    From step `first` (default: half the steps), with probability lam a step is on-policy: the student samples its
    answers (temperature 1, at most max_tokens, `sample_answers`) and trains w·(token-mean reverse KL to the teacher
    on its own tokens), plus (1 - w)·CE on the same records' collected answers when `ce`. trace: gets one
    (step, on-policy, loss, KL per token) tuple per step."""
    import torch

    rng, coin = random.Random(seed), random.Random(seed + 1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n_warm, first = int(warmup * steps), steps // 2 if first is None else first
    teacher.eval()
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
        on = step >= first and coin.random() < lam
        seqs, starts, ends = [x for x, _, _ in batch], [n for _, n, _ in batch], [e for _, _, e in batch]
        ce_sum, kl_sum, n_ce, n_kl = gkd_losses(model, teacher, seqs, starts, ends, pad_id)
        loss = (1 - w) * ce_sum / n_ce + w * kl_sum / n_kl
        if on:
            model.eval()  # no dropout while sampling
            answers = sample_answers(model, [x[:n] for x, n, _ in batch], eos_id=eos_id, max_tokens=max_tokens,
                                     gen=gen)
            model.train()
            own = [x[:n] + a for (x, n, _), a in zip(batch, answers)]
            _, kl_sum, _, n_kl = gkd_losses(model, teacher, own, starts, [len(x) for x in own], pad_id)
            loss = w * kl_sum / n_kl + ((1 - w) * ce_sum / n_ce if ce else 0.0)
        if trace is not None:
            trace.append((step, on, float(loss.detach()), float(kl_sum.detach()) / n_kl))
        lr_now = lr * step / max(1, n_warm) if step < n_warm else \
            lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))
        for g in opt.param_groups:
            g["lr"] = lr_now
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def reference_gkd(lam: float, ce: bool = True) -> Callable[[Built, int, Path], Path]:
    """The reference GKD loop (`fit_gkd`) as a mode: random-init student, half the steps off-policy first."""

    def train(b: Built, seed: int, out: Path) -> Path:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(b.student)
        teacher = AutoModelForCausalLM.from_pretrained(b.teacher)
        tok = b.tok
        fit_gkd(model, teacher, reference_records(b), steps=b.train_cfg["steps"], batch_size=b.train_cfg["batch_size"],
                lr=b.train_cfg["lr"], seed=seed, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, lam=lam,
                max_tokens=b.task.max_tokens, ce=ce)
        model.save_pretrained(out, safe_serialization=True)
        return out

    return train


def imitate_train(*extra: object) -> Callable[[Built, int, Path], Path]:
    def train(b: Built, seed: int, out: Path) -> Path:
        cfg = b.train_cfg
        cli("train", "--data", b.records, "--student", b.student, "--out", out, "--full", "--lr", cfg["lr"],
            "--batch-size", cfg["batch_size"], "--epochs", cfg["epochs"], "--eval-split", 0, "--save-every", 0,
            "--seed", seed, "--no-progress",
            *[f"hf:{b.teacher}" if x == "TEACHER" else f"hf:{b.weak}" if x == "WEAK" else
              b.task.max_tokens if x == "MAXTOK" else x for x in extra])
        return out

    return train


def after_sft(*extra: object) -> Callable[[Built, int, Path], Path]:
    """Two stages: the `sft` mode's training (into OUT-start), then the same number of steps again from that student
    with `extra` (on-policy from the first step: the student already answers, so no warm-up)."""
    first, second = imitate_train(), imitate_train(*extra, "--on-policy-warmup", 0)

    def train(b: Built, seed: int, out: Path) -> Path:
        # the sft mode's student when it has finished (train_config.json is written last), else a run of its own
        start = out.with_name(f"sft-{seed}")
        if not (start / "train_config.json").exists():
            start = out.with_name(out.name + "-start")
        if not (start / "train_config.json").exists():
            first(b, seed, start)
        return second(dataclasses.replace(b, student=start), seed, out)

    return train


def on_policy(lam: float, *more: object) -> tuple:
    """imitate train flags for on-policy KD with fraction `lam`, answers capped at the task's max tokens."""
    return ("--teacher", "TEACHER", "--on-policy", lam, "--on-policy-max-tokens", "MAXTOK", *more)


MODES: dict[str, Callable[[Built, int, Path], Path]] = {
    "reference": reference,
    "sft": imitate_train(),
    "kd": imitate_train("--teacher", "TEACHER"),
    "sckd": imitate_train("--teacher", "TEACHER", "--sckd"),
    "op50": imitate_train(*on_policy(0.5)),
    "op100": imitate_train(*on_policy(1.0)),
    "op50_sckd": imitate_train(*on_policy(0.5, "--sckd")),
    # issue #27: the reference GKD loop (fit_gkd) and imitate with its loss (reverse KL, w 0.5), both from a random
    # init with half the steps off-policy first; "_pure": on-policy steps train KD only (--no-on-policy-ce)
    "gkd50": reference_gkd(0.5),
    "gkd100": reference_gkd(1.0),
    "gkd50_pure": reference_gkd(0.5, ce=False),
    "gkd100_pure": reference_gkd(1.0, ce=False),
    "op50_rkl": imitate_train(*on_policy(0.5, "--kd", "reverse-kl")),
    "op100_rkl": imitate_train(*on_policy(1.0, "--kd", "reverse-kl")),
    "op50_rkl_pure": imitate_train(*on_policy(0.5, "--kd", "reverse-kl", "--no-on-policy-ce")),
    "op100_rkl_pure": imitate_train(*on_policy(1.0, "--kd", "reverse-kl", "--no-on-policy-ce")),
    # from an SFT'd student (the README's advice for on-policy): the sft run, then as many steps again
    "sft_sft": after_sft(),
    "sft_kd": after_sft("--teacher", "TEACHER"),
    "sft_op100": after_sft(*on_policy(1.0)),
    "sft_op50": after_sft(*on_policy(0.5)),
    "sft_op100_sckd": after_sft(*on_policy(1.0, "--sckd")),
    "sft_op50_sckd": after_sft(*on_policy(0.5, "--sckd")),
    "sft_op100_pure": after_sft(*on_policy(1.0, "--no-on-policy-ce")),
    # variants run on request (--modes), not by default: λ 0.5 without CE, the sampling temperature and the divergence
    # of on-policy KD (these three without CE, as the README measured them)
    "sft_op50_pure": after_sft(*on_policy(0.5, "--no-on-policy-ce")),
    "sft_op100_t05": after_sft(*on_policy(1.0, "--no-on-policy-ce", "--on-policy-temperature", 0.5)),
    "sft_op100_t0": after_sft(*on_policy(1.0, "--no-on-policy-ce", "--on-policy-temperature", 0)),
    "sft_op100_rkl": after_sft(*on_policy(1.0, "--no-on-policy-ce", "--kd", "reverse-kl")),
}


def cross_train(records: int, *extra: object) -> Callable[[Built, int, Path], Path]:
    """imitate train of the other-tokenizer student (`Built.xstudent`) on the top-20 (records=20) or top-5 log-prob
    records, with `extra` flags."""
    def train(b: Built, seed: int, out: Path) -> Path:
        assert b.xstudent is not None and b.records_lp is not None
        return imitate_train(*extra)(dataclasses.replace(b, student=b.xstudent, records=b.records_lp[records]), seed,
                                     out)

    return train


# cross-tokenizer (issue #22): a student whose tokenizer is not the teacher's, on records collected with --logprobs 20
MODES.update({
    "x_sft": cross_train(20, "--no-graybox"),  # its SFT baseline: the log-probs ignored
    "x_kd": cross_train(20, "--no-graybox", "--teacher", "TEACHER"),  # white-box, aligned by text
    "x_gb5": cross_train(5),  # gray-box from the records' top-5
    "x_gb20": cross_train(20),  # gray-box from the records' top-20
})
X_MODES = ("x_sft", "x_kd", "x_gb5", "x_gb20")
EXTRA_MODES = ["sft_op50_pure", "sft_op100_t05", "sft_op100_t0", "sft_op100_rkl", "gkd50", "gkd100", "gkd50_pure",
               "gkd100_pure", "op50_rkl", "op100_rkl", "op50_rkl_pure", "op100_rkl_pure", *X_MODES]
teams.register(sys.modules[__name__], MODES, EXTRA_MODES)  # teams of teachers, selection, TAKD (issue 25)


def run_costs(out: Path) -> dict | None:
    """From an imitate run's metrics.jsonl (None for the reference loop, which writes none): the mean optimizer step
    time (`step_s`, for ratios between modes), and for a run with both on-policy and off-policy (warm-up) steps the
    step-time ratio of the two kinds, the generation share of on-policy steps, the cap-hit rate and the mean
    generated length."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if "step_s" in r]  # not the eval_loss rows
    costs = {"step_s": statistics.mean(r["step_s"] for r in rows)}
    costs.update({k: v for k, v in rows[-1].items() if k.startswith("on_rate/")})  # SCKD: the whole run's on-rates
    on = [r for r in rows if r.get("onpolicy/share", 0) > 0]
    off = [r for r in rows if r.get("onpolicy/share") == 0]
    if on and off:
        on_s, off_s = statistics.mean(r["step_s"] for r in on), statistics.mean(r["step_s"] for r in off)
        costs.update(ratio=on_s / off_s, gen=sum(r["gen_s"] for r in on) / sum(r["step_s"] for r in on),
                     cap=statistics.mean(r["onpolicy/cap_hit"] for r in on),
                     len=statistics.mean(r["onpolicy/gen_tokens"] for r in on))
    return costs


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(t for t in TASKS if t not in EXTRA_TASKS),
                    help=f"comma-separated, from {', '.join(TASKS)} (default: all but {', '.join(EXTRA_TASKS)})")
    ap.add_argument("--modes", default=",".join(m for m in MODES if m not in EXTRA_MODES),
                    help=f"comma-separated, from {', '.join(MODES)} (default: all but {', '.join(EXTRA_MODES)})")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per mode (default 3; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="a third of the steps, 1 seed: checks that it runs")
    ap.add_argument("--work", type=Path, default=None, help="keep models and records here (default: a temp dir)")
    ap.add_argument("--runs", type=Path, default=None, help="trained students go here (default: --work)")
    ap.add_argument("--reuse", action="store_true",
                    help="score students already trained under --runs instead of training them again")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training (default 1: tiny models)")
    ap.add_argument("--jobs", type=int, default=1, help="trainings run side by side in separate processes")
    args = ap.parse_args(argv)
    tasks = [TASKS[t] for t in args.tasks.split(",")]
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
    seeds = list(range(1 if args.quick and args.seeds == 3 else args.seeds))

    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = args.work or Path(tempfile.mkdtemp(prefix="imitate-quality-"))
    t_all = time.time()
    built: dict[str, Built] = {}
    units: list[tuple] = []
    futures: list = []
    pool = None
    if args.jobs > 1:  # independent trainings side by side, one process each ("spawn": no forked torch state)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
    for task in tasks:  # a task's trainings start as soon as it is built, while the next task builds
        b = built[task.name] = teams.prepare(build(task, work, args.quick, cross=any(m in X_MODES for m in modes)),
                                             modes, args.quick)
        for m in modes:
            for s in seeds:
                out = (args.runs or work) / task.name / f"{m}-{s}"
                units.append(unit := (b, m, s, out, args.threads, args.reuse))
                futures.append(pool.submit(run_unit, unit) if pool is not None else run_unit(unit))
    results = [f.result() for f in futures] if pool is not None else futures
    if pool is not None:
        pool.shutdown()
    table: list[dict] = []
    for name, b in built.items():
        row = {"task": name, "records": sum(1 for _ in b.records.open()), "steps": b.train_cfg["steps"],
               "teacher": b.teacher_acc}
        for m in modes:
            got = [r for u, r in zip(units, results) if u[0] is b and u[1] == m]
            accs = [r[0] for r in got]
            times = [r[1] for r in got if r[1] is not None]
            row[m] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      statistics.mean(times) if times else None)
            row[f"accs/{m}"] = accs  # in seed order: modes that share a start compare seed by seed
            costs = [r[2] for r in got if r[2] is not None]
            if costs:
                row[f"cost/{m}"] = {k: statistics.mean(c[k] for c in costs) for k in set.intersection(*map(set, costs))}
            print(f"[{name}] {m}: {' '.join(f'{a:.3f}' for a in accs)}", file=sys.stderr)
        table.append(row)
    print_table(table, modes, seeds, time.time() - t_all, args)
    return 0


def run_unit(unit: tuple) -> tuple[float, float | None, dict | None]:
    """Train one (task, mode, seed) and score it: (held-out accuracy, training seconds or None when reused,
    run_costs or None)."""
    b, mode, seed, out, threads, reuse = unit
    import torch

    torch.set_num_threads(threads)
    t0 = time.time()
    seconds = None
    if not (reuse and (out / "model.safetensors").exists()):
        MODES[mode](b, seed, out)
        seconds = time.time() - t0
    acc = score(b.task, model_dir=out, tok=b.xtok if mode in X_MODES else b.tok, held=b.held)
    took = "trained earlier" if seconds is None else f"{seconds:.0f}s"
    print(f"[{b.task.name}] {mode} seed {seed}: {acc:.3f} ({took})", file=sys.stderr, flush=True)
    return acc, seconds, run_costs(out)


def paired(a: list[float], b: list[float]) -> str:
    """Seed-by-seed differences of two modes that start from the same students: their spread leaves out how good
    each seed's start was, which dominates the spread of either mode alone."""
    d = [x - y for x, y in zip(a, b)]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return f"paired {statistics.mean(d):+.3f} ± {sd:.3f}, higher in {sum(x > 0 for x in d)}/{len(d)} seeds"


def print_table(table: list[dict], modes: list[str], seeds: list[int], elapsed: float, args) -> None:
    print(f"\nheld-out accuracy, mean ± std over {len(seeds)} seed(s) (training seconds per run, 'earlier': trained by "
          f"an earlier invocation, --reuse); torch threads {args.threads}, "
          f"{args.jobs} job(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    head = "| task | records | steps | teacher | " + " | ".join(modes) + " |"
    print(head)
    print("|" + "---|" * (4 + len(modes)))
    for r in table:
        cells = [f"{r[m][0]:.3f} ± {r[m][1]:.3f} ({'earlier' if r[m][2] is None else f'{r[m][2]:.0f}s'})"
                 for m in modes]
        print(f"| {r['task']} | {r['records']} | {r['steps']} | {r['teacher']:.3f} | " + " | ".join(cells) + " |")
    if "reference" in modes and "sft" in modes:
        gaps = ", ".join(f"{r['task']} {r['sft'][0] - r['reference'][0]:+.3f}" for r in table)
        print(f"sft - reference: {gaps}  (target: within 0.02)")
    if "kd" in modes and "sft" in modes:
        print("kd - sft: " + ", ".join(f"{r['task']} {r['kd'][0] - r['sft'][0]:+.3f}" for r in table))
    if "x_sft" in modes:  # issue #22's targets
        for m in (m for m in ("x_kd", "x_gb5", "x_gb20") if m in modes):
            print(f"{m} - x_sft: " + ", ".join(
                f"{r['task']} {r[m][0] - r['x_sft'][0]:+.3f} (spread {max(r[m][1], r['x_sft'][1]):.3f})"
                for r in table))
        if "kd" in modes and "sft" in modes and "x_kd" in modes:
            share = ", ".join(f"{r['task']} " + (f"{(r['x_kd'][0] - r['x_sft'][0]) / (r['kd'][0] - r['sft'][0]):.2f}"
                                                 if r["kd"][0] != r["sft"][0] else "n/a (kd = sft)") for r in table)
            print(f"cross-tokenizer share of same-tokenizer KD's gain over SFT ((x_kd - x_sft) / (kd - sft)): {share}")
    if "sckd" in modes and "kd" in modes:
        print("sckd - kd: " + ", ".join(f"{r['task']} {r['sckd'][0] - r['kd'][0]:+.3f}" for r in table))
    for m in (m for m in modes if m.startswith("sft_op")):  # from the same SFT'd students
        for base in ("sft_kd", "sft_sft"):
            if base in modes:
                print(f"{m} - {base}: " + ", ".join(
                    f"{r['task']} {r[m][0] - r[base][0]:+.3f} (spread {max(r[m][1], r[base][1]):.3f}; "
                    f"{paired(r[f'accs/{m}'], r[f'accs/{base}'])})" for r in table))
        if "sft_kd" in modes:
            print(f"{m} step time / sft_kd step time: " + ", ".join(
                f"{r['task']} {r[f'cost/{m}']['step_s'] / r['cost/sft_kd']['step_s']:.2f}x" for r in table
                if f"cost/{m}" in r and "cost/sft_kd" in r))
    for m in (m for m in modes if m.startswith("op")):
        for base in ("kd", "sft"):
            if base in modes:
                print(f"{m} - {base}: " + ", ".join(
                    f"{r['task']} {r[m][0] - r[base][0]:+.3f} (spread {max(r[m][1], r[base][1]):.3f})" for r in table))
        print(f"{m} step time on-policy / off-policy (same run): " + ", ".join(
            f"{r['task']} {c['ratio']:.2f}x (generation {c['gen']:.0%} of an on-policy step, {c['len']:.1f} tokens, "
            f"cap hit {c['cap']:.0%})" for r in table if "ratio" in (c := r.get(f"cost/{m}", {}))))
    teams.report(table, modes)
    print(f"total {elapsed:.0f}s")


if __name__ == "__main__":
    raise SystemExit(main())
