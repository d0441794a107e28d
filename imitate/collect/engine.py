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


class Engine:
    def __init__(self, cfg: Any, teacher: Any, secret: str | None, out: Path, failures: Path):
        self.cfg, self.teacher, self.secret = cfg, teacher, secret
        self.out, self.failures_path = Path(out), Path(failures)
        self.stats = Stats()
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm)
        self.policy = RetryPolicy(retries=cfg.retries)
        self.rng = random.Random(cfg.seed)
        self.failures: Journal | None = None
        self.fatal: str | None = None
        self.fatal_error: ImitateError | None = None  # a user error from the teacher itself (hf: model won't load)
        self.failures_path.unlink(missing_ok=True)  # last run's failures are retried now; this run writes its own
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
        journal = Journal(out)
        units = self.units(todo)
        workers = 1 if self.batch > 1 else self.cfg.concurrency
        progress = Progress(label, len(todo), self.cfg.progress)
        try:
            await asyncio.gather(
                *(self._worker(units, journal, stats, progress) for _ in range(min(workers, len(units))))
            )
        finally:
            progress.close()
            await journal.close()
        if self.fatal_error is not None:  # e.g. a local model without a chat template: same for every request
            raise self.fatal_error
        if self.fatal:
            raise ImitateError(
                f"the teacher refused the request: {self.fatal}",
                hint="check the API key (--api-key-env), the model name and --base-url; finished records are kept",
            )
        return stats

    async def _worker(self, units: deque, journal: Journal, stats: Stats, progress: Progress) -> None:
        while units and not self.fatal:
            unit = units.popleft()
            stats.sent += len(unit)
            await self._send(unit, journal, stats, progress)

    async def _send(self, unit: list, journal: Journal, stats: Stats, progress: Progress) -> None:
        requests = [j.request for j in unit]
        batched = self.supports_n or self.batch > 1
        calls = 1 if batched else len(unit)  # one HTTP call / generate() batch, or one call per request
        estimate = est_tokens(requests[0].messages) * calls + self.cfg.max_tokens * len(unit)
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
                    return
                if kind == "fatal":
                    self.fatal = error
                    return
                if kind == "retry" and attempt < self.policy.retries:
                    stats.retries += 1
                    await asyncio.sleep(self.policy.delay(attempt, retry_after, self.rng))
                    attempt += 1
                    continue
                for job in unit:
                    self._fail(job, error, attempt + 1, stats)
                progress.advance(len(unit), stats.failed)
                return
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

    def _fail(self, job: Any, error: str, attempts: int, stats: Stats) -> None:
        if self.failures is None:
            self.failures = Journal(self.failures_path, fsync=False)
        r = job.request
        self.failures.put(
            {
                "id": r.id,
                "teacher": self.teacher.spec,
                "messages": r.messages,
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
    rec = {
        "id": r.id,
        "teacher": teacher,
        "messages": [*r.messages, {"role": "assistant", "content": comp.text}],
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
    """A rich progress bar on stderr: done/total, rate, ETA, failures. Silent when disabled or nothing to do."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.bar = None
        if not enabled or total == 0:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} req/s"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[failed]} failed"),
            console=Console(stderr=True),
            transient=False,
        )
        self.t0 = time.monotonic()
        self.done = 0
        self.task = self.bar.add_task(label, total=total, rate=0.0, failed=0)
        self.bar.start()

    def advance(self, k: int, failed: int) -> None:
        if self.bar is None:
            return
        self.done += k
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        self.bar.update(self.task, advance=k, rate=rate, failed=failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
