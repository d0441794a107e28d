"""`imitate collect`: rows x template -> requests -> journal -> teacher -> records + failures.

The run, top to bottom:
  1. check cheap things first: the teacher spec, the API key (named by env var, never printed), the template;
  2. read every input row and render every request up front, so a bad line or a missing template variable stops the
     run before anything is sent (and costs nothing);
  3. skip the requests whose id already has a record in OUT (OUT is the resume journal);
  4. send the rest with bounded concurrency, our own requests/min + tokens/min pacing, and retries (backoff + jitter,
     honouring Retry-After); each answer is appended to OUT the moment it arrives; a request that exhausts its
     retries goes to the failures file with its error, so nothing is silently dropped;
  5. print the accounting (stderr table; the same dict is returned for --json).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.collect.config import CollectConfig
from imitate.collect.teachers import Request, parse_spec
from imitate.errors import ImitateError, InputError
from imitate.locks import locks_outputs

KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}


@dataclass(frozen=True)
class Job:
    """One request and where it came from."""

    request: Request
    source: dict
    where: str  # "file:line"


def first_error(failures: Path) -> str:
    """The error of the first request in the failures file (for the 'nothing succeeded' note)."""
    try:
        with failures.open(encoding="utf-8") as fh:
            return str(json.loads(fh.readline()).get("error", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "see the failures file"


def sidecar(out: Path, kind: str) -> Path:
    """out.jsonl -> out.<kind>.jsonl"""
    return out.with_name(f"{out.name.removesuffix('.jsonl')}.{kind}.jsonl")


def params_of(cfg: CollectConfig) -> dict:
    """Sampling parameters sent to the teacher and hashed into the id (None values left out)."""
    p: dict[str, Any] = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    if cfg.top_p is not None:
        p["top_p"] = cfg.top_p
    if cfg.logprobs:
        p["logprobs"] = cfg.logprobs
    return p


# --- inputs -----------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for every input row: JSONL objects, or one prompt a line for .txt files."""
    from imitate.records import iter_jsonl

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file", hint="check --prompts")
    if path.suffix == ".txt":
        from imitate.jsonl import read_text_lines

        txt = []
        for i, text, why in read_text_lines(path):  # a huge line or bad bytes: an error naming the line
            if why:
                raise InputError(f"{path}:{i}: {why}", hint="one prompt a line, UTF-8")
            if text.strip():
                txt.append((f"{path}:{i}", {"prompt": text}))
        return txt
    rows = []
    for line in iter_jsonl(path):
        if not isinstance(line.data, dict):
            raise InputError(f"{path}:{line.lineno}: expected a JSON object, got {type(line.data).__name__}")
        rows.append((f"{path}:{line.lineno}", line.data))
    if not rows:
        raise InputError(f"{path}: no input rows", hint="one JSON object a line (or one prompt a line in a .txt file)")
    return rows


def row_messages(row: dict, where: str, template: Any, system: str | None) -> list[dict]:
    from imitate.records import check_messages, prompt_messages

    if template is not None:
        messages = template.render(row, where)
    elif "messages" in row:
        messages = prompt_messages({"messages": check_messages(row["messages"], where)})
        if not messages:
            raise InputError(f"{where}: 'messages' holds only an assistant turn; nothing to ask the teacher")
    elif "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise InputError(f"{where}: field 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise InputError(
            f"{where}: row has neither 'prompt' nor 'messages' (fields: {keys})",
            hint="give --template NAME|PATH to render other fields into a prompt",
        )
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def row_context(row: dict, where: str) -> list[dict]:
    """An input row's own `context` (records re-asked of another teacher keep what the first one saw), or []."""
    from imitate.records import messages_problem

    ctx = row.get("context") if "messages" in row else None
    if not ctx:
        return []
    problem = messages_problem(ctx, field="context")
    if problem:
        raise InputError(f"{where}: {problem}")
    return [dict(m) for m in ctx]


def plan(cfg: CollectConfig, rows: list[tuple[str, dict]], template: Any, context: Any = None) -> list[Job]:
    """Render every row (errors stop here, before any request) into n jobs each; identical requests appear once.
    With a context (imitate.collect.context) the teacher is sent its turns first; the id covers both parts."""
    from imitate.records import request_id

    params = params_of(cfg)
    jobs: list[Job] = []
    seen: set[str] = set()
    for where, row in rows:
        messages = row_messages(row, where, template, cfg.system)
        turns = context.turns(row, where) if context is not None else row_context(row, where)
        for sample in range(cfg.n):
            rid = request_id(cfg.teacher, messages, params, sample, context=turns)
            if rid not in seen:
                seen.add(rid)
                jobs.append(Job(Request(rid, turns + messages, params, sample, len(turns)), row, where))
    return jobs


def show_request(job: Job) -> dict:
    """One rendered request as the teacher gets it, its context apart (for --dry-run)."""
    r = job.request
    return {"context": r.messages[: r.context_turns], "messages": r.messages[r.context_turns :], "where": job.where}


# --- teachers ---------------------------------------------------------------------------------------------------


def api_key(cfg: CollectConfig, provider: str, base_url: str | None) -> str | None:
    """The key from the environment; missing fails now, naming the variable (never the value)."""
    env = cfg.api_key_env or KEY_ENV[provider]
    key = os.environ.get(env)
    if key:
        return key
    if base_url and not cfg.api_key_env:
        return "unused"  # local OpenAI-compatible servers usually take any key
    raise ImitateError(
        f"no API key for teacher {cfg.teacher!r}: environment variable {env} is not set",
        hint=f"export {env}=... (or name another variable with --api-key-env NAME); "
        "a local server (vLLM, Ollama...) needs no key: give its --base-url",
    )


def make_teacher(cfg: CollectConfig) -> tuple[Any, str | None]:
    """(teacher, secret) — the secret is kept only to scrub it from error text."""
    provider, model = parse_spec(cfg.teacher)
    if provider == "hf":
        from imitate.collect.teachers.local import LocalTeacher

        return LocalTeacher(
            model, device=None, batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code
        ), None
    base_url = cfg.base_url or os.environ.get(BASE_URL_ENV[provider]) or None
    key = api_key(cfg, provider, base_url)
    opts = {"api_key": key, "base_url": base_url, "timeout": cfg.timeout, "concurrency": cfg.concurrency}
    if provider == "openai":
        from imitate.collect.teachers.openai import OpenAITeacher

        return OpenAITeacher(model, **opts), key
    from imitate.collect.teachers.anthropic import AnthropicTeacher

    return AnthropicTeacher(model, **opts), key


# --- run --------------------------------------------------------------------------------------------------------


@locks_outputs("collect")  # OUT (and an explicit --failures) first: a second run on it stops before anything else
def run(cfg: CollectConfig) -> dict:
    """Collect the teacher's answers for every input row; returns the accounting summary."""
    if not isinstance(cfg.teacher, str):  # several teachers: one lane each (imitate.collect.team)
        from imitate.collect import team

        return team.run(cfg)
    from imitate.collect import templates as prompts
    from imitate.collect.accounting import Budget, check_estimate, dry_run_summary, print_summary, summary
    from imitate.collect.context import load as load_context
    from imitate.collect.engine import Engine
    from imitate.collect.journal import finished_ids
    from imitate.collect.pricing import prices_for

    # cheap checks first: the key (named by its env var) and a local model's path, before reading any input
    teacher, secret = (None, None) if cfg.dry_run else make_teacher(cfg)
    template = prompts.load(cfg.template) if cfg.template else None
    context = load_context(cfg.context) if cfg.context else None
    out = Path(cfg.out)
    failures = Path(cfg.failures) if cfg.failures else sidecar(out, "failures")
    rows = read_rows(cfg.prompts) if cfg.prompts is not None and not cfg.self_instruct else []
    jobs = plan(cfg, rows, template, context)  # every template/input error surfaces here, before any request
    seeds = None
    if cfg.self_instruct:  # the same checks for the self-instruct seeds and the rows it will produce
        from imitate.collect.selfinstruct import DEFAULT_SEEDS, load_seeds

        seeds = load_seeds(Path(cfg.seed_tasks or cfg.prompts or DEFAULT_SEEDS))
        plan(cfg, [("self-instruct task", {"prompt": "a task", "origin": "self-instruct"})], template, context)
    in_batches = 0
    if not (cfg.batch or cfg.cancel):  # requests that open provider batches hold are never also sent live
        from imitate.collect.batch import held_ids

        held = held_ids(out)
        in_batches = sum(j.request.id in held for j in jobs)
        jobs = [j for j in jobs if j.request.id not in held]
    estimate = dry_run_summary(cfg, jobs, finished_ids(out), seeds)
    if cfg.dry_run:
        if jobs:
            estimate["first_request"] = show_request(jobs[0])
        print_summary(estimate)
        return estimate
    if not cfg.cancel:
        check_estimate(cfg, estimate)  # --max-cost: refuse before anything is sent
    t0 = time.monotonic()
    budget = Budget(cfg.max_cost, prices_for(cfg.teacher, cfg.price_in, cfg.price_out, batch=cfg.batch))
    engine = Engine(cfg, teacher, secret, out, failures, budget)
    if cfg.batch or cfg.cancel:
        from imitate.collect.batch import BatchRun

        provider = parse_spec(cfg.teacher)[0]
        base_url = cfg.base_url or os.environ.get(BASE_URL_ENV[provider]) or None
        batch_run = BatchRun(cfg, engine, base_url)
        extra = asyncio.run(_stoppable(engine, _collect_batch(engine, batch_run, jobs), cancel=True))
    else:
        extra = asyncio.run(_stoppable(engine, _collect(cfg, engine, jobs, template, seeds, context)))
        engine.stats.pending = in_batches
    result = summary(cfg, engine.stats, out, failures, time.monotonic() - t0, budget)
    if extra:
        result["self_instruct"] = extra
    print_summary(result)
    stop_if_interrupted(cfg, engine, result)
    stop_if_over_budget(cfg, engine.stats, budget, result)
    if engine.stats.pending:
        print(
            f"{engine.stats.pending} request(s) are in provider batches that have not ended; run the same command "
            "with --batch again to collect them (they are never sent twice, nor live), or add --cancel to stop them.",
            file=sys.stderr,
        )
    if engine.stats.failed:
        print(
            f"{engine.stats.failed} request(s) failed after retries; they are listed with their errors in {failures}. "
            "Re-run the same command to retry them (finished records are not sent again).",
            file=sys.stderr,
        )
        if not engine.stats.completed:  # nothing got through: a wrong URL or model, not a flaky request
            raise ImitateError(
                f"no request succeeded in this run (first error: {first_error(failures)})",
                hint="check --teacher, --base-url (or OPENAI_BASE_URL) and that the server is reachable; "
                f"the failed requests are in {failures} and are retried when you run the same command again",
            )
    if engine.stats.length:
        print(
            f'{engine.stats.length} answer(s) were cut by --max-tokens (kept, with finish_reason "length").',
            file=sys.stderr,
        )
    return result


def stop_if_over_budget(cfg: CollectConfig, stats: Any, budget: Any, result: dict) -> None:
    """Exit 4 when --max-cost held requests back; everything collected is kept."""
    from imitate.errors import BudgetExceeded

    if not stats.unsent:
        return
    exc = BudgetExceeded(
        f"--max-cost ${cfg.max_cost:g} reached: spent ${budget.spent:.4f}, {stats.unsent} request(s) not sent "
        f"(their worst case would pass the limit); {stats.completed} record(s) collected in this run are kept",
        hint="raise --max-cost (or lower --max-tokens) and run the same command again: only the requests left are sent",
    )
    exc.summary = result
    raise exc


def stop_if_interrupted(cfg: CollectConfig, engine: Any, result: dict) -> None:
    """After SIGTERM / SIGINT (the summary so far is printed): exit 143 / 130, saying how to continue."""
    from imitate.interrupts import Interrupted, signal_name

    if engine.halted not in ("SIGTERM", "SIGINT"):
        return
    signum = engine.halt_signum
    what = (f"{engine.stats.completed} record(s) written in this run are kept, {engine.cut_off} request(s) in flight "
            "were cancelled and will be asked again")
    if cfg.batch or cfg.cancel:
        what = "the batches already submitted stay recorded in the batch journal and are never submitted again"
    exc = Interrupted(f"stopped by {signal_name(signum)}: {what}", signum,
                      hint="run the same command to continue (finished records are not sent again)")
    result["stopped_by"] = signal_name(signum)
    exc.summary = result
    raise exc


async def _stoppable(engine: Any, work: Any, *, cancel: bool = False) -> dict:
    """Await `work` (the run's coroutine) with SIGTERM / SIGINT handled: the first one halts the engine (nothing more
    is sent, what is in flight is cancelled, what arrived is written); `cancel`: also cancel `work` where it is (a
    batch run: what is submitted is already in its journal)."""
    from imitate.interrupts import on_signals, signal_name

    task = asyncio.current_task()

    def stop(signum: int) -> None:
        engine.halt_signum = signum
        engine.halt(signal_name(signum))
        if cancel and task is not None:
            task.cancel()

    try:
        with on_signals(stop):
            return await work
    except asyncio.CancelledError:
        if not engine.halted:
            raise
        return {}


async def _collect_batch(engine: Any, batch_run: Any, jobs: list[Job]) -> dict:
    try:
        await batch_run.run(jobs)
        return {}
    finally:
        await engine.aclose()


async def _collect(
    cfg: CollectConfig, engine: Any, jobs: list[Job], template: Any, seeds: list[str] | None, context: Any = None
) -> dict:
    """Everything that talks to the teacher, in one event loop (the SDK clients belong to it)."""
    try:
        extra: dict = {}
        if cfg.self_instruct:
            from imitate.collect.selfinstruct import expand

            new_rows, extra = await expand(cfg, engine, seeds)
            jobs = plan(cfg, new_rows, template, context)
            # money spent on generation counts in the run's totals
            engine.stats.tokens_in += extra["tokens_in"]
            engine.stats.tokens_out += extra["tokens_out"]
        await engine.collect(jobs)
        return extra
    finally:
        await engine.aclose()
