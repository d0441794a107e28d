"""Accounting for `imitate collect`: the summary dict (--json prints it), its table on stderr, and the budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imitate.collect.pricing import cost, prices_for


class Budget:
    """`--max-cost USD`: what one collect command may spend (None: no limit, costs are still counted).

    Before a request or a batch is sent it reserves its worst case: the estimated input tokens (chars/4) plus every
    answer at --max-tokens. Nothing new is sent once spent + reserved (in flight) + its worst case would pass the limit.
    When its answers arrive the reservation is replaced by what was billed (the usage the provider reports)."""

    def __init__(self, limit: float | None, prices: tuple[float, float] | None, pot: Budget | None = None):
        self.limit, self.prices = limit, prices or (0.0, 0.0)
        self.spent = 0.0  # billed so far in this command (with a pot: by this teacher)
        self.reserved = 0.0  # worst cases of what is in flight
        # several teachers: each has its own Budget (its prices, its spend for the cost table) drawing on one pot,
        # the command's Budget, which holds the limit
        self.pot = pot

    def share(self, prices: tuple[float, float] | None) -> Budget:
        """A teacher's Budget at its own prices, spending from this one's limit."""
        return Budget(self.limit, prices, pot=self)

    def worst(self, tokens_in: int, tokens_out: int) -> float:
        return cost(tokens_in, tokens_out, self.prices) or 0.0

    def fits(self, amount: float) -> bool:
        if self.pot is not None:
            return self.pot.fits(amount)
        return self.limit is None or self.spent + self.reserved + amount <= self.limit + 1e-12

    def reserve(self, amount: float, force: bool = False) -> bool:
        """Hold `amount` for a request about to be sent; False (nothing held) when it could pass the limit.
        force: already sent (a batch from an earlier run), count it anyway."""
        if not force and not self.fits(amount):
            return False
        self.reserved += amount
        if self.pot is not None:
            self.pot.reserved += amount
        return True

    def settle(self, amount: float, tokens_in: int, tokens_out: int) -> None:
        """The reservation `amount` is over; charge what was billed."""
        charged = cost(tokens_in, tokens_out, self.prices) or 0.0
        for b in (self, self.pot) if self.pot is not None else (self,):
            b.reserved = max(0.0, b.reserved - amount)
            b.spent += charged

    @property
    def left(self) -> float | None:
        return None if self.limit is None else max(0.0, self.limit - self.spent)


def check_estimate(cfg: Any, estimate: dict, more: list[tuple[Any, dict]] | None = None) -> None:
    """Refuse (exit 4) before anything is sent when the run's worst case is over --max-cost.
    more: the (config, estimate) of the other teachers of the run; their worst cases add up."""
    from imitate.errors import BudgetExceeded, UsageError

    if cfg.max_cost is None:
        return
    if cfg.max_cost <= 0:
        raise UsageError(f"--max-cost must be > 0 USD, got {cfg.max_cost}", hint="leave --max-cost out for no limit")
    worst = 0.0
    more = more or []
    for c, e in [(cfg, estimate), *more]:
        prices = prices_for(c.teacher, c.price_in, c.price_out, batch=c.batch)
        if prices is None:
            raise UsageError(
                f"--max-cost needs prices, and none are known for teacher {c.teacher!r}",
                hint="give --price-in and --price-out (USD per million tokens, live prices; --batch halves them)",
            )
        worst += cost(e["est_tokens_in"], e["max_tokens_out"], prices) or 0.0
    if more:
        estimate = {k: sum(e[k] for e in [estimate, *(e for _, e in more)])
                    for k in ("would_send", "est_tokens_in")}
    if worst > cfg.max_cost:
        raise BudgetExceeded(
            f"this run could cost up to ${worst:.4f} ({estimate['would_send']} request(s): ~{estimate['est_tokens_in']} "
            f"input tokens estimated as chars/4, every answer at --max-tokens {cfg.max_tokens}"
            f"{', batch prices' if cfg.batch else ''}), more than --max-cost ${cfg.max_cost:g}; nothing was sent",
            hint="raise --max-cost, lower --max-tokens, or collect fewer prompts"
            + ("" if cfg.batch else " (--batch costs half)"),
        )


def summary(cfg: Any, stats: Any, out: Path, failures: Path, wall_s: float, budget: Budget | None = None) -> dict:
    prices = prices_for(cfg.teacher, cfg.price_in, cfg.price_out, batch=cfg.batch)
    result = {
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
        # what the budget charged, each answer at the price it was billed at (a batch's live fallback at live prices)
        "cost_usd": round(budget.spent, 9) if budget and prices else cost(stats.tokens_in, stats.tokens_out, prices),
    }
    if cfg.batch:  # the live price of the same tokens, to show what batching saved
        result["mode"] = "batch"
        live = prices_for(cfg.teacher, cfg.price_in, cfg.price_out)
        result["live_cost_usd"] = cost(stats.tokens_in, stats.tokens_out, live)
        result["batches"] = stats.batches
    if cfg.batch or stats.pending:
        result["pending"] = stats.pending
    if cfg.max_cost is not None:
        result["max_cost_usd"] = cfg.max_cost
        result["not_sent"] = stats.unsent
    return result


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
    prices = prices_for(cfg.teacher, cfg.price_in, cfg.price_out, batch=cfg.batch)
    result |= {
        "would_send": would_send,
        "est_tokens_in": tokens,
        "token_estimate": "characters / 4, per request"
        + (" (self-instruct: tasks as long as the seeds)" if seeds else ""),
        "max_tokens_out": would_send * cfg.max_tokens,
        "price_per_mtok": list(prices) if prices else None,
        "est_cost_in_usd": cost(tokens, 0, prices),
        "est_cost_max_usd": cost(tokens, would_send * cfg.max_tokens, prices),  # every answer at --max-tokens
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
        if key in ("dry_run", "first_request") or value is None:
            continue
        if key in ("cost_usd", "est_cost_in_usd", "live_cost_usd", "max_cost_usd", "est_cost_max_usd"):
            value = f"${value:.6f}" if value < 0.01 else f"${value:.2f}"
        table.add_row(key.replace("_", " "), str(value))
    Console(stderr=True).print(table)
    if result.get("first_request"):  # --dry-run: one request as the teacher would get it, its context apart
        import json
        import sys

        print("first request (context: only the teacher sees it; messages: the student's view too):", file=sys.stderr)
        print(json.dumps(result["first_request"], ensure_ascii=False, indent=2), file=sys.stderr)
