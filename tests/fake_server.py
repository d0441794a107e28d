"""A loopback HTTP server speaking the OpenAI chat-completions and Anthropic messages wire formats.

The real openai/anthropic SDK clients talk to it over real HTTP, so the whole path (SDK, connection pool, our retry
loop) is exercised. Faults are injectable:

    server = FakeServer(latency=0.01).start()        # runs in a thread with its own event loop
    server.enqueue("429", "500", "hang", "malformed") # the next requests get these faults, in order
    server.fail_when["POISON"] = "500"              # any request whose text contains POISON gets a 500, always
    server.enqueue("500", "500", kind="anthropic")   # faults for the next requests of one wire format only
    server.history                                  # one dict per request: path, body, status, fault
    server.batch                                    # the batch APIs' state and counters (tests/fake_batch.py)
    server.stop()

Random faults for throughput runs: `rate_429=0.1` answers 10 % of requests with 429 + `Retry-After: retry_after`.
Run standalone (in its own process, so it does not share the client's GIL) with
`python tests/fake_server.py --latency 0.1 --rate-429 0.1`; it prints `PORT <n>` and serves `GET /_stats`.

Answers are deterministic: "Answer to: <last user text>" (+ " [sample i]" for choice i > 0 unless temperature is 0),
cut to `max_tokens` words with finish_reason "length". A request containing "numbered list" (the self-instruct
template) gets a numbered list of new, distinct tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fake_batch import BatchBackend

BATCH_ROUTES = ("/v1/files", "/v1/batches", "/v1/messages/batches")


def parse_qs(qs: str) -> dict[str, str]:
    return dict(parse_qsl(qs))

WORDS = (
    "river planet recipe budget poem circuit garden ladder violin glacier market comet lantern tunnel orchard "
    "compass harbor puzzle canyon meadow engine museum forest bridge desert island castle rocket spider mirror "
    "window kettle dragon pencil carpet signal meteor saddle harvest galaxy pepper marble thunder cactus anchor"
).split()
VERBS = "Explain Describe Compare Summarize Invent Plan Critique Outline Design Teach".split()


class FakeServer:
    def __init__(
        self,
        latency: float = 0.0,
        *,
        rate_429: float = 0.0,
        rate_500: float = 0.0,
        retry_after: float | None = 0.01,
        hang_s: float = 30.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        responder: Callable[[dict, str], str] | None = None,
    ):
        self.latency = latency
        self.rate_429 = rate_429
        self.rate_500 = rate_500
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.host, self.port = host, port
        self.responder = responder or default_answer
        self.faults: collections.deque[str] = collections.deque()
        self.kind_faults: dict[str, collections.deque[str]] = {}  # "openai" / "anthropic" -> faults for that format
        self.fail_when: dict[str, str] = {}
        self.extra_input_tokens = 0  # added to every reported input usage: a tokenizer that counts more than chars/4
        self.batch = BatchBackend(self)  # the batch APIs (tests/fake_batch.py)
        self.batch_faults: dict[str, list] = {}  # needle -> [fault, times] for batch rows (see fake_batch)
        self.batch_invalid: str | None = None  # OpenAI batches fail validation with this message
        self.on_batch_event: Callable[[str, Any], None] | None = None
        self.history: list[dict] = []
        self._rng = random.Random(seed)
        self._tasks_written = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # --- control -----------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def enqueue(self, *faults: str, kind: str | None = None) -> None:
        """Faults for the next requests, in order: '429' (with Retry-After), any other status ('500', '401'),
        'hang' (answer after hang_s), 'malformed' (truncated JSON), 'drop' (close the socket).
        kind: only for requests of that wire format ("openai" or "anthropic"), taken before the shared ones."""
        if kind is None:
            self.faults.extend(faults)
        else:
            self.kind_faults.setdefault(kind, collections.deque()).extend(faults)

    def count(self, path: str | None = None, status: int | None = None) -> int:
        return sum(
            1 for h in self.history if (path is None or h["path"] == path) and (status is None or h["status"] == status)
        )

    def sent_texts(self, status: int | None = 200) -> list[str]:
        """The last user text of every request (answered with `status`), for resume checks."""
        return [last_user(h["body"]) for h in self.history if status is None or h["status"] == status]

    def start(self) -> FakeServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- HTTP -------------------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                route, _, qs = path.partition("?")
                if route.startswith(BATCH_ROUTES):
                    status, extra, payload = await self.batch.respond(method, route, parse_qs(qs), body, headers)
                else:
                    status, extra, payload = await self._respond(method, route, body)
                if status is None:  # 'drop': close without answering
                    break
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                head_out = f"HTTP/1.1 {status} {REASONS.get(status, 'OK')}\r\nContent-Type: application/json\r\n"
                head_out += "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                head_out += f"Content-Length: {len(data)}\r\n\r\n"
                writer.write(head_out.encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, ValueError):
            pass
        finally:
            writer.close()

    def _next_fault(self, text: str, kind: str | None = None) -> str | None:
        with self._lock:
            if self.kind_faults.get(kind):
                return self.kind_faults[kind].popleft()
            if self.faults:
                return self.faults.popleft()
            for needle, fault in self.fail_when.items():
                if needle in text:
                    return fault
            r = self._rng.random()
        if r < self.rate_429:
            return "429"
        if r < self.rate_429 + self.rate_500:
            return "500"
        return None

    async def _respond(self, method: str, path: str, raw: bytes) -> tuple[int | None, dict, Any]:
        if method == "GET" and path == "/_stats":
            by_status = collections.Counter(h["status"] for h in self.history)
            return 200, {}, {
                "requests": len(self.history),
                "by_status": dict(by_status),
                "batch_requests": self.batch.batch_requests,
                "batches": len(self.batch.batches),
            }
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return 400, {}, {"error": {"message": "bad json"}}
        kind = {"/v1/chat/completions": "openai", "/chat/completions": "openai", "/v1/messages": "anthropic"}.get(path)
        if kind is None:
            return 404, {}, {"error": {"message": f"no route {path}"}}
        fault = self._next_fault(json.dumps(body.get("messages", "")), kind)
        entry = {"path": path, "kind": kind, "body": body, "fault": fault, "status": 200, "t": time.time()}
        self.history.append(entry)
        if fault == "429":
            entry["status"] = 429
            extra = {"retry-after": f"{self.retry_after:g}"} if self.retry_after is not None else {}
            return 429, extra, error_body(kind, "rate_limit_error", "slow down")
        if fault is not None and fault.isdigit():  # any other status: '500', '401', '400', ...
            entry["status"] = int(fault)
            return int(fault), {}, error_body(kind, "api_error", f"fake error {fault}")
        if fault == "drop":
            entry["status"] = None
            return None, {}, b""
        if fault == "hang":
            entry["status"] = None
            await asyncio.sleep(self.hang_s)
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault == "malformed":
            return 200, {}, b'{"id": "x", "choices": [ {"message": '
        return 200, {}, (openai_reply if kind == "openai" else anthropic_reply)(self, body)

    def self_instruct_tasks(self, k: int) -> list[str]:
        out = []
        for _ in range(k):
            i = self._tasks_written
            self._tasks_written += 1
            a, b = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
            out.append(f"{VERBS[(i // len(WORDS)) % len(VERBS)]} the link between a {a} and a {b} (variant {i}).")
        return out


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


def error_body(kind: str, etype: str, message: str) -> dict:
    if kind == "anthropic":
        return {"type": "error", "error": {"type": etype, "message": message}}
    return {"error": {"type": etype, "message": message, "code": None, "param": None}}


def text_of(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(c.get("text", "") for c in content if isinstance(c, dict))
    return str(content)


def last_user(body: dict) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return text_of(users[-1]["content"]) if users else ""


def default_answer(body: dict, server: FakeServer) -> str:
    text = last_user(body)
    if "numbered list" in text:
        return "\n".join(f"{i + 1}. {t}" for i, t in enumerate(server.self_instruct_tasks(5)))
    return f"Answer to: {text}"


def _words_in(body: dict) -> int:
    n = len(text_of(body.get("system", "")).split())
    return n + sum(len(text_of(m.get("content", "")).split()) for m in body.get("messages", []))


def _cut(text: str, max_tokens: int | None) -> tuple[str, bool]:
    words = text.split(" ")
    if max_tokens is not None and len(words) > max_tokens:
        return " ".join(words[:max_tokens]), True
    return text, False


def openai_reply(server: FakeServer, body: dict) -> dict:
    base = server.responder(body, server)
    n = int(body.get("n") or 1)
    greedy = body.get("temperature") == 0
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    choices, out_tokens = [], 0
    for i in range(n):
        text, cut = _cut(base if (i == 0 or greedy) else f"{base} [sample {i}]", max_tokens)
        words = text.split(" ")
        out_tokens += len(words)
        choice: dict = {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length" if cut else "stop",
            "logprobs": None,
        }
        if body.get("logprobs"):
            k = int(body.get("top_logprobs") or 0)
            content = []
            for j, w in enumerate(words):  # one token per word, the space in front of it included (as GPT's)
                w = w if j == 0 else " " + w
                lp = -0.1 * (j % 5)
                tops = [{"token": w, "logprob": lp, "bytes": list(w.encode())}]
                tops += [{"token": f"{w}~{t}", "logprob": lp - 1 - t, "bytes": list(f"{w}~{t}".encode())}
                         for t in range(1, k)]
                content.append({"token": w, "logprob": lp, "bytes": list(w.encode()), "top_logprobs": tops[:k]})
            choice["logprobs"] = {"content": content, "refusal": None}
        choices.append(choice)
    prompt_tokens = _words_in(body) + server.extra_input_tokens
    return {
        "id": f"chatcmpl-{len(server.history)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": out_tokens,
            "total_tokens": prompt_tokens + out_tokens,
        },
    }


def anthropic_reply(server: FakeServer, body: dict) -> dict:
    text, cut = _cut(server.responder(body, server), body.get("max_tokens"))
    return {
        "id": f"msg_{len(server.history)}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fake"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "max_tokens" if cut else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": _words_in(body) + server.extra_input_tokens, "output_tokens": len(text.split(" "))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Fake OpenAI/Anthropic server for tests and benchmarks.")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--rate-429", type=float, default=0.0)
    ap.add_argument("--rate-500", type=float, default=0.0)
    ap.add_argument("--retry-after", type=float, default=0.01)
    args = ap.parse_args()
    server = FakeServer(
        args.latency, rate_429=args.rate_429, rate_500=args.rate_500, retry_after=args.retry_after, port=args.port
    ).start()
    print(f"PORT {server.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
