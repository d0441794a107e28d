"""Throughput of `imitate collect` against the loopback fake server (in its own process, so it does not share the
client's GIL): 2,000 requests at 100 ms latency and concurrency 64, so the ceiling is 64 / 0.1 s = 640 requests/s.

Printed as a fraction of that ceiling; targets: >= 0.90 clean, >= 0.75 with 10 % of requests answered 429 + Retry-After.
Batch rows (`collect --batch`): --batch-requests (20,000) requests through the same server's batch APIs (OpenAI Files +
Batches, Anthropic Message Batches; each batch ends after a few polls), wall time and client CPU per request. The cost
column prices every row's billed tokens as openai:gpt-4o-mini (0.15 / 0.60 USD per million live, half in batch) per
1,000 requests, so live and batch compare directly.
Also runs, side by side, the bare SDK (one AsyncOpenAI client, typed create(), asyncio.gather under a semaphore) as a
reference. The fake server answers in its own process; when the machine is busy, the client's CPU per request is what
limits requests/s, so that is printed too.

    python benchmarks/collect_throughput.py [--requests 2000] [--latency 0.1] [--concurrency 64] [--batch-requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_server(latency: float, rate_429: float, retry_after: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "fake_server.py"),
            "--latency",
            str(latency),
            "--rate-429",
            str(rate_429),
            "--retry-after",
            str(retry_after),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    return proc, f"http://127.0.0.1:{line.split()[1]}/v1"


def run_collect(url: str, n: int, concurrency: int, tmp: Path, tag: str, provider: str = "openai", **kw) -> dict:
    from imitate.collect.stage import CollectConfig, run

    prompts = tmp / f"prompts{n}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(n)))
    os.environ.pop("OPENAI_API_KEY", None)
    cfg = CollectConfig(
        teacher=f"{provider}:gpt-4o-mini",  # the model only names the price; the fake server answers any
        out=tmp / f"{tag}.jsonl",
        prompts=prompts,
        base_url=url if provider == "openai" else url.removesuffix("/v1"),
        concurrency=concurrency,
        max_tokens=64,
        progress=False,
        retries=10,
        price_in=0.15,  # gpt-4o-mini's live prices, for both providers' rows
        price_out=0.60,
        **kw,
    )
    return run(cfg)


async def bare_sdk(url: str, n: int, concurrency: int) -> float:
    import openai

    client = openai.AsyncOpenAI(api_key="unused", base_url=url, max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": f"q {i}"}], max_tokens=64
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--retry-after", type=float, default=0.05)
    ap.add_argument("--batch-requests", type=int, default=20_000)
    args = ap.parse_args()
    ceiling = args.concurrency / args.latency
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        scenarios = [  # name, share of 429s, target fraction, through imitate (else the bare SDK), batch provider
            ("bare SDK create(), 1 client", 0.0, None, None, None),
            ("imitate collect", 0.0, 0.90, True, None),
            ("imitate collect, 10% 429", 0.10, 0.75, True, None),
            ("collect --batch openai", 0.0, None, True, "openai"),
            ("collect --batch anthropic", 0.0, None, True, "anthropic"),
        ]
        for name, rate, target, via_imitate, batch in scenarios:
            proc, url = start_server(args.latency, rate, args.retry_after)
            cpu0 = time.process_time()
            usd = None
            try:
                if not via_imitate:
                    wall = asyncio.run(bare_sdk(url, args.requests, args.concurrency))
                    done, retries = args.requests, 0
                else:
                    n = args.batch_requests if batch else args.requests
                    extra = dict(batch=True, poll_interval=0.05, poll_max=0.5) if batch else {}
                    with contextlib.redirect_stderr(io.StringIO()):  # the run's own summary table
                        s = run_collect(url, n, args.concurrency, tmp, str(len(rows)), batch or "openai", **extra)
                    wall, done, retries = s["wall_s"], s["completed"], s["retries"]
                    usd = s["cost_usd"] / done * 1000
            finally:
                proc.terminate()
                proc.wait()
            cpu_ms = (time.process_time() - cpu0) / done * 1000
            rps = done / wall
            frac = None if batch else rps / ceiling
            rows.append((name, done, retries, wall, cpu_ms, rps, frac, target, usd))
    print(
        f"\n{args.requests} requests, latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}: "
        f"ceiling {ceiling:.0f} req/s"
    )
    print(
        f"{'run':<28}{'done':>6}{'retries':>9}{'wall s':>9}{'cpu ms/req':>12}{'req/s':>9}{'fraction':>10}"
        f"{'target':>8}{'USD/1k req':>12}  ok"
    )
    for name, done, retries, wall, cpu_ms, rps, frac, target, usd in rows:
        ok = "" if target is None else ("yes" if frac >= target else "NO")
        tgt = "" if target is None else f">={target:.2f}"
        fr = "" if frac is None else f"{frac:.3f}"
        cost = "" if usd is None else f"{usd:.5f}"
        print(f"{name:<28}{done:>6}{retries:>9}{wall:>9.2f}{cpu_ms:>12.2f}{rps:>9.1f}{fr:>10}{tgt:>8}{cost:>12}  {ok}")
    print("cpu ms/req: client process CPU (includes the one-off SDK import and set-up) per finished request.")
    print("fraction: of the live ceiling (batch rows are bounded by the server's batch processing, not latency).")
    print("USD/1k req: billed tokens at gpt-4o-mini prices (0.15/0.60 per M live, half for --batch).")


if __name__ == "__main__":
    main()
