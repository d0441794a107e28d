"""OpenAI chat-completions teacher; with a base URL, any OpenAI-compatible server (vLLM, Ollama, llama.cpp, ...).

The SDK clients are built once per run with the SDK's own retries off (see imitate.collect.teachers.http): the collect
engine retries, paces and journals, so it must see every failure.
"""

from __future__ import annotations

from typing import Any

from imitate.collect.limiter import MalformedResponse
from imitate.collect.teachers import Completion, Request
from imitate.collect.teachers.http import SDKTeacher


class OpenAITeacher(SDKTeacher):
    provider = "openai"
    client_cls = "AsyncOpenAI"
    supports_n = True  # several samples of one prompt in one call (`n`)

    def _body(self, request: Request, n: int) -> dict:
        p = request.params
        body: dict[str, Any] = {"model": self.model, "messages": request.messages}
        if n > 1:
            body["n"] = n
        if p.get("temperature") is not None:
            body["temperature"] = p["temperature"]
        if p.get("top_p") is not None:
            body["top_p"] = p["top_p"]
        if p.get("max_tokens") is not None:
            # api.openai.com's newer models only take max_completion_tokens; compatible servers know max_tokens
            body["max_tokens" if self.custom_server else "max_completion_tokens"] = p["max_tokens"]
        if p.get("logprobs"):
            body["logprobs"] = True
            body["top_logprobs"] = int(p["logprobs"])
        return body

    async def complete(self, requests: list[Request]) -> list[Completion]:
        """One call per prompt: samples of the same prompt (same messages and params) share a call with `n`."""
        first = requests[0]
        if len(requests) > 1 and any(r.messages != first.messages or r.params != first.params for r in requests):
            out: list[Completion] = []
            for r in requests:
                out += await self.complete([r])
            return out
        # The SDK's low-level post (auth, base URL, timeouts, typed errors) with the JSON answer as a dict: the typed
        # create() spends more CPU on request transforms and pydantic models than on HTTP (see the benchmark).
        resp = await self.client.post("/chat/completions", body=self._body(first, len(requests)), cast_to=object)
        try:
            choices = sorted(resp["choices"], key=lambda c: c.get("index", 0))
            if len(choices) < len(requests):
                raise ValueError(f"asked for {len(requests)} choices, got {len(choices)}")
            usage = resp.get("usage") or {}
            tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
            n = len(requests)
            return [self._completion(c, i, n, tokens_in, tokens_out) for i, c in enumerate(choices[:n])]
        except (ValueError, AttributeError, TypeError, IndexError, KeyError) as exc:  # not the chat-completions shape
            raise MalformedResponse(f"unreadable response from the server: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _completion(choice: dict, i: int, n: int, tokens_in: int | None, tokens_out: int | None) -> Completion:
        text = choice["message"].get("content") or ""
        logprobs = None
        content = (choice.get("logprobs") or {}).get("content")
        if content is not None:
            logprobs = [
                {
                    "token": t["token"],
                    "id": t.get("id"),
                    "logprob": t["logprob"],
                    "top": [
                        {"token": a["token"], "id": a.get("id"), "logprob": a["logprob"]}
                        for a in t.get("top_logprobs") or []
                    ],
                }
                for t in content
            ]
        out = tokens_out
        if n > 1:  # the API reports one total for all choices; a choice's own count is its logprobs length if known
            out = len(logprobs) if logprobs is not None else None
        return Completion(
            text=text,
            finish_reason=choice.get("finish_reason") or "unknown",
            input_tokens=tokens_in,
            output_tokens=out,
            logprobs=logprobs,
            # what the call cost, counted once per call (on its first choice) for the run's accounting
            extra={"billed": (tokens_in or 0, tokens_out or 0) if i == 0 else (0, 0)},
        )
