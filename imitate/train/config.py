"""TrainConfig: every option of `imitate train` (its flag, [train] TOML key and docs/options.md row come from here).

Distillation options (teacher ... graybox) are read by imitate/train/distill.py. The objective without SCKD is
(1 - kd_weight) * CE + kd_weight * T^2 * D(teacher_T, student_T) + feature_weight * sum of feature terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imitate.collect.config import teacher_list
from imitate.errors import UsageError
from imitate.locks import wait_lock_opt
from imitate.options import Checked, opt


def shares(values: list[str], flag: str) -> dict[str, float]:
    """`--teacher-weight big=0.7,small=0.3` (or the flag repeated) -> {"big": 0.7, "small": 0.3}."""
    out: dict[str, float] = {}
    for item in (x for v in values for x in v.split(",") if x.strip()):
        name, sep, num = item.partition("=")
        try:
            out[name.strip()] = float(num)
        except ValueError:
            raise UsageError(f"{flag} {item!r}: expected NAME=SHARE", hint=f"e.g. {flag} big=0.7,small=0.3") from None
        if not sep or not name.strip():
            raise UsageError(f"{flag} {item!r}: expected NAME=SHARE", hint=f"e.g. {flag} big=0.7,small=0.3")
    return out


@dataclass(frozen=True)
class TrainConfig(Checked):
    data: list[Path] = opt(help="Record files to train on (the output of `imitate clean`); repeat the flag.",
                           example="clean.jsonl", input=True, required=True)
    student: str = opt(help="Student: a local model directory or a hub id; its tokenizer and chat template format "
                       "the records.", example="./qwen0.5b")
    out: Path = opt(help="Output directory: model or adapter, metrics, checkpoints.", example="runs/student1",
                    path=True)
    wait_lock: float = wait_lock_opt()
    # --- what trains
    full: bool = opt(False, "Train every weight instead of a LoRA adapter (small students often train fully).",
                     example="--full", flag="--full/--lora")
    lora_r: int = opt(16, "LoRA rank.", example="8", ge=1)
    lora_alpha: int = opt(32, "LoRA scale numerator (update scale = alpha / r).", example="16", ge=1)
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", example="0.1", ge=0, lt=1)
    target_modules: str = opt("all-linear", "LoRA target modules: all-linear or comma-separated module names.",
                              example="q_proj,v_proj")
    loss_on: Literal["final", "all"] = opt("final", "Assistant turns with loss: final (the teacher's answer) or all.",
                                           example="all")
    # --- how long and how fast
    epochs: int = opt(1, "Passes over the training records (ignored when --max-steps is given).", example="3", ge=1)
    max_steps: int | None = opt(None, "Optimizer steps to run; overrides --epochs.", example="500", ge=1)
    batch_size: int = opt(4, "Examples per micro-batch per process (with --packing: rows of max-length tokens).",
                          example="8", ge=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step per process.", example="4", ge=1)
    lr: float | None = opt(None, "Peak learning rate.", example="1e-4", gt=0, default_text="2e-4 LoRA, 2e-5 --full")
    weight_decay: float = opt(0.0, "AdamW weight decay.", example="0.01", ge=0)
    warmup: float = opt(0.03, "Linear warm-up: a fraction of all steps if < 1, else a number of steps; then cosine "
                        "decay.", example="0.05", ge=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = off).", example="0.5", ge=0)
    max_length: int = opt(2048, "Tokens per example; longer records follow --overlong.", example="1024", ge=2)
    overlong: Literal["truncate", "drop"] = opt("truncate", "Longer records: truncate (cut the end) or drop; both "
                                                "are counted.", example="drop")
    packing: bool = opt(False, "Pack whole examples into padding-free rows instead of padded random batches (the "
                        "order stays random).",
                        example="--packing", flag="--packing/--no-packing")
    gradient_checkpointing: bool = opt(False, "Recompute each decoder layer's activations in backward: less "
                                       "memory, more compute (49% more CPU time on SmolLM2-135M LoRA; see "
                                       "--gradient-checkpointing-every).",
                                       example="--gradient-checkpointing",
                                       flag="--gradient-checkpointing/--no-gradient-checkpointing")
    gradient_checkpointing_every: int = opt(
        1, "With --gradient-checkpointing, recompute only every N-th decoder layer (2: half of them, about half the "
        "memory saving; on SmolLM2-135M LoRA it cost 20-32% more CPU time over 3 seeds where every layer cost "
        "49%).", example="2", ge=1)
    precision: Literal["auto", "bf16", "fp16", "no"] = opt(
        "auto", "Mixed precision: auto = bf16 on CUDA when supported, else fp32 (a precision in your accelerate "
        "config wins over auto).", example="bf16")
    # --- evaluation, checkpoints, output
    eval_split: float = opt(0.05, "Fraction of records held out for the eval loss (0 = none).", example="0.1",
                            ge=0, lt=1)
    eval_every: int = opt(100, "Optimizer steps between eval losses (0 = only at the end).", example="50", ge=0)
    save_every: int = opt(200, "Optimizer steps between checkpoints (0 = none).", example="100", ge=0)
    keep_checkpoints: int = opt(2, "Newest checkpoints kept on disk.", example="3", ge=1)
    resume: bool = opt(False, "Continue from the newest checkpoint in OUT/checkpoints.", example="--resume",
                       flag="--resume/--no-resume")
    merge: bool = opt(False, "LoRA only: also write merged full weights to OUT (the adapter goes to OUT/adapter).",
                      example="--merge", flag="--merge/--no-merge")
    seed: int = opt(0, "Seeds LoRA init, the eval split, batch order and dropout.", example="1")
    chat_template: Path | None = opt(None, "Jinja chat template file, used instead of (or for lack of) the student's.",
                                     example="chatml.jinja", input=True)
    trust_remote_code: bool = opt(False, "Run model code from the student's (and teacher's) repository.",
                                  example="--trust-remote-code", flag="--trust-remote-code/--no-trust-remote-code")
    progress: bool = opt(True, "Progress bar on stderr (rank 0 only).", example="--no-progress",
                         flag="--progress/--no-progress")
    report_to: str | None = opt(None, "Experiment trackers logging what metrics.jsonl logs, through accelerate: "
                                "tensorboard, wandb, mlflow, trackio (comma-separated; each needs its package).",
                                example="tensorboard", default_text="none")
    threads: int | None = opt(None, "torch CPU threads: tiny models train faster on one thread, above all on a shared "
                              "CPU.", example="4", ge=1, default_text="by model size (1 below 5M parameters)")
    # --- distillation (see imitate/train/distill.py)
    teacher: str | list[str] | None = opt(
        None, "Local teacher for logit/feature KD (hf:PATH_OR_ID), run frozen on each batch; another tokenizer is "
        "aligned by text (logit KD only, one teacher). Repeat the flag (a list in TOML) to distil from several: one "
        "logit KD term per teacher (logit_kd/NAME, NAME = the model's directory name), each gated by --sckd on its own.",
        example="hf:./teacher", parse=teacher_list, metavar="SPEC")
    teacher_weight: dict[str, float] = opt(
        {}, "Several teachers: the share of the KD weight each gets, NAME=SHARE (comma-separated or repeated; "
        "normalized to sum 1).", example="big=0.7,small=0.3", parse=shares, metavar="NAME=SHARE",
        default_text="equal shares")
    teacher_mix: Literal["separate", "mean"] = opt(
        "separate", "Several teachers: one KD term per teacher (separate), or one term against their averaged "
        "distribution (mean; weighted by --teacher-weight).", example="mean")
    kd: Literal["forward-kl", "reverse-kl", "jsd"] = opt(
        "forward-kl", "KD divergence D: forward-kl = KL(teacher||student), reverse-kl, or jsd (generalized, "
        "--jsd-beta).", example="jsd")
    jsd_beta: float = opt(0.5, "Beta of --kd jsd: mixture m = beta*p_teacher + (1-beta)*q_student.", example="0.3",
                          gt=0, lt=1, hint="beta 0 / 1 are --kd forward-kl / reverse-kl")
    kd_weight: float = opt(0.5, "Weight w of the KD term (also of the gray-box term); CE gets 1 - w.", example="0.7",
                           ge=0, le=1, hint="CE gets 1 - w; e.g. 0.5")
    # 1 = the teacher's own distribution. At 2 KD lost 6 points to SFT on the demo task (benchmarks/quality.py):
    # informative teachers need no softening to show their spread, and T^2-scaled soft targets ask small students
    # for margins they cannot fit.
    temperature: float = opt(1.0, "LOSS temperature T softening both distributions (not collect's sampling "
                             "temperature).", example="1.5", gt=0, hint="the KD loss temperature, e.g. 1.0")
    t2: bool = opt(True, "Multiply the KD term by T^2 (Hinton et al.), so its gradient scale does not shrink as "
                   "1/T^2.", example="--no-t2", flag="--t2/--no-t2")
    feature_kd: str | None = opt(None, "FitNets feature KD: layer pairs STUDENT:TEACHER (1-based) or auto; none = off.",
                                 example="1:2,2:4")
    feature_weight: float = opt(1.0, "Weight of each feature-pair MSE term.", example="0.5", ge=0)
    sckd: bool = opt(False, "SCKD: gate each KD term per optimizer step on cos(grad CE, grad term) > "
                     "--sckd-threshold.", example="--sckd", flag="--sckd/--no-sckd")
    sckd_threshold: float = opt(0.0, "SCKD cosine threshold phi: a term counts when its cosine is above it.",
                                example="0.1", ge=-1, le=1)
    teacher_dtype: Literal["auto", "float32", "float16", "bfloat16"] = opt(
        "auto", "Teacher weights: auto = bf16 on CUDA when supported, else float32.", example="bfloat16")
    teacher_device: str | None = opt(None, "Device of the teacher.", example="cuda:1", default_text="the student's")
    kd_chunk_size: int = opt(256, "Target tokens per chunk of the logit losses: peak memory is one chunk's "
                             "[tokens x vocab].", example="128", ge=1)
    graybox: bool = opt(True, "Without --teacher, train on records' collected top-K logprobs (sparse KD) when they "
                        "align.", example="--no-graybox", flag="--graybox/--no-graybox")
    # --- on-policy distillation (imitate/train/onpolicy.py): the student answers, the teacher grades its tokens
    on_policy: float = opt(0.0, "Fraction of micro-batches the student answers itself, trained on the teacher's KD of "
                           "its own tokens (needs --teacher); 0 = off.", example="0.5", ge=0, le=1,
                           hint="the fraction of micro-batches the student answers itself, e.g. --on-policy 0.5")
    # A student that cannot answer yet samples noise, and grading noise teaches nothing: from a random-init student
    # the benchmark's on-policy-from-step-0 run scored far below one with the first half off-policy.
    on_policy_warmup: float = opt(0.5, "Fraction of the steps trained off-policy before the first on-policy batch "
                                  "(0 for a student already fine-tuned on the task).", example="0.2", ge=0, lt=1)
    on_policy_temperature: float = opt(1.0, "Sampling temperature of the student's own answers (0 = greedy).",
                                       example="0.7", ge=0)
    on_policy_max_tokens: int = opt(256, "Longest answer the student may write; one without end-of-turn counts as a "
                                    "cap hit.", example="128", ge=1)
    on_policy_cut: float = opt(0.0, "KD on a sampled answer stops after the first token the teacher finds implausible: "
                               "probability below P times that of its most likely token (min-p); the teacher's "
                               "view of the text after such a token teaches nothing it was trained for. 0 = grade "
                               "every token (GKD).", example="0.1", ge=0, le=1)
    # On by default: without it λ = 1 never trains on the collected answers, and in the benchmark that fell below SFT
    # on lists and carry; with it lists was level and choice kept most of its gain (docs/benchmarks.md, On-policy distillation).
    on_policy_ce: bool = opt(True, "On-policy micro-batches also train CE (weight 1 - w) on their records' collected "
                             "answers, so only KD's sequences change (--no-on-policy-ce: KD only, GKD's loss).",
                             example="--no-on-policy-ce", flag="--on-policy-ce/--no-on-policy-ce")

    @property
    def teachers(self) -> list[str]:
        """Every local teacher, in the order given ([] without --teacher)."""
        return [] if not self.teacher else [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)

    def check(self) -> None:
        if isinstance(self.teacher, list) and len(self.teacher) <= 1:  # `teacher = ["hf:x"]` in TOML: one teacher
            object.__setattr__(self, "teacher", self.teacher[0] if self.teacher else None)
        if len(self.teachers) > 1 or self.teacher_weight:
            from imitate.train.teachers import check_team

            check_team(self)
        if self.on_policy and not self.teacher:
            raise UsageError(
                "--on-policy needs a local teacher to grade the student's own tokens; collected records (gray-box "
                "log-probs included) only describe the teacher's answers",
                hint="add --teacher hf:PATH (a model sharing the student's tokenizer), or drop --on-policy")
        if self.on_policy and self.kd_weight <= 0:
            raise UsageError("--on-policy micro-batches train the KD term only, which --kd-weight 0 switches off",
                             hint="use a --kd-weight above 0, e.g. 0.5")
        if self.merge and self.full:
            raise UsageError("--merge merges a LoRA adapter; with --full the saved model already holds all weights")
        if self.gradient_checkpointing_every > 1 and not self.gradient_checkpointing:
            raise UsageError(f"--gradient-checkpointing-every {self.gradient_checkpointing_every} chooses the layers "
                             "gradient checkpointing recomputes, and it is off", hint="add --gradient-checkpointing")
        if self.feature_kd and not self.teacher:
            raise UsageError("--feature-kd needs a local teacher's hidden states", hint="add --teacher hf:PATH")
        if self.sckd and self.kd_weight >= 1.0:
            raise UsageError("--sckd compares each KD term with the CE gradient, which --kd-weight 1 switches off",
                             hint="use a --kd-weight below 1, e.g. 0.5")
        if self.sckd and self.precision == "fp16":
            raise UsageError("--sckd writes gradients itself and cannot use fp16 loss scaling",
                             hint="use --precision bf16 or no")
        for teacher in self.teachers:
            from imitate.collect.teachers import parse_spec

            provider, _ = parse_spec(teacher)
            if provider != "hf":
                raise UsageError(
                    f"--teacher {teacher}: white-box distillation needs the teacher's weights (an hf:PATH_OR_ID "
                    "model)",
                    hint=f"for an API teacher collect its answers (`imitate collect --teacher {teacher}`, add "
                    "--logprobs K for gray-box KD where the API gives them) and train on the records without --teacher",
                )
