"""CollectConfig: every option of `imitate collect` (its flag, [collect] key and docs/options.md row come from here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imitate.collect.teachers import parse_spec
from imitate.errors import UsageError
from imitate.locks import wait_lock_opt
from imitate.options import Checked, opt


def teacher_list(values: list[str], flag: str) -> str | list[str]:
    """`--teacher a --teacher b` -> ["a", "b"]; one teacher stays a plain string (single-teacher runs as before)."""
    return values[0] if len(values) == 1 else list(values)


@dataclass(frozen=True)
class CollectConfig(Checked):
    teacher: str | list[str] = opt(
        help="Teacher as provider:model: openai:MODEL (any OpenAI-compatible server with --base-url), "
        "anthropic:MODEL, hf:PATH_OR_ID (a local transformers model). Repeat the flag (a list in TOML) to ask "
        "every prompt and sample of each teacher: records carry their teacher; each has its own rate limits, "
        "retries, cost and resume; --base-url and --api-key-env then apply to the openai: teachers.",
        example="openai:gpt-4o-mini --teacher anthropic:claude-haiku-4-5", parse=teacher_list, metavar="SPEC",
    )
    out: Path = opt(help="Records JSONL; also the resume journal (finished requests are not sent again).",
                    example="out/records.jsonl", path=True)
    prompts: Path | None = opt(
        None, "Input rows: JSONL with prompt / messages / template fields, or .txt with one prompt a line.",
        example="data/prompts.jsonl", input=True)
    template: str | None = opt(
        None, "Jinja2 template rendering each row into a prompt: a built-in name (chat, instruction, default) or a "
        ".j2 path; none: rows give prompt or messages.", example="chat", path=True)
    system: str | None = opt(None, "System turn added to every request that has none; the student sees and "
                             "trains on it too (see --context).", example="'You are concise.'")
    context: Path | None = opt(
        None, "Turns only the teacher sees, in front of every request (.json/.jsonl turns, .txt system text, or a "
        ".j2 template rendered per row); records keep them in 'context', apart from the student's 'messages'.",
        example="prompts/house_style.json", input=True)
    n: int = opt(1, "Samples per prompt (each is its own record; the id includes its index).", example="4", ge=1)
    temperature: float = opt(0.7, "Sampling temperature; 0 = greedy for every teacher.", example="0", ge=0)
    top_p: float | None = opt(None, "Nucleus sampling; none leaves the provider's default.", example="0.95",
                              gt=0, le=1)
    max_tokens: int = opt(1024, "Answer length cap in tokens; answers cut by it are kept with finish_reason length.",
                          example="256", ge=1)
    logprobs: int | None = opt(None, "Store the top-K log-probabilities of each answer token (openai-compatible "
                               "and hf teachers; for gray-box KD in train).", example="5", ge=0)
    concurrency: int = opt(16, "Requests in flight at once (API teachers).", example="64", ge=1)
    rpm: float | None = opt(None, "Our own requests/minute ceiling; none: unlimited.", example="500", gt=0)
    tpm: float | None = opt(None, "Our own tokens/minute ceiling (input as chars/4 + max-tokens); none: unlimited.",
                            example="200000", gt=0)
    retries: int = opt(6, "Extra attempts on 429/5xx/timeouts/connection errors before a request goes to the "
                       "failures file.", example="3", ge=0)
    timeout: float = opt(120.0, "Seconds per HTTP request.", example="60", gt=0)
    base_url: str | None = opt(None, "OpenAI-compatible server (vLLM, Ollama, llama.cpp).",
                               example="http://localhost:8000/v1", default_text="$OPENAI_BASE_URL")
    api_key_env: str | None = opt(None, "Environment variable holding the API key (its value is never printed).",
                                  example="MY_OPENAI_KEY", default_text="OPENAI_API_KEY / ANTHROPIC_API_KEY")
    failures: Path | None = opt(None, "Where failed requests go, with their error.", example="out/failed.jsonl",
                                path=True, default_text="OUT with .failures.jsonl")
    wait_lock: float = wait_lock_opt()
    price_in: float | None = opt(None, "USD per million input tokens, for the cost estimate.", example="0.15",
                                 ge=0, default_text="built-in table for known models")
    price_out: float | None = opt(None, "USD per million output tokens.", example="0.60", ge=0,
                                  default_text="built-in table for known models")
    dry_run: bool = opt(False, "Count requests and estimate input tokens (chars/4); send nothing, need no key.",
                        example="--dry-run", flag="--dry-run")
    self_instruct: int = opt(0, "First have the teacher write this many new instructions from seed tasks, then "
                             "answer them.", example="200", ge=0)
    seed_tasks: Path | None = opt(None, "Seed tasks for --self-instruct (JSONL rows with prompt or instruction).",
                                  example="my_seeds.jsonl", input=True,
                                  default_text="--prompts, else the built-in seed tasks")
    seed: int = opt(0, "RNG seed for self-instruct example sampling and retry jitter.", example="1")
    batch_size: int = opt(8, "hf teachers: prompts per generate() call.", example="16", ge=1)
    trust_remote_code: bool = opt(False, "hf teachers: run the model repository's own code.",
                                  example="--trust-remote-code", flag="--trust-remote-code")
    progress: bool = opt(True, "Progress bar on stderr.", example="--no-progress", flag="--progress/--no-progress")
    # --- budget and provider batch APIs
    max_cost: float | None = opt(
        None, "USD this command may spend: refused up front (exit 4) when the worst case (every answer at max-tokens) "
        "is over it, and nothing new is sent once spent + in flight could pass it; needs known prices or "
        "--price-in/--price-out.", example="5", gt=0)
    batch: bool = opt(False, "Send through the provider's batch API (openai:, anthropic:): half the price, results "
                      "within 24 h; re-runs re-attach to batches already created, never submit twice.",
                      example="--batch", flag="--batch")
    wait: bool = opt(True, "With --batch: wait for the batches, or submit and exit (run the same command later to "
                     "collect).", example="--no-wait", flag="--wait/--no-wait")
    cancel: bool = opt(False, "Cancel the open batches of --out (a later run collects what they finished and "
                       "resubmits the rest).", example="--out out/records.jsonl --cancel", flag="--cancel")
    batch_fallback: Literal["batch", "live"] = opt(
        "batch", "Errored or expired batch rows are retried in a new batch, or live right away.", example="live")
    batch_max_requests: int | None = opt(None, "Requests per batch.", example="10000", ge=1,
                                         default_text="the provider's limit (openai 50k, anthropic 100k)")
    batch_max_bytes: int | None = opt(None, "Bytes of requests per batch.", example="100000000", ge=1,
                                      default_text="the provider's limit (200 MB / 256 MB)")
    poll_interval: float = opt(15.0, "Seconds before the first re-poll of running batches; doubles while nothing "
                               "ends.", example="5", gt=0)
    poll_max: float = opt(300.0, "Longest wait between batch polls, in seconds.", example="60", gt=0)

    @property
    def teachers(self) -> list[str]:
        """Every teacher of the run, in the order given."""
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)

    def check(self) -> None:
        if isinstance(self.teacher, list) and len(self.teacher) == 1:  # `teacher = ["x"]` in TOML: one teacher
            object.__setattr__(self, "teacher", self.teacher[0])
        if not self.teachers:
            raise UsageError("no teacher: give --teacher provider:model (repeat it for several)")
        repeated = sorted({t for t in self.teachers if self.teachers.count(t) > 1})
        if repeated:
            raise UsageError(f"--teacher {repeated[0]} is given twice", hint="name each teacher once; --n N asks "
                             "each of them N samples")
        providers = [parse_spec(t)[0] for t in self.teachers]
        if "anthropic" in providers and self.logprobs:
            raise UsageError("--logprobs is not available from anthropic teachers",
                             hint="use an openai-compatible or hf teacher")
        if self.prompts is None and not self.self_instruct and not self.cancel:
            raise UsageError("no input: give --prompts FILE (or --self-instruct N)")
        if self.batch or self.cancel:
            if not any(p in ("openai", "anthropic") for p in providers):  # several teachers: hf ones run live
                raise UsageError(f"--batch needs an openai: or anthropic: teacher, not {self.teacher!r}",
                                 hint="hf teachers run locally: leave out --batch")
            if self.self_instruct:
                raise UsageError("--batch cannot be combined with --self-instruct (it generates tasks round by round)",
                                 hint="run --self-instruct live, then collect its rows with --batch --prompts")
        if self.poll_max < self.poll_interval:
            raise UsageError(f"--poll-max ({self.poll_max}) must be at least --poll-interval ({self.poll_interval})")
