"""Estimated cost of a run from token counts and per-million-token prices.

Prices come from --price-in/--price-out (USD per million tokens) or, for a few well-known models, from the table
below (list prices at the time of writing; they change, so pass the flags when the number matters). Local (hf:)
teachers cost nothing here. Unknown models give no estimate rather than a wrong one.
"""

from __future__ import annotations

# provider:model prefix -> (input, output) USD per million tokens. The longest matching prefix wins.
PRICES: dict[str, tuple[float, float]] = {
    "openai:gpt-4o-mini": (0.15, 0.60),
    "openai:gpt-4o": (2.50, 10.00),
    "openai:gpt-4.1-nano": (0.10, 0.40),
    "openai:gpt-4.1-mini": (0.40, 1.60),
    "openai:gpt-4.1": (2.00, 8.00),
    "openai:gpt-5-nano": (0.05, 0.40),
    "openai:gpt-5-mini": (0.25, 2.00),
    "openai:gpt-5": (1.25, 10.00),
    "anthropic:claude-3-5-haiku": (0.80, 4.00),
    "anthropic:claude-haiku-4-5": (1.00, 5.00),
    "anthropic:claude-sonnet-4": (3.00, 15.00),
    "anthropic:claude-opus-4": (15.00, 75.00),
}

BATCH_FACTOR = {"openai": 0.5, "anthropic": 0.5}  # batch price / live price


def prices_for(
    teacher: str, price_in: float | None = None, price_out: float | None = None, batch: bool = False
) -> tuple[float, float] | None:
    """(input, output) USD per million tokens for `teacher`, or None when unknown. Flags override the table.
    batch: the provider's batch price (BATCH_FACTOR of the live one)."""
    live = _live_prices(teacher, price_in, price_out)
    if live is None or not batch:
        return live
    factor = BATCH_FACTOR.get(teacher.partition(":")[0], 1.0)
    return (live[0] * factor, live[1] * factor)


def _live_prices(teacher: str, price_in: float | None, price_out: float | None) -> tuple[float, float] | None:
    if teacher.startswith("hf:"):
        known: tuple[float, float] | None = (0.0, 0.0)
    else:
        matches = [k for k in PRICES if teacher.startswith(k)]
        known = PRICES[max(matches, key=len)] if matches else None
    if price_in is None and price_out is None:
        return known
    base = known or (0.0, 0.0)
    return (base[0] if price_in is None else price_in, base[1] if price_out is None else price_out)


def cost(tokens_in: int, tokens_out: int, prices: tuple[float, float] | None) -> float | None:
    if prices is None:
        return None
    return round(tokens_in * prices[0] / 1e6 + tokens_out * prices[1] / 1e6, 9)
