"""`imitate collect --batch`: the same requests through the providers' batch APIs, at half the price, never paid twice.

The batch log, OUT.batches.jsonl beside the records, is the second journal. One fsynced line per event:

    intent   {key, ids, t, teacher, base_url}   BEFORE the batch is created: what it will hold
    created  {key, batch}                       right after the provider answers with the batch id
    done     {key}                              every row of the batch is in OUT, the failures file, or free again
    void     {key}                              the batch was never created; its requests are free again
    cancel   {key}                              --cancel asked the provider to stop it

A request is *held* by an intent that is neither done nor void. A run submits only requests that have no record in
OUT and no holder, so after a crash at any moment a re-run re-attaches instead of paying again:
  - id journaled (crash while polling or downloading): poll it, download its results, skip ids already in OUT;
  - intent without id (crash during upload, or between create and the journal write): look the batch up by the key
    it carries (OpenAI metadata; Anthropic by creation time and size, see AnthropicBatches) — found: re-attach;
    not found: it was never created, so the intent is void and its requests are submitted again.

Results become records as each batch ends. Errored and expired rows are retried in a new batch (up to --retries
rounds), or live with --batch-fallback live; what still fails goes to the failures file with its error.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from imitate.collect.journal import BatchLog, Journal, finished_ids
from imitate.collect.limiter import classify, est_tokens
from imitate.errors import ImitateError, UsageError


def batch_api(teacher: Any) -> Any:
    """The batch side of an API teacher."""
    from imitate.collect.teachers.anthropic import AnthropicBatches, AnthropicTeacher
    from imitate.collect.teachers.openai import OpenAIBatches, OpenAITeacher

    if isinstance(teacher, OpenAITeacher):
        return OpenAIBatches(teacher)
    if isinstance(teacher, AnthropicTeacher):
        return AnthropicBatches(teacher)
    raise ImitateError(f"--batch needs an openai: or anthropic: teacher, not {teacher.spec!r}")


def held_ids(out: Path) -> set[str]:
    """Ids of OUT's requests that open batches hold (a live run must not send them too)."""
    from imitate.collect.stage import sidecar

    path = sidecar(Path(out), "batches")
    return BatchLog(path).held() if path.exists() else set()


def journaled_teacher(out: Path) -> tuple[str | list[str] | None, str | None]:
    """(teacher, base_url) of the last batch logged for OUT, so `--out OUT --cancel` needs nothing else; every
    teacher with open batches when several teachers share OUT."""
    from imitate.collect.stage import sidecar

    log = BatchLog(sidecar(Path(out), "batches"))
    if not log.intents:
        raise UsageError(f"{out}: no batches to cancel ({log.path} does not list any)",
                         hint="give the --out of an `imitate collect --batch` run")
    last = list(log.intents.values())[-1]
    teachers = list(dict.fromkeys(i["teacher"] for i in log.open_intents()))
    return (teachers if len(teachers) > 1 else last["teacher"]), last.get("base_url")


def split(lines: list[tuple[Any, bytes]], max_requests: int, max_bytes: int) -> list[list[tuple[Any, bytes]]]:
    """Consecutive chunks of at most max_requests lines and max_bytes bytes (newlines included)."""
    chunks: list[list[tuple[Any, bytes]]] = []
    size = 0
    for item in lines:
        n = len(item[1]) + 1
        if n > max_bytes:
            raise ImitateError(
                f"one request is {n} bytes, more than the batch limit of {max_bytes} bytes",
                hint="raise --batch-max-bytes, or collect this request live (without --batch)",
            )
        if not chunks or len(chunks[-1]) >= max_requests or size + n > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks


class BatchRun:
    """One `collect --batch` command: re-attach, submit, wait, turn results into records (see the module doc)."""

    def __init__(self, cfg: Any, engine: Any, base_url: str | None, log: BatchLog | None = None):
        from imitate.collect.stage import sidecar

        self.cfg, self.engine, self.base_url = cfg, engine, base_url
        self.api = batch_api(engine.teacher)
        self.log = log or BatchLog(sidecar(engine.out, "batches"))  # one log shared by a run's teachers
        self.stats, self.budget = engine.stats, engine.budget
        self.max_requests = cfg.batch_max_requests or self.api.max_requests
        self.max_bytes = cfg.batch_max_bytes or self.api.max_bytes
        self.jobs: dict[str, Any] = {}  # request id -> Job, for every request this command knows
        self.reserved: dict[str, float] = {}  # intent key -> its worst cost held in the budget
        self.retry: list[Any] = []  # jobs whose rows failed in a way another try may fix
        self.progress = BatchProgress(cfg.progress)

    # --- the run ---------------------------------------------------------------------------------------------------
    async def run(self, jobs: list) -> None:
        self.jobs = {j.request.id: j for j in jobs}
        done = finished_ids(self.engine.out)
        todo = [j for j in jobs if j.request.id not in done]
        self.stats.requests += len(jobs)
        self.stats.cached += len(jobs) - len(todo)
        try:
            await self.attach()
            if self.cfg.cancel:
                await self.cancel()
                return
            held = self.log.held(self.cfg.teacher)
            free = [j for j in todo if j.request.id not in held]
            rounds = 0
            while True:
                await self.submit(free)
                await self.wait()
                retry, self.retry = self.retry, []
                if not retry:
                    break
                if rounds >= self.cfg.retries or not self.cfg.wait:  # listed now; the next run submits them again
                    for job, error in retry:
                        self.engine._fail(job, error, rounds + 1, self.stats)
                    break
                rounds += 1
                self.stats.retries += len(retry)
                free = [job for job, _ in retry]
                if self.cfg.batch_fallback == "live":
                    from imitate.collect.pricing import prices_for

                    planned = self.stats.requests, self.stats.cached  # already counted once
                    self.budget.prices = prices_for(self.cfg.teacher, self.cfg.price_in, self.cfg.price_out) or (0, 0)
                    await self.engine.collect(free, label="live fallback")  # billed at live prices
                    self.stats.requests, self.stats.cached = planned
                    break
        finally:
            self.progress.close()
        self.stats.pending = sum(len(i["ids"]) for i in self.log.open_intents(self.cfg.teacher))

    async def attach(self) -> None:
        """Give every open intent without a batch id its batch (found by its key), or void it."""
        known = {i["batch"] for i in self.log.intents.values() if i["batch"]}
        for intent in self.log.open_intents(self.cfg.teacher):
            if intent["batch"] is None:
                found = await self.call("looking up a batch", self.api.find, intent["key"], intent["t"],
                                        len(intent["ids"]), known)
                if found is None:
                    self.log.write("void", intent["key"])
                    continue
                self.log.write("created", intent["key"], batch=found)
                known.add(found)
            if intent["key"] not in self.reserved:  # sent by an earlier run: billed when it ends, so in flight now
                self.reserved[intent["key"]] = self.worst(intent["ids"])
                self.budget.reserve(self.reserved[intent["key"]], force=True)

    def worst(self, ids: list[str]) -> float:
        reqs = [self.jobs[i].request for i in ids if i in self.jobs]
        return self.budget.worst(sum(est_tokens(r.messages) for r in reqs), self.cfg.max_tokens * len(reqs))

    async def submit(self, jobs: list) -> None:
        """Create batches for `jobs` (split by the limits) while the budget lets each one's worst case fit."""
        chunks = split([(j, self.api.line(j.request)) for j in jobs], self.max_requests, self.max_bytes)
        for i, chunk in enumerate(chunks):
            ids = [j.request.id for j, _ in chunk]
            worst = self.worst(ids)
            if not self.budget.reserve(worst):
                self.stats.unsent += sum(len(c) for c in chunks[i:])
                return
            key = uuid.uuid4().hex
            self.log.write("intent", key, ids=ids, t=time.time(), teacher=self.cfg.teacher, base_url=self.base_url)
            self.reserved[key] = worst
            batch_id = await self.create(key, [ln for _, ln in chunk])
            self.log.write("created", key, batch=batch_id)
            self.stats.batches += 1
            self.stats.sent += len(ids)
            self.stats.calls += 1

    async def create(self, key: str, lines: list[bytes]) -> str:
        """Create the batch of intent `key`. After an error the batch may exist all the same (a timeout, a gateway
        error after the provider accepted it): look it up by its key before trying again, never create it twice."""

        async def once() -> str:
            try:
                return await self.api.create(lines, key)
            except Exception:
                known = {i["batch"] for i in self.log.intents.values() if i["batch"]}
                found = await self.api.find(key, self.log.intents[key]["t"], len(lines), known)
                if found is None:
                    raise
                return found

        try:
            return await self.call("creating a batch", once)
        except ImitateError:
            self.log.write("void", key)  # not created: nothing billed, its requests are free again
            self.budget.settle(self.reserved.pop(key), 0, 0)
            raise

    async def call(self, what: str, fn: Any, *args: Any) -> Any:
        """A provider call, retried on 429/5xx/timeouts like live requests; any other error stops the run (the batch
        journal keeps every batch, so the next run re-attaches)."""
        attempt = 0
        while True:
            try:
                return await fn(*args)
            except ImitateError:
                raise
            except Exception as exc:
                kind, after = classify(exc)
                if kind == "retry" and attempt < self.engine.policy.retries:
                    await asyncio.sleep(self.engine.policy.delay(attempt, after, self.engine.rng))
                    attempt += 1
                    continue
                raise ImitateError(
                    f"{what} failed: {self.engine.scrub(f'{type(exc).__name__}: {exc}')}",
                    hint="check --teacher, the API key and --base-url (the server must implement the batch API); "
                    f"finished records are kept, the batches already created are in {self.log.path}, and the same "
                    "command re-attaches to them",
                ) from None

    async def wait(self) -> None:
        """Poll the open batches with backoff until all have ended (with --no-wait: one pass), collecting each."""
        delay = self.cfg.poll_interval
        while True:
            changed = False
            for intent in self.log.open_intents(self.cfg.teacher):
                status = await self.call("polling a batch", self.api.status, intent["batch"])
                self.stats.calls += 1
                self.progress.show(intent, status)
                if status.ended:
                    await self.collect(intent, status)
                    changed = True
            if not self.log.open_intents(self.cfg.teacher) or not self.cfg.wait:
                return
            await asyncio.sleep(delay)
            delay = self.cfg.poll_interval if changed else min(delay * 2, self.cfg.poll_max)

    async def collect(self, intent: dict, status: Any) -> None:
        """The results of an ended batch: records to OUT, failed rows to the retry list or failures; then 'done'."""
        results = await self.call("downloading batch results", self.api.results, intent["batch"])
        self.stats.calls += 1
        held = set(intent["ids"])
        done = finished_ids(self.engine.out)  # rows already written before a crash in the middle of this
        seen: set[str] = set()
        journal = Journal(self.engine.out)
        billed_in = billed_out = 0
        from imitate.collect.engine import record

        try:
            for r in results:
                if r.id not in held or r.id in seen:  # not ours (see AnthropicBatches.find)
                    continue
                seen.add(r.id)
                job = self.jobs.get(r.id)
                comp = r.completion
                if comp is not None:
                    billed_in += comp.input_tokens or 0
                    billed_out += comp.output_tokens or 0
                if job is None or r.id in done:
                    continue
                if comp is not None and comp.text.strip():
                    journal.put(record(self.engine.teacher.spec, job, comp))
                    self.stats.completed += 1
                    self.stats.length += comp.finish_reason == "length"
                elif comp is not None:
                    self.engine._fail(job, f"empty answer (finish_reason {comp.finish_reason!r})", 1, self.stats)
                elif r.retryable:
                    self.retry.append((job, r.error))
                else:
                    self.engine._fail(job, r.error, 1, self.stats)
            for rid in held - seen - done:  # a row the provider never reported
                if rid not in self.jobs:
                    continue
                if status.error:  # the whole batch failed (e.g. validation): another batch would fail the same way
                    self.engine._fail(self.jobs[rid], f"batch {status.status}: {status.error}", 1, self.stats)
                else:
                    self.retry.append((self.jobs[rid], f"missing from the results of batch {intent['batch']}"))
        finally:
            await journal.close()
        if journal.error is not None:  # a full disk: the batch stays open, so the next run downloads what is missing
            from imitate.writes import write_error

            raise write_error(journal.error, self.engine.out, f"{journal.written} record(s) of batch {intent['batch']} "
                              "written; the batch stays open and the next run takes the rest from it (never resubmitted)")
        self.stats.tokens_in += billed_in
        self.stats.tokens_out += billed_out
        self.budget.settle(self.reserved.pop(intent["key"], 0.0), billed_in, billed_out)
        self.log.write("done", intent["key"])
        self.progress.finish(intent)

    async def cancel(self) -> None:
        """--cancel: ask the provider to stop every open batch of OUT; a later run collects what they finished."""
        opened = [i for i in self.log.open_intents(self.cfg.teacher) if i["batch"]]
        for intent in opened:
            await self.call("cancelling a batch", self.api.cancel, intent["batch"])
            self.log.write("cancel", intent["key"])
            print(f"cancel requested: batch {intent['batch']} ({len(intent['ids'])} requests)", file=sys.stderr)
        if not opened:
            print(f"no open batches for {self.engine.out}", file=sys.stderr)
        self.stats.pending = sum(len(i["ids"]) for i in opened)


class BatchProgress:
    """One rich progress line per open batch on stderr: its status word and done/failed of total."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.tasks = enabled, None, {}

    def show(self, intent: dict, status: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]} ({task.fields[failed]} failed)"),
                console=Console(stderr=True),
            )
            self.bar.start()
        key, total = intent["key"], len(intent["ids"])
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(f"batch {intent['batch']}", total=total, status="", failed=0)
        done = min(total, status.counts.get("done", 0) + status.counts.get("failed", 0))
        self.bar.update(self.tasks[key], completed=done, status=status.status, failed=status.counts.get("failed", 0))

    def finish(self, intent: dict) -> None:
        if self.bar is not None and intent["key"] in self.tasks:
            self.bar.update(self.tasks[intent["key"]], completed=len(intent["ids"]), status="collected")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

