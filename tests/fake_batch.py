"""The batch half of the loopback fake server: OpenAI Files + Batches and Anthropic Message Batches wire formats.

FakeServer routes these paths here, so the real SDK clients talk to it over real HTTP:

    OpenAI     POST /v1/files (multipart upload)            GET /v1/files/{id}/content
               POST /v1/batches   GET /v1/batches/{id}      GET /v1/batches (cursor pages)   POST /v1/batches/{id}/cancel
    Anthropic  POST /v1/messages/batches   GET /v1/messages/batches/{id}   GET /v1/messages/batches (pages)
               POST /v1/messages/batches/{id}/cancel        GET /v1/messages/batches/{id}/results (JSONL)

Each retrieve advances a batch one status (openai: validating -> in_progress -> finalizing -> completed; anthropic:
in_progress -> in_progress -> ended), so clients must poll. Answers are the live server's (`openai_reply`,
`anthropic_reply`). Row faults: `server.batch_faults[needle] = [fault, times]` — a request whose text holds `needle`
ends as `fault` ("500" or any status: an errored row; "expired": an expired row) for the next `times` batches that
hold it (None: always). `server.on_batch_event(event, info)` is called before answering "upload", "create",
"retrieve", "results" and "list" — tests kill the client there to crash it at an exact moment; a hook that returns
"drop" on "upload" makes the server close the connection without storing anything (an upload cut off); one that
returns a status ("500") on "retrieve" fails that poll, on "create" fails the answer to a batch it did create.

`server.batch_invalid = "message"` makes OpenAI batches end "failed" (input validation) with that error and no files.

Counters: `batch_requests` (request lines in all created batches, per provider), `batches` (id -> batch state).
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime, timezone
from typing import Any

OPENAI_STEPS = ["validating", "in_progress", "finalizing", "completed"]
ANTHROPIC_STEPS = ["in_progress", "in_progress", "ended"]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_multipart(raw: bytes, content_type: str) -> dict[str, bytes]:
    """name -> value of a multipart/form-data body."""
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    fields = {}
    for part in raw.split(b"--" + boundary):
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        name = head.split(b'name="', 1)[1].split(b'"', 1)[0].decode()
        fields[name] = value.removesuffix(b"\r\n")
    return fields


class BatchBackend:
    def __init__(self, server: Any):
        self.server = server
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_requests = {"openai": 0, "anthropic": 0}
        self._ids = itertools.count(1)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    def event(self, name: str, info: Any = None) -> Any:
        hook = getattr(self.server, "on_batch_event", None)
        return hook(name, info) if hook is not None else None

    # --- routing ------------------------------------------------------------------------------------------------
    async def respond(self, method: str, path: str, query: dict, raw: bytes, headers: dict) -> tuple[int, dict, Any]:
        parts = path.strip("/").split("/")  # v1 files ... | v1 batches ... | v1 messages batches ...
        if parts[1] == "files":
            if method == "POST" and len(parts) == 2:
                return self.upload(raw, headers.get("content-type", ""))
            if method == "GET" and len(parts) == 4 and parts[3] == "content" and parts[2] in self.files:
                self.event("results", parts[2])
                return 200, {}, self.files[parts[2]]
        elif parts[1] == "batches":
            return self.route("openai", method, parts[2:], query, raw)
        elif parts[1:3] == ["messages", "batches"]:
            return self.route("anthropic", method, parts[3:], query, raw)
        return 404, {}, {"error": {"type": "not_found_error", "message": f"no route {method} {path}"}}

    def route(self, kind: str, method: str, rest: list[str], query: dict, raw: bytes) -> tuple[int, dict, Any]:
        if not rest:
            if method == "POST":
                return self.create(kind, json.loads(raw or b"{}"))
            self.event("list", kind)
            return 200, {}, self.list(kind, query)
        b = self.batches.get(rest[0])
        if b is None or b["kind"] != kind:
            return 404, {}, {"error": {"type": "not_found_error", "message": f"no batch {rest[0]}"}}
        if len(rest) == 1 and method == "GET":
            fault = self.event("retrieve", b["id"])
            if fault is not None and fault.isdigit():  # a failed poll: the batch does not move
                return int(fault), {}, {"error": {"type": "api_error", "message": f"fake poll error {fault}"}}
            self.advance(b)
            return 200, {}, self.view(b)
        if len(rest) == 2 and rest[1] == "cancel" and method == "POST":
            if not b["ended"]:
                b["cancelled"] = True
            return 200, {}, self.view(b)
        if len(rest) == 2 and rest[1] == "results" and method == "GET" and b["ended"]:
            self.event("results", b["id"])
            return 200, {}, "".join(json.dumps(r) + "\n" for r in b["results"]).encode()
        return 404, {}, {"error": {"type": "not_found_error", "message": "no such route"}}

    # --- OpenAI files ---------------------------------------------------------------------------------------------
    def upload(self, raw: bytes, content_type: str) -> tuple[int, dict, Any]:
        fields = parse_multipart(raw, content_type)
        fid = self.new_id("file-")
        if self.event("upload", fid) == "drop":  # the upload broke off: nothing stored
            return None, {}, b""
        self.files[fid] = fields["file"]
        body = {
            "id": fid,
            "object": "file",
            "bytes": len(fields["file"]),
            "created_at": int(time.time()),
            "filename": "batch.jsonl",
            "purpose": fields.get("purpose", b"batch").decode(),
            "status": "processed",
        }
        return 200, {}, body

    # --- batches ------------------------------------------------------------------------------------------------
    def create(self, kind: str, body: dict) -> tuple[int, dict, Any]:
        if kind == "openai":
            data = self.files.get(body.get("input_file_id", ""))
            if data is None:
                return 400, {}, {"error": {"type": "invalid_request_error", "message": "no such input file"}}
            lines = [json.loads(ln) for ln in data.decode().splitlines() if ln.strip()]
            requests = [(ln["custom_id"], ln["body"]) for ln in lines]
        else:
            if self.event("upload", None) == "drop":  # anthropic sends the requests inline: this is its upload
                return None, {}, b""
            requests = [(r["custom_id"], r["params"]) for r in body["requests"]]
        bid = self.new_id("batch_" if kind == "openai" else "msgbatch_")
        b = {
            "id": bid,
            "kind": kind,
            "requests": requests,
            "metadata": body.get("metadata"),
            "input_file_id": body.get("input_file_id"),
            "created": time.time(),
            "step": 0,
            "ended": False,
            "cancelled": False,
            "results": [],
            "counts": {},
        }
        self.batches[bid] = b  # created (and paid) even if the client never hears back
        self.batch_requests[kind] += len(requests)
        fault = self.event("create", bid)
        if fault is not None and fault.isdigit():  # created, but the client is told it failed (e.g. a gateway 502)
            return int(fault), {}, {"error": {"type": "api_error", "message": f"fake create error {fault}"}}
        return 200, {}, self.view(b)

    def advance(self, b: dict) -> None:
        if b["ended"]:
            return
        steps = OPENAI_STEPS if b["kind"] == "openai" else ANTHROPIC_STEPS
        b["step"] += 1
        if b["cancelled"] or b["step"] >= len(steps) - 1:
            self.finish(b)

    def fault_of(self, body: dict) -> tuple[str | None, str | None]:
        """(fault, the needle that chose it) for one request body."""
        from fake_server import last_user

        text = last_user(body)
        for needle, slot in self.server.batch_faults.items():
            if needle in text and (slot[1] is None or slot[1] > 0):
                return slot[0], needle
        return None, None

    def finish(self, b: dict) -> None:
        from fake_server import anthropic_reply, openai_reply

        counts = {"succeeded": 0, "errored": 0, "expired": 0, "canceled": 0}
        if b["kind"] == "openai" and self.server.batch_invalid:  # the whole batch fails validation: no files
            b["ended"], b["counts"], b["ended_at"], b["invalid"] = True, counts, time.time(), self.server.batch_invalid
            return
        used: set[str] = set()
        out, err = [], []
        for cid, body in b["requests"]:
            fault, needle = ("canceled", None) if b["cancelled"] else self.fault_of(body)
            if needle is not None:
                used.add(needle)
            if b["kind"] == "openai":
                row: dict[str, Any] = {"id": self.new_id("batch_req_"), "custom_id": cid, "response": None, "error": None}
                if fault is None:
                    row["response"] = {"status_code": 200, "request_id": cid, "body": openai_reply(self.server, body)}
                    out.append(row)
                elif fault in ("expired", "canceled"):
                    code = {"expired": "batch_expired", "canceled": "batch_cancelled"}[fault]
                    row["error"] = {"code": code, "message": f"request {fault} before it ran"}
                    err.append(row)
                else:
                    error = {"type": "server_error", "message": f"fake batch error {fault}", "code": None}
                    row["response"] = {"status_code": int(fault), "request_id": cid, "body": {"error": error}}
                    err.append(row)
            else:
                if fault is None:
                    result: dict = {"type": "succeeded", "message": anthropic_reply(self.server, body)}
                elif fault in ("expired", "canceled"):
                    result = {"type": fault}
                else:
                    etype = "invalid_request_error" if fault.startswith("4") else "api_error"
                    result = {"type": "errored", "error": {"type": "error", "error": {"type": etype, "message": "x"}}}
                out.append({"custom_id": cid, "result": result})
            counts[{None: "succeeded", "expired": "expired", "canceled": "canceled"}.get(fault, "errored")] += 1
        for needle in used:  # a limited fault is spent once per batch that met it
            slot = self.server.batch_faults[needle]
            if slot[1] is not None:
                slot[1] -= 1
        b["ended"], b["counts"], b["ended_at"] = True, counts, time.time()
        if b["kind"] == "openai":
            b["output_file_id"] = self.store(out)
            b["error_file_id"] = self.store(err)
        else:
            b["results"] = out

    def store(self, rows: list[dict]) -> str | None:
        if not rows:
            return None
        fid = self.new_id("file-")
        self.files[fid] = "".join(json.dumps(r) + "\n" for r in rows).encode()
        return fid

    def view(self, b: dict) -> dict:
        n, c = len(b["requests"]), b["counts"]
        if b["kind"] == "openai":
            if b.get("invalid"):
                status = "failed"
            elif b["ended"]:
                status = "cancelled" if b["cancelled"] else ("expired" if c["expired"] else "completed")
            else:
                status = "cancelling" if b["cancelled"] else OPENAI_STEPS[b["step"]]
            done = n if b["ended"] else n * b["step"] // len(OPENAI_STEPS)
            return {
                "id": b["id"],
                "object": "batch",
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "created_at": int(b["created"]),
                "input_file_id": b["input_file_id"],
                "status": status,
                "metadata": b["metadata"],
                "errors": {"object": "list", "data": [{"code": "invalid", "message": b["invalid"]}]}
                if b.get("invalid")
                else None,
                "output_file_id": b.get("output_file_id"),
                "error_file_id": b.get("error_file_id"),
                "request_counts": {
                    "total": n,
                    "completed": c.get("succeeded", 0) if b["ended"] else done,
                    "failed": n - c.get("succeeded", 0) if b["ended"] else 0,
                },
            }
        base = f"{self.server.base_url}/v1/messages/batches/{b['id']}"
        ended = b["ended"]
        return {
            "id": b["id"],
            "type": "message_batch",
            "processing_status": "ended" if ended else ("canceling" if b["cancelled"] else "in_progress"),
            "request_counts": {
                "processing": 0 if ended else n,
                "succeeded": c.get("succeeded", 0),
                "errored": c.get("errored", 0),
                "expired": c.get("expired", 0),
                "canceled": c.get("canceled", 0),
            },
            "created_at": iso(b["created"]),
            "expires_at": iso(b["created"] + 86400),
            "ended_at": iso(b["ended_at"]) if ended else None,
            "cancel_initiated_at": None,
            "archived_at": None,
            "results_url": f"{base}/results" if ended else None,
        }

    def list(self, kind: str, query: dict) -> dict:
        """Newest first, 20 a page by default: openai pages with `after`, anthropic with `after_id`."""
        mine = [b for b in sorted(self.batches.values(), key=lambda b: b["id"], reverse=True) if b["kind"] == kind]
        after = query.get("after") or query.get("after_id")
        if after:
            ids = [b["id"] for b in mine]
            mine = mine[ids.index(after) + 1 :] if after in ids else []
        limit = int(query.get("limit") or 20)
        page = [self.view(b) for b in mine[:limit]]
        more = len(mine) > limit
        if kind == "openai":
            return {"object": "list", "data": page, "has_more": more}
        return {
            "data": page,
            "has_more": more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }
