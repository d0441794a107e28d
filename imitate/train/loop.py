"""`imitate train`: fine-tune a student (LoRA, or all weights) on records, through accelerate.

The same code runs on CPU, on one GPU and under `accelerate launch` (DDP, FSDP, DeepSpeed from the user's accelerate
config). Read `run` top to bottom: `prepare` (check options, tokenize records: all user errors surface here, before
any weights load) -> `setup` (accelerator, student and teacher, optimizer, schedule, resume) -> `fit` (the loop over
optimizer steps) -> `save` (final eval, outputs, summary).

One optimizer step = one WINDOW of micro-batches: `batch_size` examples (or a packed row) per micro-batch, `grad_accum`
micro-batches per process, on every process. The loss of a step is (sum of token losses over the window, all ranks) /
(number of target tokens in the window, all ranks): a long answer weighs by its tokens whichever micro-batch it falls
in. Every rank knows the whole window from the batch plan, so the denominator needs no communication. (With
--on-policy, generated tokens and the scale of their KD sum come from `OnPolicy.denominators`: one all-reduce.)

The pieces it wires: imitate/train/student.py (the student's reference, tokenizer, weights), imitate/train/step.py (one
window: forward, loss terms, backward; the held-out loss). Distillation (imitate/train/distill.py: teacher, KD terms,
SCKD gate) takes the place of `step.compute_losses` + `step.combine` in `step.accumulate_window` (more terms, same
token-sum convention and the same normalisation); with --sckd the gate takes the place of `step.backward`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.cards import write_model_card
from imitate.errors import ImitateError, InputError, UsageError
from imitate.locks import locks_outputs
from imitate.train import checkpoint, distill, onpolicy, teacher_tokens, trackers, xtok
from imitate.train.config import TrainConfig
from imitate.train.data import Example, collate, load_examples, plan_batches, split_eval, windows
from imitate.train.outputs import ProgressBar, append_metrics, peak_memory_mb, read_metrics, save_outputs, write_metrics
from imitate.train.step import accumulate_window, evaluate, materialize, window_batches
from imitate.train.student import load_student, load_tokenizer, precision, resolve_student, student_vocab

DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}


def fingerprint(cfg: TrainConfig, n_train: int) -> dict:
    """Settings a resumed run must share with the run it continues (anything that changes the step sequence)."""
    keys = ("student", "full", "lora_r", "lora_alpha", "target_modules", "batch_size", "grad_accum", "max_length",
            "packing", "seed", "eval_split", "loss_on", "overlong", "epochs", "max_steps",
            "teacher", "feature_kd", "sckd", "graybox")  # the KD ones decide what trains (regressors) and how
    if cfg.on_policy:  # only then, so checkpoints of runs without --on-policy stay resumable
        keys += ("on_policy", "on_policy_warmup", "on_policy_temperature", "on_policy_max_tokens", "on_policy_ce")
        if cfg.on_policy_cut:  # only then, so on-policy checkpoints written before the option stay resumable
            keys += ("on_policy_cut",)
    return {**{k: str(getattr(cfg, k)) for k in keys}, "train_examples": n_train}


# ---------------------------------------------------------------------------------------------------------------------
# checks and loading (cheap things first)
# ---------------------------------------------------------------------------------------------------------------------


def check_options(cfg: TrainConfig) -> None:
    """What TrainConfig cannot check when it is built: the files it names (its values were checked then)."""
    if not cfg.data:
        raise UsageError("no --data file given", hint="e.g. --data clean.jsonl (the output of `imitate clean`)")
    if cfg.chat_template is not None and not Path(cfg.chat_template).is_file():
        raise UsageError(f"--chat-template {cfg.chat_template}: no such file")
    distill.check_options(cfg)
    trackers.names(cfg)  # known tracker names, their packages installed


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """True on the process that prints results (rank 0), also outside any distributed launch."""
    from accelerate import PartialState

    return PartialState().is_main_process


def log(accelerator: Any, msg: str) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(msg, file=sys.stderr, flush=True)


def no_examples_error(cfg: TrainConfig, stats: Any) -> ImitateError:
    """Why --data gave nothing to train on: no records at all, or none with an answer token inside --max-length."""
    data = ", ".join(str(p) for p in cfg.data)
    if stats.records == 0:
        return InputError(f"--data {data}: no records to train on",
                          hint="the file is empty (did imitate clean remove everything? see its report)")
    return InputError(
        f"--data {data}: none of the {stats.records} records keeps an answer token within --max-length "
        f"{cfg.max_length} ({stats.dropped_overlong} dropped as overlong, {stats.dropped_no_target} with the answer "
        f"cut off; the longest is {stats.longest} tokens)",
        hint=f"raise --max-length (e.g. --max-length {stats.longest})")


@dataclass
class Prepared:
    """What the records give, settled before any weights load."""

    student: str  # resolved student reference
    tokenizer: Any
    stats: Any  # data.DataStats
    kd_plan: Any  # distill.Plan or None
    graybox_report: dict | None
    token_check: dict  # teacher_tokens.check_teacher_tokens
    train_ex: list[Example]
    eval_ex: list[Example]


@dataclass
class Session:
    """The objects of one run that the loop works on (after `setup`)."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    distiller: Any  # distill.Distiller or None
    vocab_size: int | None  # the CE's softmax width (the real vocabulary)
    plan: Any  # epoch -> that epoch's micro-batches
    total_steps: int
    fp: dict  # checkpoint fingerprint
    start: int = 0  # first step to run (a resumed run's checkpoint step)
    tokens_seen: int = 0
    rows: list = dataclasses.field(default_factory=list)  # metrics rows so far
    policy: Any = None  # onpolicy.OnPolicy when --on-policy > 0: which micro-batches the student answers itself

    @property
    def per_window(self) -> int:
        """Micro-batches per optimizer step, all processes together."""
        return self.accelerator.num_processes * self.accelerator.gradient_accumulation_steps

    def position(self, step: int) -> tuple[int, int]:
        """0-based step -> (epoch, window in that epoch)."""
        epoch = 0
        while step >= windows(len(self.plan(epoch)), self.per_window):
            step -= windows(len(self.plan(epoch)), self.per_window)
            epoch += 1
        return epoch, step


@locks_outputs("train")  # OUT: one writer (rank 0 holds it), taken before any weight loads
def run(cfg: TrainConfig, *, stop_after: int | None = None) -> dict:
    """Train and save; returns the summary `--json` prints. `stop_after=k` stops after step k like a kill would (no
    final save), for resume tests. Read top to bottom: prepare (no weights) -> setup -> fit -> save."""
    t_start = time.time()
    data = prepare(cfg)
    s = setup(cfg, data)
    fitted = fit(cfg, data, s, stop_after)
    return save(cfg, data, s, fitted, t_start, stop_after)


def prepare(cfg: TrainConfig) -> Prepared:
    """Check options, tokenize the records and plan distillation; every user error is raised here, before any weights
    load (tokenizers and configs only)."""
    check_options(cfg)
    out = Path(cfg.out)
    if not cfg.resume and checkpoint.latest(out) is not None:
        raise UsageError(f"{out} already holds checkpoints of a run",
                         hint="add --resume to continue it, or pick another --out")
    student = resolve_student(cfg.student)
    tokenizer = load_tokenizer(cfg, student)
    kd_plan = distill.plan_teacher(cfg, tokenizer, student) if cfg.teacher else None  # tokenizers + configs only
    cross = kd_plan is not None and kd_plan.xtok is not None  # a teacher with another tokenizer
    examples, stats = load_examples(cfg.data, tokenizer, max_length=cfg.max_length, overlong=cfg.overlong,
                                    loss_on=cfg.loss_on, with_logprobs=cfg.graybox and not cfg.teacher,
                                    teacher_tokenizer=kd_plan.tokenizer if kd_plan is not None else None,
                                    with_messages=cross)
    if not examples:
        raise no_examples_error(cfg, stats)
    if cross:  # the teacher's own tokenization of each conversation, paired with the student's by text
        kd_plan.xtok.report = xtok.prepare_whitebox(examples, tokenizer, kd_plan.xtok, cfg.max_length)
    token_check = teacher_tokens.check_teacher_tokens(examples, tokenizer, cfg.max_length)  # the teacher's own tokens?
    if token_check["retokenized"]:  # records with context: the teacher grades the ids now trained (train/context.py)
        from imitate.train.context import resplice

        resplice(examples)
    if kd_plan is not None and kd_plan.teacher:  # logit KD (gray-box KD aligns token by token itself)
        teacher_tokens.refuse_token_mismatch(token_check)
    graybox_report = None
    if kd_plan is None and any(e.logprobs for e in examples):
        graybox_report = teacher_tokens.prepare_graybox(examples, tokenizer)
        if graybox_report["aligned"]:
            kd_plan = distill.graybox_plan(tokenizer, student, graybox_report, cfg.trust_remote_code)
    if cfg.sckd and kd_plan is None:
        raise UsageError("--sckd gates distillation terms, and this run has none",
                         hint="add --teacher hf:PATH, or train on records collected with --logprobs K")
    train_idx, eval_idx = split_eval(len(examples), cfg.eval_split, cfg.seed)
    return Prepared(student, tokenizer, stats, kd_plan, graybox_report, token_check,
                    [examples[i] for i in train_idx], [examples[i] for i in eval_idx])


def setup(cfg: TrainConfig, data: Prepared) -> Session:
    """Accelerator, the step sequence, student (+ teacher), optimizer and schedule; resume from a checkpoint."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision(cfg),
                              step_scheduler_with_optimizer=False, **trackers.accelerator_kwargs(cfg))
    stats, check = data.stats, data.token_check
    if check["mismatched"]:
        log(accelerator, f"{check['mismatched']} of {check['checked']} answers do not tokenize back to the "
            f"teacher's generated tokens in the student's chat template; first: {'; '.join(check['first'])}")
    coverage = data.graybox_report if data.kd_plan is None or data.kd_plan.xtok is None else data.kd_plan.xtok.report
    for warning in (coverage and xtok.low_coverage(coverage), onpolicy.divergence_warning(cfg.on_policy, cfg.kd),
                    onpolicy.ce_warning(cfg.on_policy, cfg.on_policy_ce, cfg.sckd)):
        if warning:  # before any step: the teacher grades little, or grades in a way that hurt
            log(accelerator, "Warning: " + warning)
    if stats.truncated or stats.dropped_overlong or stats.dropped_no_target:
        log(accelerator, f"{stats.truncated + stats.dropped_overlong} record(s) longer than --max-length "
            f"{cfg.max_length} (longest {stats.longest} tokens): {stats.truncated} truncated, "
            f"{stats.dropped_overlong} dropped; {stats.dropped_no_target} dropped with no answer token left. "
            f"First: {', '.join(stats.examples_overlong)}")

    # the step sequence: a batch plan per epoch, cut into windows of world * grad_accum micro-batches
    lengths = [len(e.input_ids) for e in data.train_ex]
    per_window = accelerator.num_processes * cfg.grad_accum
    plans: dict[int, list[list[int]]] = {}

    def plan(epoch: int) -> list[list[int]]:
        if epoch not in plans:
            plans[epoch] = plan_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch, packing=cfg.packing,
                                        max_length=cfg.max_length)
        return plans[epoch]

    total_steps = cfg.max_steps or sum(windows(len(plan(e)), per_window) for e in range(cfg.epochs))

    # model, optimizer, schedule
    set_seed(cfg.seed)
    model = load_student(cfg, data.student, accelerator.mixed_precision)
    kd_plan = data.kd_plan
    vocab_size = kd_plan.vocab_size if kd_plan is not None else student_vocab(model, data.tokenizer)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR["full" if cfg.full else "lora"]
    params = [p for p in model.parameters() if p.requires_grad]
    from imitate.models import eos_ids

    end_ids = eos_ids(model, data.tokenizer)
    distiller = distill.setup(cfg, kd_plan, accelerator, params, end_ids) if kd_plan is not None else None
    if accelerator.device.type == "cpu":  # tiny models run faster on one thread, above all on a busy machine
        from imitate.models import choose_threads

        n_params = sum(p.numel() for p in model.parameters())
        if distiller is not None:
            n_params += sum(p.numel() for t in distiller.teachers for p in t.parameters())
        torch.set_num_threads(choose_threads(n_params, requested=cfg.threads))
    optimizer = torch.optim.AdamW(params + reg_params_of(distiller), lr=lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if not cfg.full:
        checkpoint.keep_only_trainable(accelerator)
    s = Session(accelerator, model, optimizer, scheduler, distiller, vocab_size, plan, total_steps,
                fingerprint(cfg, len(data.train_ex)))
    if cfg.on_policy:
        s.policy = onpolicy.OnPolicy(cfg, data.tokenizer, total_steps, end_ids)

    # resume
    out = Path(cfg.out)
    if cfg.resume and (ckpt := checkpoint.latest(out)) is not None:
        state = checkpoint.load(accelerator, ckpt, s.fp)
        s.start, s.tokens_seen = state["step"], state.get("tokens_seen", 0)
        log(accelerator, f"resuming from {ckpt} (step {s.start} of {total_steps})")
    s.rows = read_metrics(out / "metrics.jsonl", upto=s.start) if s.start else []
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_metrics(out / "metrics.jsonl", s.rows)  # drops rows logged after the checkpoint by a killed run
    trackers.start(accelerator, cfg)  # --report-to: the options, then every metrics row (imitate/train/trackers.py)
    return s


def reg_params_of(distiller: Any) -> list:
    """The feature-KD regressors' parameters (trained with the student), or []."""
    return list(distiller.regressors.parameters()) if distiller is not None and distiller.regressors is not None else []


def fit(cfg: TrainConfig, data: Prepared, s: Session, stop_after: int | None = None) -> dict:
    """The loop: one optimizer step per window of micro-batches, metrics, periodic eval and checkpoints.
    Returns {"last_loss", "last_eval", "tokens_per_s", "stopped"}."""
    accelerator, model, distiller, policy = s.accelerator, s.model, s.distiller, s.policy
    gate = distiller.gate if distiller is not None else None
    reg_params = reg_params_of(distiller)
    rank, ga, per_window = accelerator.process_index, cfg.grad_accum, s.per_window
    lengths = [len(e.input_ids) for e in data.train_ex]
    targets = [e.n_targets for e in data.train_ex]
    graybox = data.kd_plan is not None and distill.GRAYBOX in data.kd_plan.terms
    cross = data.kd_plan.xtok if data.kd_plan is not None else None  # cross-tokenizer white-box KD
    graded = [xtok.answer_targets(e.labels, xtok.end_ids(data.tokenizer)) for e in data.train_ex] \
        if cross is not None or graybox else []  # per example: the answer tokens a teacher could grade
    metrics_path = Path(cfg.out) / "metrics.jsonl"
    bar = ProgressBar(s.total_steps, s.start, enabled=cfg.progress and accelerator.is_main_process)
    model.train()
    pad_id = data.tokenizer.pad_token_id
    last_loss = last_eval = None
    t_loop, tokens_loop, stopped = time.time(), 0, False
    for step in range(s.start, s.total_steps):
        t0 = time.time()
        epoch, w = s.position(step)
        window = window_batches(s.plan(epoch), w, per_window)
        stand_in = next(b for b in window if b is not None)
        real = [i for b in window if b is not None for i in b]
        n_targets = sum(targets[i] for i in real)  # the whole window, every rank: the loss denominator
        n_tokens = sum(lengths[i] for i in real)
        kinds = policy.kinds(step, window) if policy is not None else [False] * len(window)  # True: on-policy
        micro = []
        for j, b in enumerate(window[rank * ga : (rank + 1) * ga], start=rank * ga):
            exs = materialize(b, data.train_ex, stand_in)
            if kinds[j]:  # the student writes this micro-batch's answers
                micro.append(policy.batch(accelerator, model, exs, step, j, distiller))
                continue
            micro.append(collate(exs, pad_id=pad_id, packing=cfg.packing))
            if graybox:
                micro[-1]["topk_ids"], micro[-1]["topk_logprobs"] = teacher_tokens.graybox_tensors(exs, micro[-1])
            if cross is not None:
                micro[-1].update(xtok.batch_tensors(exs, micro[-1], cross.tokenizer.pad_token_id or 0))
        taught = None  # answer tokens of this process's micro-batches that a teacher distribution grades
        if cross is not None or graybox:
            key = "xtok_s_index" if cross is not None else "topk_ids"
            taught = sum(int(b[key].numel()) if cross is not None else int((b[key] >= 0).any(-1).sum())
                         for b in micro if "onpolicy" not in b)
        denoms = None  # per-term token counts for the logged values when they differ from n_targets
        if policy is not None:
            n_targets, denoms = policy.denominators(accelerator, micro, window, targets, distiller.terms)
        sums, gates = accumulate_window(accelerator, model, micro, n_targets, distiller, gate, s.vocab_size,
                                        policy.kd_scale if policy is not None else 1.0)
        grad_norm = None
        if cfg.max_grad_norm > 0:
            clip = list(model.parameters()) + reg_params if reg_params else model.parameters()
            grad_norm = accelerator.clip_grad_norm_(clip, cfg.max_grad_norm)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.scheduler.step()
        sums = accelerator.reduce(sums, reduction="sum")
        sums = (sums / max(n_targets, 1) if denoms is None else sums / sums.new_tensor(denoms).clamp(min=1)).tolist()
        prev_loss, last_loss = last_loss, sums[0]
        dt = time.time() - t0
        s.tokens_seen += n_tokens
        tokens_loop += n_tokens
        row = {"step": step + 1, "epoch": epoch, "loss": last_loss, "lr": s.scheduler.get_last_lr()[0],
               "tokens": s.tokens_seen, "tokens_per_s": n_tokens / dt if dt > 0 else None, "step_s": dt}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if taught is not None:  # the share of the window's answer tokens the teacher graded (all processes)
            import torch

            got = accelerator.reduce(torch.tensor(float(taught), device=accelerator.device), reduction="sum")
            row["kd_coverage"] = float(got) / max(sum(graded[i] for i in real), 1)
        if distiller is not None:
            distiller.log(row, sums[1:], policy.present(gates) if policy is not None else gates, s.rows)
        if policy is not None:  # drops the values of terms (and CE) no micro-batch of the window had
            policy.log(row, dt)
            last_loss = row.get("loss", prev_loss)
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < s.total_steps:
            last_eval = evaluate(accelerator, model, data.eval_ex, cfg, pad_id, s.vocab_size)
            if last_eval is not None:
                row["eval_loss"] = last_eval
        s.rows.append(row)
        if accelerator.is_main_process:
            append_metrics(metrics_path, row, accelerator)
        bar.update(done, last_loss, tokens_loop / max(time.time() - t_loop, 1e-9))
        if cfg.save_every and done % cfg.save_every == 0 and done < s.total_steps:
            checkpoint.save(accelerator, Path(cfg.out), done, {"tokens_seen": s.tokens_seen, "fingerprint": s.fp},
                            cfg.keep_checkpoints)
        if stop_after is not None and done >= stop_after:
            stopped = True
            break
    bar.close()
    return {"last_loss": last_loss, "last_eval": last_eval, "stopped": stopped,
            "tokens_per_s": tokens_loop / max(time.time() - t_loop, 1e-9)}


def save(cfg: TrainConfig, data: Prepared, s: Session, fitted: dict, t_start: float,
         stop_after: int | None = None) -> dict:
    """Final eval, outputs on disk (rank 0), the summary."""
    accelerator, distiller, out = s.accelerator, s.distiller, Path(cfg.out)
    last_loss, last_eval = fitted["last_loss"], fitted["last_eval"]
    summary: dict[str, Any] = {
        "out": str(out), "student": cfg.student, "mode": "full" if cfg.full else "lora",
        "steps": s.total_steps, "start_step": s.start, "train_examples": len(data.train_ex),
        "eval_examples": len(data.eval_ex), "data": {**data.stats.as_dict(), "teacher_tokens": data.token_check},
        "train_loss": last_loss, "tokens_per_s": fitted["tokens_per_s"], "devices": accelerator.num_processes,
        "precision": accelerator.mixed_precision,
    }
    if distiller is not None:
        summary["distill"] = distiller.summary(s.rows)
    elif data.graybox_report is not None:
        summary["distill"] = {"mode": "none", "graybox": data.graybox_report}
    if s.policy is not None:
        summary["on_policy"] = s.policy.summary(s.rows)
    if fitted["stopped"]:
        summary["stopped_at"] = stop_after
        return summary

    final_eval = evaluate(accelerator, s.model, data.eval_ex, cfg, data.tokenizer.pad_token_id, s.vocab_size)
    if final_eval is not None:
        last_eval = final_eval
        row = {"step": s.total_steps, "eval_loss": final_eval}
        s.rows.append(row)
        if accelerator.is_main_process:
            append_metrics(out / "metrics.jsonl", row, accelerator)
    summary["eval_loss"] = last_eval
    summary["files"] = save_outputs(accelerator, s.model, data.tokenizer, cfg, data.student, s.rows)
    regressors = distiller.regressors if distiller is not None else None
    if regressors is not None and accelerator.is_main_process:
        summary["files"]["feature_regressors"] = str(regressors.save(out))
    if accelerator.is_main_process:  # the run is complete: its checkpoints can no longer be resumed into anything
        import shutil

        shutil.rmtree(checkpoint.checkpoint_dir(out), ignore_errors=True)
    summary["elapsed_s"] = time.time() - t_start
    summary["peak_memory_mb"] = peak_memory_mb(accelerator)
    trackers.end(accelerator)
    if accelerator.is_main_process:  # OUT/README.md: teacher, data hashes, options, the command (imitate/cards.py)
        summary["files"]["card"] = str(write_model_card(out, cfg, data.student, summary))
    log(accelerator, f"trained {s.total_steps - s.start} step(s)"
        + (f": train loss {last_loss:.4f}" if last_loss is not None else "")
        + (f", eval loss {last_eval:.4f}" if last_eval is not None else "")
        + f", {summary['tokens_per_s']:.0f} tokens/s -> {out}")
    if distiller is not None and cfg.sckd:
        rates = summary["distill"]["on_rate"]
        log(accelerator, "SCKD on-rates: " + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()))
    return summary
