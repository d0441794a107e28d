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
        with path.open("r", encoding="utf-8") as fh:
            return [(f"{path}:{i}", {"prompt": ln.rstrip("\r\n")}) for i, ln in enumerate(fh, 1) if ln.strip()]
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


def plan(cfg: CollectConfig, rows: list[tuple[str, dict]], template: Any) -> list[Job]:
    """Render every row (errors stop here, before any request) into n jobs each; identical requests appear once."""
    from imitate.records import request_id

    params = params_of(cfg)
    jobs: list[Job] = []
    seen: set[str] = set()
    for where, row in rows:
        messages = row_messages(row, where, template, cfg.system)
        for sample in range(cfg.n):
            rid = request_id(cfg.teacher, messages, params, sample)
            if rid not in seen:
                seen.add(rid)
                jobs.append(Job(Request(rid, messages, params, sample), row, where))
    return jobs


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


def run(cfg: CollectConfig) -> dict:
    """Collect the teacher's answers for every input row; returns the accounting summary."""
    if not isinstance(cfg.teacher, str):  # several teachers: one lane each (imitate.collect.team)
        from imitate.collect import team

        return team.run(cfg)
    from imitate.collect import templates as prompts
    from imitate.collect.accounting import Budget, check_estimate, dry_run_summary, print_summary, summary
    from imitate.collect.engine import Engine
    from imitate.collect.journal import finished_ids
    from imitate.collect.pricing import prices_for

    # cheap checks first: the key (named by its env var) and a local model's path, before reading any input
    teacher, secret = (None, None) if cfg.dry_run else make_teacher(cfg)
    template = prompts.load(cfg.template) if cfg.template else None
    out = Path(cfg.out)
    failures = Path(cfg.failures) if cfg.failures else sidecar(out, "failures")
    rows = read_rows(cfg.prompts) if cfg.prompts is not None and not cfg.self_instruct else []
    jobs = plan(cfg, rows, template)  # every template/input error surfaces here, before any request
    seeds = None
    if cfg.self_instruct:  # the same checks for the self-instruct seeds and the rows it will produce
        from imitate.collect.selfinstruct import DEFAULT_SEEDS, load_seeds

        seeds = load_seeds(Path(cfg.seed_tasks or cfg.prompts or DEFAULT_SEEDS))
        plan(cfg, [("self-instruct task", {"prompt": "a task", "origin": "self-instruct"})], template)
    in_batches = 0
    if not (cfg.batch or cfg.cancel):  # requests that open provider batches hold are never also sent live
        from imitate.collect.batch import held_ids

        held = held_ids(out)
        in_batches = sum(j.request.id in held for j in jobs)
        jobs = [j for j in jobs if j.request.id not in held]
    estimate = dry_run_summary(cfg, jobs, finished_ids(out), seeds)
    if cfg.dry_run:
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
        extra = asyncio.run(_collect_batch(engine, BatchRun(cfg, engine, base_url), jobs))
    else:
        extra = asyncio.run(_collect(cfg, engine, jobs, template, seeds))
        engine.stats.pending = in_batches
    result = summary(cfg, engine.stats, out, failures, time.monotonic() - t0, budget)
    if extra:
        result["self_instruct"] = extra
    print_summary(result)
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


async def _collect_batch(engine: Any, batch_run: Any, jobs: list[Job]) -> dict:
    try:
        await batch_run.run(jobs)
        return {}
    finally:
        await engine.aclose()


async def _collect(cfg: CollectConfig, engine: Any, jobs: list[Job], template: Any, seeds: list[str] | None) -> dict:
    """Everything that talks to the teacher, in one event loop (the SDK clients belong to it)."""
    try:
        extra: dict = {}
        if cfg.self_instruct:
            from imitate.collect.selfinstruct import expand

            new_rows, extra = await expand(cfg, engine, seeds)
            jobs = plan(cfg, new_rows, template)
            # money spent on generation counts in the run's totals
            engine.stats.tokens_in += extra["tokens_in"]
            engine.stats.tokens_out += extra["tokens_out"]
        await engine.collect(jobs)
        return extra
    finally:
        await engine.aclose()
