"""Anthropic messages teacher. The SDK's own retries are off: the collect engine retries, paces and journals."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from imitate.collect.limiter import MalformedResponse
from imitate.collect.teachers import CLOCK_SKEW_S, BatchResult, BatchStatus, Completion, Request
from imitate.collect.teachers.http import SDKTeacher

# Anthropic stop reasons in the record's vocabulary ("stop" | "length" | provider-specific)
STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}
DEFAULT_MAX_TOKENS = 1024  # the messages API requires max_tokens
RETRYABLE_ERRORS = {"api_error", "overloaded_error", "rate_limit_error", "timeout_error"}  # errored rows worth a retry


class AnthropicTeacher(SDKTeacher):
    provider = "anthropic"
    client_cls = "AsyncAnthropic"

    def _body(self, request: Request) -> dict:
        p = request.params
        system = "\n\n".join(m["content"] for m in request.messages if m["role"] == "system")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [m for m in request.messages if m["role"] != "system"],
            "max_tokens": p.get("max_tokens") or DEFAULT_MAX_TOKENS,
        }
        if system:
            body["system"] = system
        if p.get("temperature") is not None:
            body["temperature"] = p["temperature"]
        if p.get("top_p") is not None:
            body["top_p"] = p["top_p"]
        return body

    async def _one(self, request: Request) -> Completion:
        # The SDK's low-level post (auth, version header, timeouts, typed errors) returning the JSON as a dict:
        # cheaper than the typed create(), and free of its refusal of large non-streaming max_tokens.
        resp = await self.client.post("/v1/messages", body=self._body(request), cast_to=object)
        return self.parse(resp)

    @staticmethod
    def parse(resp: Any) -> Completion:
        """A messages-API answer (a dict) as a Completion."""
        try:
            text = "".join(b["text"] for b in resp["content"] if b.get("type") == "text")
            usage = resp.get("usage") or {}
            stop = resp.get("stop_reason")
            return Completion(
                text=text,
                finish_reason=STOP.get(stop, stop or "unknown"),
                input_tokens=usage.get("input_tokens"),
                output_tokens=usage.get("output_tokens"),
            )
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            raise MalformedResponse(f"unreadable response from the server: {type(exc).__name__}: {exc}") from None

    async def complete(self, requests: list[Request]) -> list[Completion]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))


class AnthropicBatches:
    """Message Batches (`/v1/messages/batches`) for an AnthropicTeacher's requests: the requests go inline in the
    create call; results come back as JSONL once the batch has ended.

    Anthropic batches carry no metadata, so a batch created by a run that crashed before journaling its id is found
    by listing: created after the journal entry (minus clock skew), holding as many requests as the entry, and not
    already claimed by another entry. Its results are then matched by custom_id (our request ids), so a foreign
    batch that happened to match would contribute nothing."""

    max_requests = 100_000  # Anthropic's limits per batch
    max_bytes = 256 * 10**6

    def __init__(self, teacher: AnthropicTeacher):
        self.teacher, self.client = teacher, teacher.client

    def line(self, request: Request) -> bytes:
        return json.dumps({"custom_id": request.id, "params": self.teacher._body(request)}, ensure_ascii=False).encode()

    async def create(self, lines: list[bytes], key: str) -> str:
        batch = await self.client.messages.batches.create(requests=[json.loads(ln) for ln in lines])
        return batch.id

    async def find(self, key: str, since: float, size: int, known: set[str]) -> str | None:
        async for batch in self.client.messages.batches.list(limit=100):
            created = batch.created_at.timestamp()
            if created < since - CLOCK_SKEW_S:  # newest first
                return None
            c = batch.request_counts
            total = c.processing + c.succeeded + c.errored + c.canceled + c.expired
            if batch.id not in known and total == size:
                return batch.id
        return None

    async def status(self, batch_id: str) -> BatchStatus:
        b = await self.client.messages.batches.retrieve(batch_id)
        c = b.request_counts
        counts = {"done": c.succeeded, "failed": c.errored + c.canceled + c.expired, "processing": c.processing}
        return BatchStatus(b.processing_status, b.processing_status == "ended", counts)

    async def results(self, batch_id: str) -> list[BatchResult]:
        out: list[BatchResult] = []
        async for row in await self.client.messages.batches.results(batch_id):
            r = row.result
            if r.type == "succeeded":
                out.append(BatchResult(row.custom_id, AnthropicTeacher.parse(r.message.to_dict())))
            elif r.type == "errored":
                err = r.error.error
                out.append(BatchResult(row.custom_id, None, f"{err.type}: {err.message}", err.type in RETRYABLE_ERRORS))
            else:  # expired / canceled: never ran
                out.append(BatchResult(row.custom_id, None, f"batch row {r.type}", True))
        return out

    async def cancel(self, batch_id: str) -> None:
        await self.client.messages.batches.cancel(batch_id)
