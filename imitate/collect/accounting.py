"""Accounting for `imitate collect`: the summary dict (--json prints it) and its table on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imitate.collect.pricing import cost, prices_for


def summary(cfg: Any, stats: Any, out: Path, failures: Path, wall_s: float) -> dict:
    prices = prices_for(cfg.teacher, cfg.price_in, cfg.price_out)
    return {
        "out": str(out),
        "failures": str(failures) if stats.failed else None,
        "teacher": cfg.teacher,
        "requests": stats.requests,
        "cached": stats.cached,
        "sent": stats.sent,
        "completed": stats.completed,
        "failed": stats.failed,
        "retries": stats.retries,
        "calls": stats.calls,
        "length_cut": stats.length,
        "tokens_in": stats.tokens_in,
        "tokens_out": stats.tokens_out,
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(stats.completed / wall_s, 2) if wall_s > 0 else None,
        "price_per_mtok": list(prices) if prices else None,
        "cost_usd": cost(stats.tokens_in, stats.tokens_out, prices),
    }


def dry_run_summary(cfg: Any, jobs: list, done: set[str], seeds: list[str] | None = None) -> dict:
    """What a run would send. With self-instruct the tasks do not exist yet: the estimate assumes new tasks as long as
    the seeds on average, PER_CALL tasks per generation call and no duplicates."""
    from imitate.collect.limiter import est_tokens

    todo = [j for j in jobs if j.request.id not in done]
    would_send = len(todo)
    tokens = sum(est_tokens(j.request.messages) for j in todo)
    result: dict[str, Any] = {
        "dry_run": True,
        "teacher": cfg.teacher,
        "requests": len(jobs),
        "cached": len(jobs) - len(todo),
    }
    if seeds is not None:
        from imitate.collect.selfinstruct import PER_CALL

        task = sum(len(s) for s in seeds) // max(1, len(seeds)) // 4
        calls = -(-cfg.self_instruct // PER_CALL)
        answers = cfg.self_instruct * cfg.n
        result["self_instruct_calls"] = calls
        would_send, tokens = calls + answers, calls * (150 + 5 * task) + answers * (task + 8)
    prices = prices_for(cfg.teacher, cfg.price_in, cfg.price_out)
    result |= {
        "would_send": would_send,
        "est_tokens_in": tokens,
        "token_estimate": "characters / 4, per request"
        + (" (self-instruct: tasks as long as the seeds)" if seeds else ""),
        "max_tokens_out": would_send * cfg.max_tokens,
        "price_per_mtok": list(prices) if prices else None,
        "est_cost_in_usd": cost(tokens, 0, prices),
    }
    return result


def print_summary(result: dict) -> None:
    """The summary as a two-column table on stderr."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="imitate collect" + (" (dry run: nothing sent)" if result.get("dry_run") else ""), show_header=False
    )
    table.add_column("")
    table.add_column("", justify="right")
    for key, value in result.items():
        if key == "dry_run" or value is None:
            continue
        if key in ("cost_usd", "est_cost_in_usd"):
            value = f"${value:.6f}" if value < 0.01 else f"${value:.2f}"
        table.add_row(key.replace("_", " "), str(value))
    Console(stderr=True).print(table)
