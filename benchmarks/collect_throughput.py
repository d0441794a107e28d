"""Throughput of `imitate collect` against the loopback fake server (in its own process, so it does not share the
client's GIL): 2,000 requests at 100 ms latency and concurrency 64, so the ceiling is 64 / 0.1 s = 640 requests/s.

Printed as a fraction of that ceiling; targets: >= 0.90 clean, >= 0.75 with 10 % of requests answered 429 + Retry-After.
Also runs, side by side, the bare SDK (one AsyncOpenAI client, typed create(), asyncio.gather under a semaphore) as a
reference. The fake server answers in its own process; when the machine is busy, the client's CPU per request is what
limits requests/s, so that is printed too.

    python benchmarks/collect_throughput.py [--requests 2000] [--latency 0.1] [--concurrency 64]
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


def run_collect(url: str, n: int, concurrency: int, tmp: Path, tag: str) -> dict:
    from imitate.collect.stage import CollectConfig, run

    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(n)))
    os.environ.pop("OPENAI_API_KEY", None)
    cfg = CollectConfig(
        teacher="openai:fake",
        out=tmp / f"{tag}.jsonl",
        prompts=prompts,
        base_url=url,
        concurrency=concurrency,
        max_tokens=64,
        progress=False,
        retries=10,
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
    args = ap.parse_args()
    ceiling = args.concurrency / args.latency
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        scenarios = [  # name, share of 429s, target fraction, through imitate (else the bare SDK)
            ("bare SDK create(), 1 client", 0.0, None, None),
            ("imitate collect", 0.0, 0.90, True),
            ("imitate collect, 10% 429", 0.10, 0.75, True),
        ]
        for name, rate, target, via_imitate in scenarios:
            proc, url = start_server(args.latency, rate, args.retry_after)
            cpu0 = time.process_time()
            try:
                if not via_imitate:
                    wall = asyncio.run(bare_sdk(url, args.requests, args.concurrency))
                    done, retries = args.requests, 0
                else:
                    with contextlib.redirect_stderr(io.StringIO()):  # the run's own summary table
                        s = run_collect(url, args.requests, args.concurrency, tmp, str(len(rows)))
                    wall, done, retries = s["wall_s"], s["completed"], s["retries"]
            finally:
                proc.terminate()
                proc.wait()
            cpu_ms = (time.process_time() - cpu0) / done * 1000
            rps = done / wall
            rows.append((name, done, retries, wall, cpu_ms, rps, rps / ceiling, target))
    print(
        f"\n{args.requests} requests, latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}: "
        f"ceiling {ceiling:.0f} req/s"
    )
    print(
        f"{'run':<28}{'done':>6}{'retries':>9}{'wall s':>9}{'cpu ms/req':>12}{'req/s':>9}{'fraction':>10}{'target':>8}  ok"
    )
    for name, done, retries, wall, cpu_ms, rps, frac, target in rows:
        ok = "" if target is None else ("yes" if frac >= target else "NO")
        tgt = "" if target is None else f">={target:.2f}"
        print(f"{name:<28}{done:>6}{retries:>9}{wall:>9.2f}{cpu_ms:>12.2f}{rps:>9.1f}{frac:>10.3f}{tgt:>8}  {ok}")
    print("cpu ms/req: client process CPU (includes the one-off SDK import and set-up) per finished request.")


if __name__ == "__main__":
    main()
