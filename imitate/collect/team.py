"""`imitate collect` with several teachers: every prompt and sample asked of each, in one run, into one OUT.

Each teacher is a lane: its own engine (concurrency, rpm/tpm limiter, retries), its own prices and spend drawing on
the command's one --max-cost, batch mode where its provider has a batch API (hf teachers run live beside them),
and its own progress bar. The lanes run side by side in one event loop; records carry their `teacher` and their ids
hash it, so OUT stays the resume journal of every lane: a re-run asks each teacher only what it has not answered.
A teacher that fails (for a while or for good) does not stop the others; its failures are listed per teacher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate.collect.config import CollectConfig
from imitate.collect.stage import BASE_URL_ENV, Job, first_error, make_teacher, plan, read_rows, sidecar
from imitate.collect.teachers import parse_spec
from imitate.errors import ImitateError

BATCH_PROVIDERS = ("openai", "anthropic")
SUMMED = ("requests", "cached", "sent", "completed", "failed", "retries", "calls", "length_cut", "tokens_in",
          "tokens_out")


def lane_config(cfg: CollectConfig, spec: str) -> CollectConfig:
    """The options of one teacher of the run: batch only where its provider has a batch API; --base-url and
    --api-key-env belong to the openai: teachers (anthropic: ones read ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY)."""
    provider = parse_spec(spec)[0]
    batch = provider in BATCH_PROVIDERS
    own = provider == "openai"
    return dataclasses.replace(
        cfg, teacher=spec, batch=cfg.batch and batch, cancel=cfg.cancel and batch,
        base_url=cfg.base_url if own else None, api_key_env=cfg.api_key_env if own else None,
    )


@dataclass
class Lane:
    """One teacher's part of the run."""

    cfg: CollectConfig
    teacher: Any = None
    secret: str | None = None
    jobs: list[Job] = field(default_factory=list)
    held: int = 0  # requests in open provider batches (a live lane does not send them)
    engine: Any = None
    budget: Any = None

    @property
    def spec(self) -> str:
        return str(self.cfg.teacher)

    @property
    def batch(self) -> bool:
        return self.cfg.batch or self.cfg.cancel


def run(cfg: CollectConfig) -> dict:
    """Collect every teacher's answers for every input row; returns the summary (one entry per teacher)."""
    from imitate.collect import templates as prompts
    from imitate.collect.accounting import Budget, check_estimate, dry_run_summary
    from imitate.collect.batch import held_ids
    from imitate.collect.engine import Engine
    from imitate.collect.journal import BatchLog, finished_ids
    from imitate.collect.pricing import prices_for

    lanes = [Lane(lane_config(cfg, spec)) for spec in cfg.teachers]
    if cfg.cancel:  # only teachers with batches have anything to cancel
        lanes = [lane for lane in lanes if lane.batch]
    for lane in lanes:  # cheap checks first: every teacher's key (named by its env var) and local path
        lane.teacher, lane.secret = (None, None) if cfg.dry_run else make_teacher(lane.cfg)
    template = prompts.load(cfg.template) if cfg.template else None
    out = Path(cfg.out)
    failures = Path(cfg.failures) if cfg.failures else sidecar(out, "failures")
    rows = read_rows(cfg.prompts) if cfg.prompts is not None and not cfg.self_instruct else []
    seeds = None
    if cfg.self_instruct:  # the first teacher writes the tasks, every teacher answers them
        from imitate.collect.selfinstruct import DEFAULT_SEEDS, load_seeds

        seeds = load_seeds(Path(cfg.seed_tasks or cfg.prompts or DEFAULT_SEEDS))
    held = held_ids(out)
    for lane in lanes:  # every template/input error surfaces here, before any request
        lane.jobs = plan(lane.cfg, rows, template)
        if seeds is not None:
            plan(lane.cfg, [("self-instruct task", {"prompt": "a task", "origin": "self-instruct"})], template)
        if not lane.batch:  # requests that open provider batches hold are never also sent live
            lane.held = sum(j.request.id in held for j in lane.jobs)
            lane.jobs = [j for j in lane.jobs if j.request.id not in held]
    done = finished_ids(out)
    estimates = [dry_run_summary(lane.cfg, lane.jobs, done, seeds) for lane in lanes]
    if cfg.dry_run:
        result = combine(cfg, estimates, dry_run=True)
        print_team(result)
        return result
    if not cfg.cancel:  # --max-cost: the worst cases of all teachers together, refused before anything is sent
        check_estimate(lanes[0].cfg, estimates[0], [(lane.cfg, e) for lane, e in zip(lanes[1:], estimates[1:])])
    pot = Budget(cfg.max_cost, None)
    for lane in lanes:
        lane.budget = pot.share(prices_for(lane.spec, cfg.price_in, cfg.price_out, batch=lane.cfg.batch))
        lane.engine = Engine(lane.cfg, lane.teacher, lane.secret, out, failures, lane.budget)
    t0 = time.monotonic()
    log = BatchLog(sidecar(out, "batches"))
    extra = asyncio.run(_collect(cfg, lanes, template, seeds, log))
    wall = time.monotonic() - t0
    from imitate.collect.accounting import summary

    parts = []
    for lane in lanes:
        if not lane.batch:
            lane.engine.stats.pending = lane.held
        parts.append(summary(lane.cfg, lane.engine.stats, out, failures, wall, lane.budget))
    result = combine(cfg, parts, spent=pot.spent)
    if extra:
        result["self_instruct"] = extra
    print_team(result)
    report(cfg, lanes, pot, result, failures)
    return result


async def _collect(cfg: CollectConfig, lanes: list[Lane], template: Any, seeds: list[str] | None, log: Any) -> dict:
    """All lanes in one event loop; a lane's error is raised once every other lane has finished."""
    from imitate.collect.batch import BatchRun

    async def lane_run(lane: Lane) -> None:
        if lane.batch:
            provider = parse_spec(lane.spec)[0]
            base_url = lane.cfg.base_url or os.environ.get(BASE_URL_ENV[provider]) or None
            await BatchRun(lane.cfg, lane.engine, base_url, log).run(lane.jobs)
        else:
            await lane.engine.collect(lane.jobs, label=f"collect {lane.spec}")

    extra: dict = {}
    try:
        if seeds is not None:
            from imitate.collect.selfinstruct import expand

            first = lanes[0]
            new_rows, extra = await expand(first.cfg, first.engine, seeds)
            first.engine.stats.tokens_in += extra["tokens_in"]  # generation counts in the first teacher's totals
            first.engine.stats.tokens_out += extra["tokens_out"]
            for lane in lanes:
                lane.jobs = plan(lane.cfg, new_rows, template)
        outcomes = await asyncio.gather(*(lane_run(lane) for lane in lanes), return_exceptions=True)
    finally:
        for lane in lanes:
            await lane.engine.aclose()
    for lane, outcome in zip(lanes, outcomes):
        if isinstance(outcome, ImitateError):
            raise type(outcome)(f"teacher {lane.spec}: {outcome.message}", hint=outcome.hint)
        if isinstance(outcome, BaseException):
            raise outcome
    return extra


def combine(cfg: CollectConfig, parts: list[dict], *, dry_run: bool = False, spent: float | None = None) -> dict:
    """The run's summary: totals over the teachers, and each teacher's own summary under `teachers`."""
    result: dict[str, Any] = {"dry_run": True} if dry_run else {"out": str(cfg.out)}
    keys = ("requests", "cached", "would_send", "est_tokens_in", "max_tokens_out") if dry_run else SUMMED
    for key in keys:
        result[key] = sum(p.get(key) or 0 for p in parts)
    costs = [p.get("est_cost_max_usd" if dry_run else "cost_usd") for p in parts]
    total = None if any(c is None for c in costs) else sum(costs)
    result["est_cost_max_usd" if dry_run else "cost_usd"] = total if spent is None or total is None else spent
    if not dry_run:
        result["failures"] = next((p["failures"] for p in parts if p.get("failures")), None)
        result["pending"] = sum(p.get("pending") or 0 for p in parts)
        result["not_sent"] = sum(p.get("not_sent") or 0 for p in parts)
    result["teachers"] = {p["teacher"]: {k: v for k, v in p.items() if k not in ("teacher", "out", "dry_run")}
                          for p in parts}
    return result


def print_team(result: dict) -> None:
    """One row per teacher (and the total) on stderr: the summary and cost table of a team run."""
    from rich.console import Console
    from rich.table import Table

    dry = result.get("dry_run")
    cols = ({"requests": "asked", "cached": "cached", "would_send": "to send", "est_tokens_in": "in (est)",
             "max_tokens_out": "out (max)", "est_cost_max_usd": "USD max"} if dry else
            {"requests": "asked", "cached": "cached", "completed": "done", "failed": "failed", "retries": "retries",
             "tokens_in": "in", "tokens_out": "out", "cost_usd": "USD"})
    table = Table(title="imitate collect, per teacher" + (" (dry run: nothing sent)" if dry else ""))
    table.add_column("teacher", no_wrap=True)
    for head in cols.values():
        table.add_column(head, justify="right")

    def cell(v: Any, key: str) -> str:
        if v is None:
            return "?" if key.endswith("usd") else "-"
        return f"{v:.6f}".rstrip("0").rstrip(".") if key.endswith("usd") else str(v)

    for spec, part in result["teachers"].items():
        table.add_row(spec, *(cell(part.get(c), c) for c in cols))
    table.add_row("total", *(cell(result.get(c), c) for c in cols), style="bold")
    Console(stderr=True).print(table)


def report(cfg: CollectConfig, lanes: list[Lane], pot: Any, result: dict, failures: Path) -> None:
    """The notes after a run, and its exit: over budget (4), nothing got through at all (1)."""
    from imitate.collect.stage import stop_if_over_budget

    pending = result["pending"]
    if pending:
        print(f"{pending} request(s) are in provider batches that have not ended; run the same command again to "
              "collect them (they are never sent twice), or add --cancel to stop them.", file=sys.stderr)
    failed = {lane.spec: lane.engine.stats.failed for lane in lanes if lane.engine.stats.failed}
    if failed:
        each = ", ".join(f"{spec}: {n}" for spec, n in failed.items())
        print(f"{sum(failed.values())} request(s) failed after retries ({each}); they are listed with their errors "
              f"in {failures}. Re-run the same command to retry them (finished records are not sent again).",
              file=sys.stderr)
    unsent = sum(lane.engine.stats.unsent for lane in lanes)
    if unsent:
        stats = dataclasses.replace(lanes[0].engine.stats, unsent=unsent,
                                    completed=sum(lane.engine.stats.completed for lane in lanes))
        stop_if_over_budget(cfg, stats, pot, result)
    if failed and not result["completed"]:
        raise ImitateError(
            f"no request succeeded in this run (first error: {first_error(failures)})",
            hint="check each --teacher, --base-url (or OPENAI_BASE_URL / ANTHROPIC_BASE_URL) and that the servers "
            f"are reachable; the failed requests are in {failures} and are retried when you run the same command again",
        )

