"""Teachers: one small class per provider with one async batch method, chosen by `provider:model`.

    openai:MODEL      openai SDK; with --base-url / OPENAI_BASE_URL any OpenAI-compatible server (vLLM, Ollama, llama.cpp)
    anthropic:MODEL   anthropic SDK
    hf:PATH_OR_ID     a local transformers model (batched generation, the model's chat template)

A teacher takes `Request`s and returns one `Completion` per request, in order. API teachers may raise the SDK's
errors; the collect engine decides what is retried. Teachers accept an injected client for tests.

The API teachers also have a batch side (`OpenAIBatches`, `AnthropicBatches`, used by imitate.collect.batch): the
same requests as JSON lines, created as one provider batch, polled, and read back as `BatchResult`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

PROVIDERS = ("openai", "anthropic", "hf")


@dataclass(frozen=True)
class Request:
    id: str
    messages: list[dict]  # what the teacher is sent: the context turns (if any), then the student's messages
    params: dict  # temperature, max_tokens, top_p, logprobs (top-K) ... as given by the user
    sample: int = 0
    context_turns: int = 0  # the first this many of `messages` are the record's `context` (--context)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | provider-specific
    input_tokens: int | None = None
    output_tokens: int | None = None
    logprobs: list[dict] | None = None  # see imitate.records LOGPROBS
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchStatus:
    """Where a provider batch stands: the provider's own status word, whether it has ended, and its counts."""

    status: str
    ended: bool
    counts: dict[str, int]
    error: str | None = None  # why the whole batch failed (e.g. OpenAI's input validation), if it did


@dataclass
class BatchResult:
    """One row of a finished batch: a completion, or the error and whether another batch may succeed."""

    id: str
    completion: Completion | None
    error: str | None = None
    retryable: bool = False


# Batches found again by listing must have been created after their journal entry; allow for the server's clock.
CLOCK_SKEW_S = 300.0


class Teacher(Protocol):
    spec: str  # "provider:model"
    batch_size: int  # how many requests one complete() call takes well (1 for API teachers)

    async def complete(self, requests: list[Request]) -> list[Completion]: ...

    async def aclose(self) -> None: ...


def parse_spec(spec: str) -> tuple[str, str]:
    """'openai:gpt-4o-mini' -> ('openai', 'gpt-4o-mini'); errors list the valid providers."""
    from imitate.errors import UsageError

    provider, sep, model = spec.partition(":")
    if not sep or not model:
        raise UsageError(
            f"teacher {spec!r} is not of the form provider:model",
            hint="e.g. --teacher openai:gpt-4o-mini, anthropic:claude-sonnet-4-5 or hf:./path/to/model; "
            f"providers: {', '.join(PROVIDERS)}",
        )
    if provider not in PROVIDERS:
        raise UsageError(
            f"unknown teacher provider {provider!r} in {spec!r}",
            hint=f"valid providers: {', '.join(PROVIDERS)} (any OpenAI-compatible server: openai:MODEL --base-url URL)",
        )
    return provider, model
