"""Teams of teachers in benchmarks/quality.py (issue 25): extra modes, run on request with --modes.

    python benchmarks/quality.py --tasks choice --modes kd,kd_weak,team_mean,team,team_sckd --seeds 10
    python benchmarks/quality.py --tasks numbers --modes sel_none,sel_agree --seeds 10
    python benchmarks/quality.py --tasks numbers,lists --modes kd,takd --seeds 10

- kd_weak: KD from a weaker teacher alone: the task's teacher architecture trained for a fifth of its steps (seed 2).
- team: KD from the task's teacher and the weak one, one term each, no gate; team_sckd: the same with --sckd (a gate
  per teacher; its on-rates are printed); team_mean: --teacher-mix mean (one term against the average of the two).
  Target: team_sckd >= kd (the best single teacher) within the seed spread, and the weak teacher's on-rate below the
  strong one's. The records are the task teacher's collected answers in every mode.
- sel_none / sel_agree: SFT on five answers per prompt from a scripted teacher wrong a third of the time (each answer
  is the task teacher's collected answer with probability 2/3, else the collected answer of another prompt; fixed
  data, seed 99), cleaned without dedup (duplicates are the point) with --select none / --select agree, then trained
  for the task's SFT step count (the same for both). Target: agree above none by more than the seed spread.
- takd: teacher -> assistant (`imitate init-student` keeping about half the teacher's layers, at least 2; trained
  with KD from the teacher) -> student (KD from the assistant), per seed; compare with kd (direct KD).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from make_demo_teacher import new_model

from .build import TEACHER_SHAPE, answer_batches, cli, fit, score
from .runs import imitate_train

TEAM_MODES = ("kd_weak", "team", "team_sckd", "team_mean")
MODES_HERE = (*TEAM_MODES, "sel_none", "sel_agree", "takd")


def register(modes: dict[str, Callable], extra: list[str]) -> None:
    """Add this file's modes to MODES (modes.py), as modes run on request only."""
    modes.update({
        "kd_weak": imitate_train("--teacher", "WEAK"),
        "team": imitate_train("--teacher", "TEACHER", "--teacher", "WEAK"),
        "team_sckd": imitate_train("--teacher", "TEACHER", "--teacher", "WEAK", "--sckd"),
        "team_mean": imitate_train("--teacher", "TEACHER", "--teacher", "WEAK", "--teacher-mix", "mean"),
        "sel_none": selected("none"),
        "sel_agree": selected("agree"),
        "takd": takd,
    })
    extra.extend(MODES_HERE)


def prepare(b: Any, modes: list[str], quick: bool) -> Any:
    """Build what the selected modes need before trainings start (in this process: workers only read it)."""
    if any(m in TEAM_MODES for m in modes):
        b = dataclasses.replace(b, weak=weak_teacher(b, quick))
    if any(m.startswith("sel_") for m in modes):
        noisy_records(b)
    return b


def weak_teacher(b: Any, quick: bool) -> Path:
    """The task's teacher architecture and tokenizer, trained for a fifth of the teacher's steps (cached)."""
    if b.task.demo:
        raise SystemExit("the team modes need a task whose teacher the benchmark trains (not numbers)")
    out = b.teacher.parent / "teacher_weak"
    tok = b.tok
    if not (out / "model.safetensors").exists():
        teach, _, _ = b.task.make(random.Random(1234))  # the teacher's own training pairs
        model = new_model(tok, TEACHER_SHAPE, seed=2)
        steps = b.task.teacher_steps // (15 if quick else 5)
        t0 = time.time()
        fit(model, answer_batches(tok, teach), steps=steps, batch_size=64, lr=3e-3, seed=2, pad_id=tok.pad_token_id,
            warmup=0.05)
        tok.save_pretrained(out)
        model.save_pretrained(out, safe_serialization=True)
        print(f"[{b.task.name}] weak teacher: {steps} steps in {time.time() - t0:.0f}s", file=sys.stderr)
    acc = score(b.task, model_dir=out, tok=tok, held=b.held)
    print(f"[{b.task.name}] weak teacher held-out {acc:.3f} (teacher {b.teacher_acc:.3f})", file=sys.stderr)
    return out


def noisy_records(b: Any) -> Path:
    """Five answers per collected prompt, each wrong with probability 1/3 (another prompt's answer); fixed data."""
    out = b.records.with_name("noisy5.jsonl")
    answers: dict[str, str] = {}
    for line in b.records.read_text().splitlines():
        rec = json.loads(line)
        answers.setdefault(rec["messages"][-2]["content"], rec["messages"][-1]["content"])
    prompts = list(answers)
    rng = random.Random(99)
    rows, wrong = [], 0
    for p in prompts:
        for k in range(5):
            a = answers[p]
            if rng.random() < 1 / 3:
                a = answers[rng.choice([q for q in prompts if answers[q] != answers[p]] or prompts)]
                wrong += 1
            rows.append({"id": f"noisy-{len(rows)}", "teacher": "scripted:wrong-a-third", "sample": k,
                         "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"[{b.task.name}] noisy records: {len(rows)} ({wrong / len(rows):.1%} wrong)", file=sys.stderr)
    return out


def selected(select: str) -> Callable:
    """SFT on the noisy records after `imitate clean --select SELECT` (no dedup), for the task's SFT steps."""

    def train(b: Any, seed: int, out: Path) -> Path:
        clean = b.records.with_name(f"noisy5-{select}.jsonl")
        if not clean.exists():  # the same for every seed
            cli("clean", b.records.with_name("noisy5.jsonl"), "--out", clean, "--select", select,
                "--no-exact-dedup", "--no-near-dedup", "--max-removed", 1)
        return imitate_train("--max-steps", b.train_cfg["steps"])(dataclasses.replace(b, records=clean), seed, out)

    return train


def takd(b: Any, seed: int, out: Path) -> Path:
    """Teacher -> assistant (about half the teacher's layers, KD from the teacher) -> student (KD from the assistant)."""
    from transformers import AutoConfig

    layers = max(2, round(AutoConfig.from_pretrained(b.teacher).num_hidden_layers / 2))
    cut, assistant = out.with_name(out.name + "-cut"), out.with_name(out.name + "-assistant")
    if not (cut / "model.safetensors").exists():
        cli("init-student", "--teacher", f"hf:{b.teacher}", "--layers", layers, "--out", cut)
    imitate_train("--teacher", "TEACHER")(dataclasses.replace(b, student=cut), seed, assistant)
    return imitate_train("--teacher", f"hf:{assistant}")(b, seed, out)


def report(table: list[dict], modes: list[str]) -> None:
    """The issue 25 lines under quality.py's table: differences to the baselines and the on-rates per teacher."""
    def diff(m: str, base: str) -> str:
        return ", ".join(f"{r['task']} {r[m][0] - r[base][0]:+.3f} (spread {max(r[m][1], r[base][1]):.3f})"
                         for r in table)

    for m in ("kd_weak", "team_mean", "team", "team_sckd", "takd"):
        if m in modes and "kd" in modes:
            print(f"{m} - kd: {diff(m, 'kd')}")
    if "sel_agree" in modes and "sel_none" in modes:
        print(f"sel_agree - sel_none: {diff('sel_agree', 'sel_none')}")
    for r in table:
        rates = {k.split("on_rate/logit_kd/", 1)[1]: v for k, v in r.get("cost/team_sckd", {}).items()
                 if k.startswith("on_rate/logit_kd/")}
        if rates:
            print(f"team_sckd on-rates [{r['task']}]: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(rates.items())))
