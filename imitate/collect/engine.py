"""The asyncio engine behind `imitate collect`: bounded concurrency, pacing, retries, journaling.

Requests are grouped into units: all missing samples of one prompt for teachers that draw several samples per call
(`supports_n`, OpenAI's `n`), chunks of `batch_size` for local teachers that generate in batches, otherwise one
request each. A fixed pool of `concurrency` workers takes units off a queue (one worker for batch teachers: the
model is the bottleneck). Each finished answer is appended to the journal (OUT) at once; a unit that runs out of
retries goes to the failures file with its error.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.collect.accounting import Budget
from imitate.collect.journal import Journal, finished_ids
from imitate.collect.limiter import RateLimiter, RetryPolicy, classify, est_tokens
from imitate.errors import ImitateError
from imitate.records import now_iso


@dataclass
class Stats:
    requests: int = 0  # planned (unique ids)
    cached: int = 0  # already had a record in OUT
    sent: int = 0  # requests attempted in this run
    completed: int = 0  # records written in this run
    failed: int = 0  # sent to the failures file
    retries: int = 0  # extra attempts after 429/5xx/timeouts/connection errors
    calls: int = 0  # HTTP calls / generate() calls, retries included
    length: int = 0  # answers cut by max_tokens (finish_reason "length")
    tokens_in: int = 0
    tokens_out: int = 0
    unsent: int = 0  # held back by --max-cost
    batches: int = 0  # provider batches created in this run (--batch)
    pending: int = 0  # requests in batches still running when the run exits (--batch --no-wait)


class Engine:
    def __init__(
        self, cfg: Any, teacher: Any, secret: str | None, out: Path, failures: Path, budget: Budget | None = None
    ):
        self.cfg, self.teacher, self.secret = cfg, teacher, secret
        self.budget = budget or Budget(None, None)
        self.settled: asyncio.Condition | None = None  # signalled whenever a reservation is settled
        self.in_flight = 0  # units admitted (their worst cost reserved) and not settled yet
        self.out, self.failures_path = Path(out), Path(failures)
        self.stats = Stats()
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm)
        self.policy = RetryPolicy(retries=cfg.retries)
        self.rng = random.Random(cfg.seed)
        self.failures: Journal | None = None
        self.fatal: str | None = None
        self.fatal_error: ImitateError | None = None  # a user error from the teacher itself (hf: model won't load)
        if not getattr(cfg, "cancel", False):  # last run's failures are retried now; this run writes its own
            self.failures_path.unlink(missing_ok=True)
        self.halted: str | None = None  # why sending stopped early: "SIGTERM", "SIGINT" or "write"
        self.halt_signum = 0  # the signal that halted it
        self.write_failure: OSError | None = None  # the failed write that halted the run (a full disk...)
        self.in_flight_requests = 0  # requests inside _send now
        self.cut_off = 0  # requests in flight when the run was halted (cancelled: the next run asks them again)
        self.write_path: Path | None = None
        self._workers: list[asyncio.Future] = []
        self.batch = getattr(teacher, "batch_size", 1) or 1  # >1: a local teacher generating in batches
        self.supports_n = getattr(teacher, "supports_n", False)  # several samples of one prompt in one call

    def scrub(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret and self.secret != "unused" else text

    def units(self, jobs: list) -> deque:
        if self.batch > 1:
            return deque(jobs[i : i + self.batch] for i in range(0, len(jobs), self.batch))
        if not self.supports_n:
            return deque([j] for j in jobs)
        groups: deque = deque()
        for j in jobs:
            last = groups[-1][0].request if groups else None
            if last is not None and last.messages == j.request.messages and last.params == j.request.params:
                groups[-1].append(j)
            else:
                groups.append([j])
        return groups

    async def collect(
        self, jobs: list, out: Path | None = None, label: str = "collect", stats: Stats | None = None
    ) -> Stats:
        """Send every job without a record in `out` (default OUT); returns this call's Stats."""
        out = Path(out or self.out)
        stats = stats or self.stats
        done = finished_ids(out)
        todo = [j for j in jobs if j.request.id not in done]
        stats.requests += len(jobs)
        stats.cached += len(jobs) - len(todo)
        journal = Journal(out, on_error=lambda exc: self.halt("write", exc, out))
        units = self.units(todo)
        workers = 1 if self.batch > 1 else self.cfg.concurrency
        progress = Progress(label, len(todo), self.cfg.progress)  # closed below, also on errors
        self.settled = asyncio.Condition()
        self._workers = [asyncio.ensure_future(self._worker(units, journal, stats, progress))
                         for _ in range(min(workers, len(units)))]
        try:
            await asyncio.gather(*self._workers)
        except asyncio.CancelledError:
            if not self.halted:
                raise
            if self._workers:
                await asyncio.wait(self._workers)  # halted: let every cancelled worker settle its budget
        finally:
            progress.close()
            await journal.close()
        stats.completed -= journal.accepted - journal.written  # answers that arrived after a failed write
        if self.write_failure is not None:
            raise self.write_failed(stats.cached + journal.written, journal.accepted - journal.written)
        if not self.fatal and not self.halted:
            stats.unsent += sum(len(u) for u in units)  # what the budget held back
        if self.fatal_error is not None:  # e.g. a local model without a chat template: same for every request
            raise self.fatal_error
        if self.fatal:
            raise ImitateError(
                f"the teacher refused the request: {self.fatal}",
                hint="check the API key (--api-key-env), the model name and --base-url; finished records are kept",
            )
        return stats

    def halt(self, why: str, exc: OSError | None = None, path: Path | None = None) -> None:
        """Stop now: send nothing more and cancel what is in flight (a signal, or a write that failed)."""
        if self.halted:
            return
        self.halted, self.write_failure, self.cut_off = why, exc, self.in_flight_requests
        self.write_path = path
        for task in self._workers:
            task.cancel()

    def write_failed(self, kept: int, dropped: int) -> ImitateError:
        """The error of a run stopped by a failed write: what is kept, what the next run asks again."""
        from imitate.writes import write_error

        assert self.write_failure is not None
        return write_error(self.write_failure, self.write_path,
                           f"{kept} record(s) kept, {self.cut_off + dropped} request(s) were in flight and will be "
                           "asked again")

    async def _worker(self, units: deque, journal: Journal, stats: Stats, progress: Progress) -> None:
        while units and not self.fatal and not self.halted:
            unit = units.popleft()
            calls = 1 if (self.supports_n or self.batch > 1) else len(unit)  # HTTP calls / generate() batches
            tokens_in, tokens_out = est_tokens(unit[0].request.messages) * calls, self.cfg.max_tokens * len(unit)
            worst = self.budget.worst(tokens_in, tokens_out)
            if not await self._admit(worst):
                units.appendleft(unit)  # over budget: this and every later unit stay unsent
                return
            stats.sent += len(unit)
            billed = (0, 0)
            self.in_flight_requests += len(unit)
            try:
                billed = await self._send(unit, calls, tokens_in + tokens_out, journal, stats, progress)
            finally:
                self.in_flight_requests -= len(unit)
                async with self.settled:
                    self.budget.settle(worst, *billed)
                    self.in_flight -= 1
                    self.settled.notify_all()

    async def _admit(self, worst: float) -> bool:
        """Reserve the unit's worst cost; while it does not fit but something is in flight, wait for that to settle
        (it usually costs less than its worst case). False once it cannot fit even with nothing in flight."""
        async with self.settled:
            while not self.budget.reserve(worst):
                # count units, not the reserved sum: after its floats are taken back it can stay a hair above 0 with
                # nothing in flight, and this wait would never be woken (a hang seen in the budget tests)
                if self.in_flight == 0:
                    return False
                await self.settled.wait()
            self.in_flight += 1
        return True

    async def _send(
        self, unit: list, calls: int, estimate: int, journal: Journal, stats: Stats, progress: Progress
    ) -> tuple[int, int]:
        """Send one unit (with retries); returns the (input, output) tokens billed for it."""
        requests = [j.request for j in unit]
        attempt = 0
        while True:
            await self.limiter.acquire(calls, estimate)
            stats.calls += calls
            try:
                completions = await self.teacher.complete(requests)
                break
            except Exception as exc:  # the teacher's (SDK's) error: classify, then retry, fail or stop the run
                kind, retry_after = classify(exc)
                error = self.scrub(f"{type(exc).__name__}: {exc}")
                if isinstance(exc, ImitateError):  # raised by our own teacher code: a setup error, not a bad request
                    self.fatal, self.fatal_error = error, exc
                    return 0, 0
                if kind == "fatal":
                    self.fatal = error
                    return 0, 0
                if kind == "retry" and attempt < self.policy.retries:
                    stats.retries += 1
                    await asyncio.sleep(self.policy.delay(attempt, retry_after, self.rng))
                    attempt += 1
                    continue
                for job in unit:
                    self._fail(job, error, attempt + 1, stats)
                progress.advance(len(unit), stats.failed)
                return 0, 0
        billed_in = billed_out = 0
        for job, comp in zip(unit, completions):
            b_in, b_out = comp.extra.get("billed", (comp.input_tokens or 0, comp.output_tokens or 0))
            billed_in, billed_out = billed_in + b_in, billed_out + b_out
            if not comp.text.strip():
                self._fail(
                    job, f"empty answer from the teacher (finish_reason {comp.finish_reason!r})", attempt + 1, stats
                )
                continue
            journal.put(record(self.teacher.spec, job, comp))
            stats.completed += 1
            stats.length += comp.finish_reason == "length"
        stats.tokens_in += billed_in
        stats.tokens_out += billed_out
        self.limiter.settle(estimate, billed_in + billed_out)
        progress.advance(len(unit), stats.failed)
        return billed_in, billed_out

    def _fail(self, job: Any, error: str, attempts: int, stats: Stats) -> None:
        if self.failures is None:
            self.failures = Journal(self.failures_path, fsync=False,
                                    on_error=lambda exc: self.halt("write", exc, self.failures_path))
        r = job.request
        self.failures.put(
            {
                "id": r.id,
                "teacher": self.teacher.spec,
                "messages": r.messages[r.context_turns :],
                **({"context": r.messages[: r.context_turns]} if r.context_turns else {}),
                "params": r.params,
                "sample": r.sample,
                "source": job.source,
                "where": job.where,
                "error": error,
                "attempts": attempts,
                "created": now_iso(),
            }
        )
        stats.failed += 1

    async def aclose(self) -> None:
        if self.failures is not None:
            await self.failures.close()
        await self.teacher.aclose()


def record(teacher: str, job: Any, comp: Any) -> dict:
    """A record in the format of imitate.records."""
    r = job.request
    k = r.context_turns  # the teacher was sent context + messages; the student's view is the messages alone
    rec = {
        "id": r.id,
        "teacher": teacher,
        "messages": [*r.messages[k:], {"role": "assistant", "content": comp.text}],
        **({"context": r.messages[:k]} if k else {}),
        "params": r.params,
        "sample": r.sample,
        "finish_reason": comp.finish_reason,
        "usage": {"input_tokens": comp.input_tokens, "output_tokens": comp.output_tokens},
        "source": job.source,
        "created": now_iso(),
    }
    if r.params.get("logprobs"):
        rec["logprobs"] = comp.logprobs
    if comp.extra.get("answer_token_ids") is not None:  # hf teachers: the generated ids (see imitate.records)
        rec["answer_token_ids"] = comp.extra["answer_token_ids"]
    return rec


class Progress:
    """The collect bar (imitate.progress.Bar): done/total, requests per second, failures, time left."""

    def __init__(self, label: str, total: int, enabled: bool):
        from imitate.progress import Bar

        self.bar = Bar(label, total, enabled=enabled, fields={"rate": 0.0, "failed": 0},
                       columns=["{rate:.1f} req/s", "{failed} failed"])
        self.t0 = time.monotonic()
        self.done = 0

    def advance(self, k: int, failed: int) -> None:
        self.done += k
        self.bar.update(advance=k, rate=self.done / max(time.monotonic() - self.t0, 1e-9), failed=failed)

    def close(self) -> None:
        self.bar.close()
