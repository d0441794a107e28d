"""Anthropic messages teacher. The SDK's own retries are off: the collect engine retries, paces and journals."""

from __future__ import annotations

import asyncio
from typing import Any

from imitate.collect.limiter import MalformedResponse
from imitate.collect.teachers import Completion, Request
from imitate.collect.teachers.http import SDKTeacher

# Anthropic stop reasons in the record's vocabulary ("stop" | "length" | provider-specific)
STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}
DEFAULT_MAX_TOKENS = 1024  # the messages API requires max_tokens


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
