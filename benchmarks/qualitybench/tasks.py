"""The tasks: prompts, the answers the teacher learns from, a checker for held-out answers."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

# the demo's chat template (examples/make_demo_teacher.py)
from make_demo_teacher import CHAT_TEMPLATE

from . import ROOT

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
