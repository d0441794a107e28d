"""The `imitate` command line: turns flags (+ an optional TOML config) into a stage config and calls the stage.

No logic lives here. Heavy packages (torch, transformers, SDKs) are imported inside the stages, so `--help` is instant.
Every option defaults to None so that only flags actually given override the config file and the stage defaults.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from imitate.errors import ImitateError

app = typer.Typer(
    name="imitate",
    help="Distill a large teacher model into a small student by imitation: collect -> clean -> train (-> eval).\n\n"
    "Example: imitate run examples/demo.toml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from imitate import __version__

        typer.echo(f"imitate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit, e.g. imitate --version."
    ),
) -> None:
    """Distill a large teacher model into a small student by imitation: collect -> clean -> train (-> eval).

    Example: imitate run examples/demo.toml
    """


def print_error(exc: ImitateError) -> None:
    typer.echo(f"Error: {exc.message}", err=True)
    if exc.hint:
        typer.echo(f"Hint: {exc.hint}", err=True)


@contextmanager
def handle_errors() -> Iterator[None]:
    """Print ImitateError as `Error:`/`Hint:` on stderr and exit with its code; never a traceback."""
    try:
        yield
    except ImitateError as exc:
        print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:  # a path the user gave (a dir for a file)
        print_error(ImitateError(f"{exc.filename}: {exc.strerror}", hint="check the file paths given as options"))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted; finished work is kept, re-run the same command to resume.", err=True)
        raise typer.Exit(130) from None


def stage_config(cls: type, config: Optional[Path], section: str, flags: dict[str, Any]) -> Any:
    """Build a stage config: defaults < the [section] of --config (paths relative to that file) < flags given."""
    from imitate.config import build, check_keys, load_toml, resolve_paths

    if config is None:
        return build(cls, flags)
    data = load_toml(config)
    if section not in data:  # a typo'd section ([cleen]) would otherwise be ignored without a word
        from imitate.errors import ConfigError

        raise ConfigError(f"{config}: no [{section}] section",
                          hint=f"its sections: {', '.join(f'[{s}]' for s in data) or 'none'}; "
                          f"put this command's options under [{section}]")
    file_layer = data.get(section, {})
    where = f"{config} [{section}]"
    file_layer = resolve_paths(cls, check_keys(cls, file_layer, where), Path(config).resolve().parent)
    return build(cls, file_layer, flags, where=where)


def emit(summary: dict, as_json: bool) -> None:
    """Results on stdout: one JSON object with --json, else the human summary the stage already printed."""
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# collect  (issue: collect)
# ---------------------------------------------------------------------------------------------------------------------


@app.command()
def collect(
    teacher: Optional[str] = typer.Option(
        None, "--teacher", help="Teacher as provider:model, e.g. openai:gpt-4o-mini, anthropic:claude-haiku-4-5, hf:./my-model."
    ),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="Input rows: JSONL with prompt / messages / template fields, or .txt one prompt a line, e.g. data/prompts.jsonl."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Records JSONL, also the resume journal, e.g. out/records.jsonl."),
    template: Optional[str] = typer.Option(
        None, "--template", help="Jinja2 template: a built-in name (default, chat, instruction) or a path, e.g. prompts/chat.j2."
    ),
    system: Optional[str] = typer.Option(None, "--system", help="System turn for rows without one, e.g. 'You are concise.'"),
    n: Optional[int] = typer.Option(None, "--n", help="Samples per prompt, e.g. 4 (default 1)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature; 0 = greedy, e.g. 0.7."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling, e.g. 0.95 (default: provider's)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Answer length cap in tokens, e.g. 1024."),
    logprobs: Optional[int] = typer.Option(None, "--logprobs", help="Store top-K log-probs per token, e.g. 5 (openai-compatible, hf)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Requests in flight, e.g. 64 (default 16)."),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="Our own requests/minute ceiling, e.g. 500."),
    tpm: Optional[float] = typer.Option(None, "--tpm", help="Our own tokens/minute ceiling, e.g. 200000."),
    retries: Optional[int] = typer.Option(None, "--retries", help="Retries on 429/5xx/timeouts before a request fails, e.g. 6."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds per HTTP request, e.g. 120."),
    base_url: Optional[str] = typer.Option(
        None, "--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (default $OPENAI_BASE_URL)."
    ),
    api_key_env: Optional[str] = typer.Option(
        None, "--api-key-env", help="Env var holding the API key, e.g. MY_OPENAI_KEY (default OPENAI_API_KEY / ANTHROPIC_API_KEY)."
    ),
    failures: Optional[Path] = typer.Option(
        None, "--failures", help="Where failed requests go, e.g. out/failed.jsonl (default OUT with .failures.jsonl)."
    ),
    price_in: Optional[float] = typer.Option(None, "--price-in", help="USD per million input tokens, e.g. 0.15."),
    price_out: Optional[float] = typer.Option(None, "--price-out", help="USD per million output tokens, e.g. 0.60."),
    dry_run: Optional[bool] = typer.Option(
        None, "--dry-run", help="Count requests and estimate input tokens (chars/4); send nothing. E.g. --dry-run."
    ),
    self_instruct: Optional[int] = typer.Option(
        None, "--self-instruct", help="First have the teacher write N new instructions from seed tasks, then answer them, e.g. 200."
    ),
    seed_tasks: Optional[Path] = typer.Option(
        None, "--seed-tasks", help="Seed tasks for --self-instruct, e.g. data/seed_tasks.jsonl (the default)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="RNG seed for self-instruct sampling and jitter, e.g. 0."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="hf teachers: prompts per generate() call, e.g. 8."),
    trust_remote_code: Optional[bool] = typer.Option(
        None, "--trust-remote-code", help="hf teachers: run the model repo's own code, e.g. --trust-remote-code."
    ),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar on stderr, e.g. --no-progress."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file; its [collect] section, e.g. pipeline.toml."),
    json_: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout, e.g. --json."),
) -> None:
    """Ask a teacher model for answers and keep each one as a JSONL record (resumable).

    Example: imitate collect --teacher openai:gpt-4o-mini --prompts prompts.jsonl --out out/records.jsonl
    """
    from imitate.collect import stage

    flags = dict(
        teacher=teacher, prompts=prompts, out=out, template=template, system=system, n=n, temperature=temperature,
        top_p=top_p, max_tokens=max_tokens, logprobs=logprobs, concurrency=concurrency, rpm=rpm, tpm=tpm,
        retries=retries, timeout=timeout, base_url=base_url, api_key_env=api_key_env, failures=failures,
        price_in=price_in, price_out=price_out, dry_run=dry_run, self_instruct=self_instruct, seed_tasks=seed_tasks,
        seed=seed, batch_size=batch_size, trust_remote_code=trust_remote_code, progress=progress,
    )
    with handle_errors():
        cfg = stage_config(stage.CollectConfig, config, "collect", flags)
        summary = stage.run(cfg)
    emit(summary, json_)


# ---------------------------------------------------------------------------------------------------------------------
# clean  (issue: clean)
# ---------------------------------------------------------------------------------------------------------------------


def _role_bounds(values: Optional[list[str]], flag: str) -> Optional[dict[str, int]]:
    """`--min-words assistant=3 --min-words prompt=2` -> {"assistant": 3, "prompt": 2}."""
    if not values:
        return None
    out: dict[str, int] = {}
    for v in values:
        role, sep, num = v.partition("=")
        if not sep or not num.strip().isdigit():
            raise ImitateError(f"{flag} {v!r}: expected ROLE=NUMBER", hint=f"e.g. {flag} assistant=20")
        out[role.strip()] = int(num)
    return out


@app.command("clean")
def clean_cmd(
    inputs: Optional[list[Path]] = typer.Argument(
        None, help="Record files from collect. Example: records.jsonl more.jsonl", metavar="IN.jsonl"
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Kept records. Example: --out clean.jsonl"),
    removed: Optional[Path] = typer.Option(
        None, help="Removed records with the reason. Example: --removed removed.jsonl"
    ),
    report: Optional[Path] = typer.Option(None, help="Write the report as JSON. Example: --report clean_report.json"),
    workers: Optional[int] = typer.Option(
        None, help="Processes for parsing, filters and MinHash. Example: --workers 4"
    ),
    on_bad_line: Optional[str] = typer.Option(
        None, help="error | skip (count and report). Example: --on-bad-line skip"
    ),
    chunk_size: Optional[int] = typer.Option(None, help="Lines per worker task. Example: --chunk-size 4000"),
    examples: Optional[int] = typer.Option(
        None, help="Removed examples per filter in the report. Example: --examples 5"
    ),
    drop_failed: Optional[bool] = typer.Option(
        None, "--drop-failed/--keep-failed", help="Errors and empty answers (default: drop). Example: --keep-failed"
    ),
    drop_truncated: Optional[bool] = typer.Option(
        None,
        "--drop-truncated/--keep-truncated",
        help="finish_reason length (default: drop). Example: --keep-truncated",
    ),
    min_chars: Optional[list[str]] = typer.Option(
        None, help="Min characters per role (assistant, prompt, user, system). Example: --min-chars assistant=20"
    ),
    max_chars: Optional[list[str]] = typer.Option(
        None, help="Max characters per role. Example: --max-chars prompt=8000"
    ),
    min_words: Optional[list[str]] = typer.Option(None, help="Min words per role. Example: --min-words assistant=3"),
    max_words: Optional[list[str]] = typer.Option(None, help="Max words per role. Example: --max-words assistant=2000"),
    min_ratio: Optional[float] = typer.Option(None, help="Min answer/prompt word ratio. Example: --min-ratio 0.1"),
    max_ratio: Optional[float] = typer.Option(None, help="Max answer/prompt word ratio. Example: --max-ratio 50"),
    drop_refusals: Optional[bool] = typer.Option(
        None, "--drop-refusals/--keep-refusals", help="Refusals/boilerplate (default: drop). Example: --keep-refusals"
    ),
    default_refusals: Optional[bool] = typer.Option(
        None, "--default-refusals/--no-default-refusals", help="Use data/refusals.txt. Example: --no-default-refusals"
    ),
    refusals: Optional[list[Path]] = typer.Option(
        None, help="Extra phrase/regex file (format of data/refusals.txt). Example: --refusals my_refusals.txt"
    ),
    drop_repetitive: Optional[bool] = typer.Option(
        None,
        "--drop-repetitive/--keep-repetitive",
        help="Gopher repetition filter (default: on). Example: --keep-repetitive",
    ),
    repetition_min_words: Optional[int] = typer.Option(
        None, help="Only check answers with at least this many words. Example: --repetition-min-words 50"
    ),
    max_dup_line_frac: Optional[float] = typer.Option(
        None, help="Duplicated-line fraction. Example: --max-dup-line-frac 0.3"
    ),
    max_dup_line_char_frac: Optional[float] = typer.Option(
        None, help="Characters in duplicated lines. Example: --max-dup-line-char-frac 0.2"
    ),
    max_top_ngram_frac: Optional[list[float]] = typer.Option(
        None,
        help="Top 2/3/4-gram char fractions, give it 3 times. Example: --max-top-ngram-frac 0.2 (x3: 0.2, 0.18, 0.16)",
    ),
    max_dup_ngram_frac: Optional[list[float]] = typer.Option(
        None, help="Repeated 5..10-gram char fraction, six values. Example: --max-dup-ngram-frac 0.15 ..."
    ),
    language: Optional[list[str]] = typer.Option(
        None, help="Keep answers in these languages (needs langid or langdetect). Example: --language en"
    ),
    decontaminate: Optional[list[Path]] = typer.Option(
        None, help="Drop records sharing an n-gram with these eval sets. Example: --decontaminate gsm8k_test.jsonl"
    ),
    decontaminate_ngram: Optional[int] = typer.Option(
        None, help="Decontamination n-gram. Example: --decontaminate-ngram 13"
    ),
    decontaminate_min_words: Optional[int] = typer.Option(
        None, help="Shorter eval texts are ignored. Example: --decontaminate-min-words 8"
    ),
    exact_dedup: Optional[bool] = typer.Option(
        None, "--exact-dedup/--no-exact-dedup", help="Normalized exact dedup (default: on). Example: --no-exact-dedup"
    ),
    one_per_prompt: Optional[bool] = typer.Option(
        None, "--one-per-prompt/--all-per-prompt", help="Keep one answer per prompt. Example: --one-per-prompt"
    ),
    near_dedup: Optional[bool] = typer.Option(
        None, "--near-dedup/--no-near-dedup", help="MinHash LSH near-dedup (default: on). Example: --no-near-dedup"
    ),
    near_on: Optional[str] = typer.Option(None, help="both | prompt | answer. Example: --near-on answer"),
    threshold: Optional[float] = typer.Option(None, help="Near-dup Jaccard threshold. Example: --threshold 0.8"),
    num_perm: Optional[int] = typer.Option(None, help="MinHash permutations. Example: --num-perm 128"),
    bands: Optional[int] = typer.Option(None, help="LSH bands (default: optimal for threshold). Example: --bands 16"),
    ngram: Optional[int] = typer.Option(None, help="Word shingle size. Example: --ngram 5"),
    char_ngram: Optional[int] = typer.Option(None, help="Char shingle size for short texts. Example: --char-ngram 5"),
    near_min_words: Optional[int] = typer.Option(
        None, help="Texts with fewer words use char shingles. Example: --near-min-words 20"
    ),
    near_min_chars: Optional[int] = typer.Option(
        None, help="Shorter texts match exactly. Example: --near-min-chars 10"
    ),
    verify: Optional[bool] = typer.Option(
        None, "--verify/--no-verify", help="Exact Jaccard check of candidate pairs. Example: --verify"
    ),
    seed: Optional[int] = typer.Option(None, help="MinHash seed. Example: --seed 1"),
    priority: Optional[str] = typer.Option(
        None,
        help="Field choosing the survivor (higher wins, '-' prefix: lower). Example: --priority usage.output_tokens",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML file; reads [clean]. Example: --config clean.toml"
    ),
    json_: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout. Example: --json"),
) -> None:
    """Deduplicate and filter collected records; write the kept ones, the removed ones and a report.

    Example: imitate clean records.jsonl --out clean.jsonl --removed removed.jsonl --report report.json
    """
    from imitate.clean import stage

    with handle_errors():
        flags = {
            "inputs": inputs or None, "out": out, "removed": removed, "report": report, "workers": workers,
            "on_bad_line": on_bad_line, "chunk_size": chunk_size, "examples": examples,
            "drop_failed": drop_failed, "drop_truncated": drop_truncated,
            "min_chars": _role_bounds(min_chars, "--min-chars"), "max_chars": _role_bounds(max_chars, "--max-chars"),
            "min_words": _role_bounds(min_words, "--min-words"), "max_words": _role_bounds(max_words, "--max-words"),
            "min_ratio": min_ratio, "max_ratio": max_ratio,
            "drop_refusals": drop_refusals, "default_refusals": default_refusals, "refusals": refusals or None,
            "drop_repetitive": drop_repetitive, "repetition_min_words": repetition_min_words,
            "max_dup_line_frac": max_dup_line_frac, "max_dup_line_char_frac": max_dup_line_char_frac,
            "max_top_ngram_frac": max_top_ngram_frac or None, "max_dup_ngram_frac": max_dup_ngram_frac or None,
            "language": language or None, "decontaminate": decontaminate or None,
            "decontaminate_ngram": decontaminate_ngram, "decontaminate_min_words": decontaminate_min_words,
            "exact_dedup": exact_dedup, "one_per_prompt": one_per_prompt, "near_dedup": near_dedup,
            "near_on": near_on, "threshold": threshold, "num_perm": num_perm, "bands": bands, "ngram": ngram,
            "char_ngram": char_ngram, "near_min_words": near_min_words, "near_min_chars": near_min_chars,
            "verify": verify, "seed": seed, "priority": priority,
        }  # fmt: skip
        cfg = stage_config(stage.CleanConfig, config, "clean", flags)
        summary = stage.run(cfg)
    if not json_:
        typer.echo(str(cfg.out))
    emit(summary, json_)


# ---------------------------------------------------------------------------------------------------------------------
# train  (issue: train / distillation)
# ---------------------------------------------------------------------------------------------------------------------


@app.command("train")
def train_cmd(
    data: Optional[list[Path]] = typer.Option(
        None, "--data", help="Record files to train on (repeat). Example: --data clean.jsonl"
    ),
    student: Optional[str] = typer.Option(
        None, help="Student model directory or hub id. Example: --student ./qwen0.5b"
    ),
    out: Optional[Path] = typer.Option(None, help="Output directory. Example: --out runs/student1"),
    full: Optional[bool] = typer.Option(
        None, "--full/--lora", help="Train all weights instead of LoRA. Example: --full"
    ),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank. Example: --lora-r 16"),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha (scale = alpha / r). Example: --lora-alpha 32"),
    lora_dropout: Optional[float] = typer.Option(None, help="LoRA dropout. Example: --lora-dropout 0.05"),
    target_modules: Optional[str] = typer.Option(
        None, help="LoRA targets: all-linear or comma-separated names. Example: --target-modules q_proj,v_proj"
    ),
    loss_on: Optional[str] = typer.Option(
        None, help="Assistant turns with loss: final (the teacher's answer) or all. Example: --loss-on all"
    ),
    epochs: Optional[int] = typer.Option(None, help="Passes over the data. Example: --epochs 3"),
    max_steps: Optional[int] = typer.Option(
        None, help="Optimizer steps (overrides --epochs). Example: --max-steps 500"
    ),
    batch_size: Optional[int] = typer.Option(None, help="Examples per micro-batch per device. Example: --batch-size 8"),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step. Example: --grad-accum 4"),
    lr: Optional[float] = typer.Option(
        None, help="Peak learning rate (default 2e-4 LoRA, 2e-5 full). Example: --lr 1e-4"
    ),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay. Example: --weight-decay 0.01"),
    warmup: Optional[float] = typer.Option(
        None, help="Warm-up: fraction of steps if < 1, else steps. Example: --warmup 0.05"
    ),
    max_grad_norm: Optional[float] = typer.Option(
        None, help="Gradient clipping norm, 0 = off. Example: --max-grad-norm 1.0"
    ),
    max_length: Optional[int] = typer.Option(None, help="Tokens per example. Example: --max-length 1024"),
    overlong: Optional[str] = typer.Option(None, help="Longer records: truncate or drop. Example: --overlong drop"),
    packing: Optional[bool] = typer.Option(
        None, "--packing/--no-packing", help="Padding-free packed rows. Example: --packing"
    ),
    gradient_checkpointing: Optional[bool] = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Less memory, more time. Example: --gradient-checkpointing",
    ),
    precision: Optional[str] = typer.Option(None, help="auto, bf16, fp16 or no. Example: --precision bf16"),
    eval_split: Optional[float] = typer.Option(None, help="Held-out fraction of records. Example: --eval-split 0.05"),
    eval_every: Optional[int] = typer.Option(
        None, help="Steps between eval losses, 0 = end only. Example: --eval-every 50"
    ),
    save_every: Optional[int] = typer.Option(
        None, help="Steps between checkpoints, 0 = none. Example: --save-every 100"
    ),
    keep_checkpoints: Optional[int] = typer.Option(
        None, help="Checkpoints kept on disk. Example: --keep-checkpoints 2"
    ),
    resume: Optional[bool] = typer.Option(
        None, "--resume/--no-resume", help="Continue from the newest checkpoint. Example: --resume"
    ),
    merge: Optional[bool] = typer.Option(
        None, "--merge/--no-merge", help="Also write merged full weights. Example: --merge"
    ),
    seed: Optional[int] = typer.Option(None, help="Random seed. Example: --seed 1"),
    chat_template: Optional[Path] = typer.Option(
        None, help="Jinja chat template file. Example: --chat-template chatml.jinja"
    ),
    trust_remote_code: Optional[bool] = typer.Option(
        None, "--trust-remote-code/--no-trust-remote-code",
        help="Run model code from the student repo. Example: --trust-remote-code",
    ),
    progress: Optional[bool] = typer.Option(
        None, "--progress/--no-progress", help="Progress bar on stderr. Example: --no-progress"
    ),
    threads: Optional[int] = typer.Option(
        None, help="torch CPU threads (default: by model size, 1 for tiny models). Example: --threads 4"
    ),
    teacher: Optional[str] = typer.Option(
        None, help="Local teacher for logit/feature KD, same tokenizer as the student. Example: --teacher hf:./teacher"
    ),
    kd: Optional[str] = typer.Option(
        None, help="KD divergence: forward-kl (default), reverse-kl or jsd. Example: --kd jsd"
    ),
    jsd_beta: Optional[float] = typer.Option(None, help="Beta of --kd jsd, in (0, 1). Example: --jsd-beta 0.5"),
    kd_weight: Optional[float] = typer.Option(
        None, help="Weight w of the KD term; CE gets 1 - w (default 0.5). Example: --kd-weight 0.7"
    ),
    temperature: Optional[float] = typer.Option(
        None, help="LOSS temperature of KD (default 1.0); not collect's sampling temperature. Example: --temperature 2"
    ),
    t2: Optional[bool] = typer.Option(
        None, "--t2/--no-t2", help="Multiply the KD term by T^2 (default on). Example: --no-t2"
    ),
    feature_kd: Optional[str] = typer.Option(
        None, help="Feature KD layer pairs STUDENT:TEACHER (1-based) or auto. Example: --feature-kd 1:2,2:4"
    ),
    feature_weight: Optional[float] = typer.Option(
        None, help="Weight of each feature-pair MSE term (default 1.0). Example: --feature-weight 0.5"
    ),
    sckd: Optional[bool] = typer.Option(
        None, "--sckd/--no-sckd", help="Gate each KD term per step by its gradient cosine with CE. Example: --sckd"
    ),
    sckd_threshold: Optional[float] = typer.Option(
        None, help="SCKD: a term counts when its cosine is above this (default 0). Example: --sckd-threshold 0.1"
    ),
    teacher_dtype: Optional[str] = typer.Option(
        None, help="Teacher weights: auto, float32, bfloat16 or float16. Example: --teacher-dtype bfloat16"
    ),
    teacher_device: Optional[str] = typer.Option(
        None, help="Device of the teacher (default: the student's). Example: --teacher-device cuda:1"
    ),
    kd_chunk_size: Optional[int] = typer.Option(
        None, help="Target tokens per chunk of the logit losses (memory). Example: --kd-chunk-size 128"
    ),
    graybox: Optional[bool] = typer.Option(
        None, "--graybox/--no-graybox",
        help="Without --teacher, use records' collected top-K logprobs (default on). Example: --no-graybox",
    ),
    on_policy: Optional[float] = typer.Option(
        None, help="On-policy KD: fraction of micro-batches the student answers and the teacher grades (0 = off). "
        "Example: --on-policy 0.5"
    ),
    on_policy_warmup: Optional[float] = typer.Option(
        None, help="Fraction of steps trained off-policy first (default 0.5; 0 from an SFT'd student). "
        "Example: --on-policy-warmup 0.3"
    ),
    on_policy_temperature: Optional[float] = typer.Option(
        None, help="Sampling temperature of the student's on-policy answers (default 1, 0 = greedy). "
        "Example: --on-policy-temperature 0.7"
    ),
    on_policy_max_tokens: Optional[int] = typer.Option(
        None, help="Longest on-policy answer in tokens (default 256). Example: --on-policy-max-tokens 128"
    ),
    config: Optional[Path] = typer.Option(
        None, help="TOML file; its [train] section sets options. Example: --config run.toml"
    ),
    json_: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout. Example: --json"),
) -> None:
    """Fine-tune a student (LoRA or full) on records, through accelerate; with --teacher, distill (KD, SCKD).

    Example: imitate train --data clean.jsonl --student ./student --out runs/s1 --epochs 2

    Example: imitate train --data clean.jsonl --student ./student --teacher hf:./teacher --sckd --out runs/s2
    """
    from imitate.train import loop as stage

    flags = {
        "data": data or None, "student": student, "out": out, "full": full, "lora_r": lora_r, "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout, "target_modules": target_modules, "loss_on": loss_on, "epochs": epochs,
        "max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
        "weight_decay": weight_decay, "warmup": warmup, "max_grad_norm": max_grad_norm, "max_length": max_length,
        "overlong": overlong, "packing": packing, "gradient_checkpointing": gradient_checkpointing,
        "precision": precision, "eval_split": eval_split, "eval_every": eval_every, "save_every": save_every,
        "keep_checkpoints": keep_checkpoints, "resume": resume, "merge": merge, "seed": seed,
        "chat_template": chat_template, "trust_remote_code": trust_remote_code, "progress": progress,
        "threads": threads, "teacher": teacher, "kd": kd, "jsd_beta": jsd_beta, "kd_weight": kd_weight, "temperature": temperature,
        "t2": t2, "feature_kd": feature_kd, "feature_weight": feature_weight, "sckd": sckd,
        "sckd_threshold": sckd_threshold, "teacher_dtype": teacher_dtype, "teacher_device": teacher_device,
        "kd_chunk_size": kd_chunk_size, "graybox": graybox, "on_policy": on_policy,
        "on_policy_warmup": on_policy_warmup, "on_policy_temperature": on_policy_temperature,
        "on_policy_max_tokens": on_policy_max_tokens,
    }
    with handle_errors():
        cfg = stage_config(stage.TrainConfig, config, "train", flags)
        summary = stage.run(cfg)
    if stage.is_main_process():  # under accelerate launch / torchrun every rank returns; one prints
        emit(summary, json_)
        if not json_:
            typer.echo(summary["out"])


# ---------------------------------------------------------------------------------------------------------------------
# eval and run  (issue: pipeline)
# ---------------------------------------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    model: Optional[Path] = typer.Option(
        None, help="Student: model dir, LoRA adapter dir or hub id. Example: --model runs/student1"
    ),
    prompts: Optional[Path] = typer.Option(
        None, help="Held-out JSONL rows with prompt or messages (a final assistant turn = teacher answer). "
        "Example: --prompts data/eval.jsonl"
    ),
    teacher: Optional[str] = typer.Option(
        None, help="Ask this teacher (greedy) for answers to agree with; API teachers go through collect (cached in "
        "OUT.teacher.jsonl). Example: --teacher hf:./teacher"
    ),
    reference_field: Optional[str] = typer.Option(
        None, help="Score against this field of each row instead of the teacher. Example: --reference-field answer"
    ),
    match: Optional[str] = typer.Option(
        None, help="exact (case/whitespace-normalised), contains or regex (the reference is a pattern). "
        "Example: --match contains"
    ),
    min_score: Optional[float] = typer.Option(
        None, help="Gate: exit code 3 when the score (0..1) is below this. Example: --min-score 0.8"
    ),
    out: Optional[Path] = typer.Option(
        None, help="Results JSONL, one line per prompt. Example: --out eval.results.jsonl"
    ),
    batch_size: Optional[int] = typer.Option(
        None, help="Prompts generated together (default 16). Example: --batch-size 32"
    ),
    max_tokens: Optional[int] = typer.Option(
        None, help="Longest answer in new tokens (default 256). Example: --max-tokens 64"
    ),
    trust_remote_code: Optional[bool] = typer.Option(
        None,
        "--trust-remote-code/--no-trust-remote-code",
        help="Run model code shipped with the model. Example: --trust-remote-code",
    ),
    device: Optional[str] = typer.Option(None, help="Torch device (default cuda when present). Example: --device cpu"),
    config: Optional[Path] = typer.Option(
        None, help="TOML file; its [eval] section sets options. Example: --config run.toml"
    ),
    json_: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout. Example: --json"),
) -> None:
    """Generate with the student on held-out prompts and score it (reference field or agreement with the teacher).

    Example: imitate eval --model runs/student1 --prompts data/eval.jsonl --reference-field answer --min-score 0.8

    Exit codes: 0 done, 1 an error, 2 bad options, 3 the --min-score gate failed (the results file is written first).
    """
    from imitate import evaluate as stage

    flags = {
        "model": model, "prompts": prompts, "teacher": teacher, "reference_field": reference_field, "match": match,
        "min_score": min_score, "out": out, "batch_size": batch_size, "max_tokens": max_tokens,
        "trust_remote_code": trust_remote_code, "device": device,
    }
    from imitate.errors import GateFailed

    with handle_errors():
        cfg = stage_config(stage.EvalConfig, config, "eval", flags)
        try:
            summary = stage.run(cfg)
        except GateFailed as exc:  # CI still gets the numbers on stdout before exit code 3
            emit(getattr(exc, "summary", {}), json_)
            raise
    emit(summary, json_)
    if not json_:
        where = f" -> {summary['out']}" if summary["out"] else ""
        typer.echo(f"score {summary['score']:.4f} ({summary['n']} prompts){where}")


@app.command("run")
def run_cmd(
    pipeline: Path = typer.Argument(
        ...,
        help="Pipeline TOML with [collect], [clean], [train], [eval] sections. Example: examples/demo.toml",
        metavar="PIPELINE.toml",
    ),
    only: Optional[str] = typer.Option(
        None, "--only", help="Run only this stage or named run, e.g. --only train or --only train.kd"
    ),
    from_stage: Optional[str] = typer.Option(
        None, "--from", help="Start at this stage or named run and go on to the end, e.g. --from train"
    ),
    force: Optional[bool] = typer.Option(
        None, "--force", help="Run the selected stages even if their manifests say they are up to date. Example: --force"
    ),
    json_: Optional[bool] = typer.Option(
        None, "--json", help="Print one JSON summary of every run (status, reason, seconds, summary). Example: --json"
    ),
) -> None:
    """Run collect -> clean -> train -> eval from one TOML file, skipping runs whose inputs and options are unchanged.

    Example: imitate run examples/demo.toml --json

    Exit codes: 0 done, 1 a stage failed, 2 a bad pipeline file, 3 an eval gate (min-score) failed.
    """
    from imitate import pipeline as pl

    with handle_errors():
        result = pl.run_pipeline(pipeline, only=only, from_=from_stage, force=bool(force), quiet_stdout=bool(json_))
    if json_:
        emit(result, True)
    else:
        typer.echo(pl.format_report(result))
    if result["exit_code"]:
        raise typer.Exit(result["exit_code"])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
