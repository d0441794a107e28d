"""OpenAI chat-completions teacher; with a base URL, any OpenAI-compatible server (vLLM, Ollama, llama.cpp, ...).

The SDK clients are built once per run with the SDK's own retries off (see imitate.collect.teachers.http): the collect
engine retries, paces and journals, so it must see every failure.
"""

from __future__ import annotations

import json
from typing import Any

from imitate.collect.limiter import MalformedResponse
from imitate.collect.teachers import CLOCK_SKEW_S, BatchResult, BatchStatus, Completion, Request
from imitate.collect.teachers.http import SDKTeacher

ENDED = {"completed", "failed", "expired", "cancelled"}  # batch statuses after which nothing more will run
RETRYABLE_CODES = {"batch_expired", "batch_cancelled", "batch_canceled"}  # rows not run: worth another batch


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
                    # the token's UTF-8 bytes: a token string cannot hold part of a character (emoji, CJK), bytes
                    # can; cross-tokenizer KD aligns by them (imitate/train/xtok.py)
                    "bytes": t.get("bytes"),
                    "top": [
                        {"token": a["token"], "id": a.get("id"), "logprob": a["logprob"], "bytes": a.get("bytes")}
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


class OpenAIBatches:
    """The Batch API for an OpenAITeacher's requests: one JSONL file uploaded (Files API), one `/v1/batches` job over
    it, results downloaded from the output and error files. Any server that implements Files + Batches works through
    --base-url. The batch is tagged with metadata {"imitate_key": key} so a run that crashed before it could journal
    the batch id finds it again by listing batches."""

    max_requests = 50_000  # OpenAI's limits per batch
    max_bytes = 200 * 2**20

    def __init__(self, teacher: OpenAITeacher):
        self.teacher, self.client = teacher, teacher.client

    def line(self, request: Request) -> bytes:
        body = self.teacher._body(request, 1)
        return json.dumps(
            {"custom_id": request.id, "method": "POST", "url": "/v1/chat/completions", "body": body},
            ensure_ascii=False,
        ).encode("utf-8")

    async def create(self, lines: list[bytes], key: str) -> str:
        data = b"\n".join(lines) + b"\n"
        uploaded = await self.client.files.create(file=("imitate-batch.jsonl", data), purpose="batch")
        batch = await self.client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"imitate_key": key},
        )
        return batch.id

    async def find(self, key: str, since: float, size: int, known: set[str]) -> str | None:
        """The id of the batch tagged `key`, created at or after `since` (epoch seconds), or None."""
        async for batch in self.client.batches.list(limit=100):
            if (batch.metadata or {}).get("imitate_key") == key:
                return batch.id
            if batch.created_at < since - CLOCK_SKEW_S:  # newest first: older batches cannot be this one
                return None
        return None

    async def status(self, batch_id: str) -> BatchStatus:
        b = await self.client.batches.retrieve(batch_id)
        c = b.request_counts
        counts = {"done": c.completed, "failed": c.failed, "total": c.total} if c else {}
        errors = "; ".join(e.message or e.code or "" for e in (b.errors.data or [])) if b.errors else ""
        return BatchStatus(b.status, b.status in ENDED, counts, errors or None)

    async def results(self, batch_id: str) -> list[BatchResult]:
        b = await self.client.batches.retrieve(batch_id)
        out: list[BatchResult] = []
        for file_id in (b.output_file_id, b.error_file_id):
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for raw in content.content.splitlines():
                if raw.strip():
                    out.append(self._result(json.loads(raw)))
        return out

    def _result(self, row: dict) -> BatchResult:
        cid, resp, err = row.get("custom_id"), row.get("response") or {}, row.get("error")
        status = resp.get("status_code")
        if status == 200:
            try:
                body = resp["body"]
                usage = body.get("usage") or {}
                comp = self.teacher._completion(
                    body["choices"][0], 0, 1, usage.get("prompt_tokens"), usage.get("completion_tokens")
                )
                return BatchResult(cid, comp)
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                return BatchResult(cid, None, f"unreadable batch result: {type(exc).__name__}: {exc}", True)
        if err:  # not run: expired / cancelled / failed validation
            code = str(err.get("code") or "error")
            return BatchResult(cid, None, f"{code}: {err.get('message', '')}", code in RETRYABLE_CODES)
        error = ((resp.get("body") or {}).get("error") or {}).get("message", "")
        return BatchResult(cid, None, f"HTTP {status}: {error}", status is None or status == 429 or status >= 500)

    async def cancel(self, batch_id: str) -> None:
        await self.client.batches.cancel(batch_id)
