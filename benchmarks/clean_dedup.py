"""Near-dedup benchmark: imitate's vectorized MinHash LSH vs datasketch `MinHash` + `MinHashLSH`, measured in one run.

A corpus of collect-format records is generated with planted near-duplicates (copies of an earlier record with a few
words substituted). Both sides shingle the same text (prompt + answer, lowercased \\w+ words, word 5-grams), use
the same num_perm, threshold and LSH bands; datasketch runs on a subset (it is slow), rates are per record per core.

    python benchmarks/clean_dedup.py                      # 100k records for us, 20k for datasketch
    python benchmarks/clean_dedup.py --records 1000000    # + a full `imitate clean` run on 1M records, 2 workers

Printed: records/s per core for both, the speedup, the Jaccard agreement of the removed-id sets, recall of planted
duplicates (those whose true shingle Jaccard reaches the threshold), and for the big run wall time and peak RSS
(main process + workers, sampled).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imitate.clean.dedup import WORD_RE, NearDup, candidate_edges, components

SYLL = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "si", "de", "ba", "zu", "po", "fe", "gi", "ha", "jo"]


def make_vocab(n: int, rng: np.random.Generator) -> np.ndarray:
    words = set()
    while len(words) < n:
        k = int(rng.integers(1, 5))
        words.add("".join(SYLL[i] for i in rng.integers(0, len(SYLL), k)))
    return np.array(sorted(words))


def corpus(n: int, seed: int = 0, dup_rate: float = 0.1, edit_every: int = 100):
    """Yields (index, prompt, answer, planted_original_or_-1). A dup copies a recent original and, in equal shares:
    substitutes 1 word per `edit_every` (at least 1) at random places (shingle Jaccard ~0.85-0.95), appends 1-3 words
    (~0.97), or changes only case and punctuation (1.0; exact dedup would also catch these)."""
    rng = np.random.default_rng(seed)
    vocab = make_vocab(30000, rng)
    recent: list[tuple[int, list[str], list[str]]] = []
    for i in range(n):
        if recent and rng.random() < dup_rate:
            j, p, a = recent[int(rng.integers(0, len(recent)))]
            a = list(a)
            kind = int(rng.integers(0, 3))
            if kind == 0:
                for _ in range(max(1, len(a) // edit_every)):
                    a[int(rng.integers(0, len(a)))] = vocab[int(rng.integers(0, len(vocab)))]
            elif kind == 1:
                a += vocab[rng.integers(0, len(vocab), int(rng.integers(1, 4)))].tolist()
            else:
                a = [w.upper() if rng.random() < 0.1 else w for w in a] + ["!"]
            yield i, " ".join(p), " ".join(a), j
            continue
        p = vocab[np.minimum(rng.zipf(1.3, int(rng.integers(8, 20))) - 1, len(vocab) - 1)].tolist()
        a = vocab[np.minimum(rng.zipf(1.3, int(rng.integers(60, 160))) - 1, len(vocab) - 1)].tolist()
        recent.append((i, p, a))
        if len(recent) > 2000:
            recent.pop(0)
        yield i, " ".join(p), " ".join(a), -1


def ours(texts: list[str], nd: NearDup, chunk: int = 4000) -> set[int]:
    """map (per chunk, as `imitate clean` does: chunk_size 4000) -> group by band -> connected components."""
    keys = np.concatenate([nd.keys(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])
    surv = components(len(texts), candidate_edges(keys))
    return set(np.flatnonzero(surv != np.arange(len(texts))).tolist())


def shingles(text: str, n: int = 5) -> list[bytes]:
    w = WORD_RE.findall(text.lower())
    return [" ".join(w[i : i + n]).encode() for i in range(len(w) - n + 1)]


def datasketch_dedup(
    texts: list[str], num_perm: int, threshold: float, bands: int, rows: int, seed: int = 1
) -> set[int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=(bands, rows))
    removed = set()
    for i, t in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(shingles(t))
        if lsh.query(m):
            removed.add(i)
        lsh.insert(i, m, check_duplication=False)
    return removed


def true_jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / len(sa | sb)


def compare(n_ours: int, n_ds: int, threshold: float, num_perm: int) -> None:
    data = list(corpus(n_ours))
    texts = [p + "\n" + a for _, p, a, _ in data]
    nd = NearDup(num_perm=num_perm, threshold=threshold)
    nd.keys(texts[:1000])  # warm the word-hash cache like a long run would

    t = time.perf_counter()
    ours(texts, nd)
    t_ours = time.perf_counter() - t

    sub = texts[:n_ds]
    t = time.perf_counter()
    removed_ds = datasketch_dedup(sub, num_perm, threshold, nd.bands, nd.rows)
    t_ds = time.perf_counter() - t
    removed_ours_sub = ours(sub, nd)
    removed_ds2 = datasketch_dedup(sub, num_perm, threshold, nd.bands, nd.rows, seed=2)
    agree_ds = len(removed_ds & removed_ds2) / max(1, len(removed_ds | removed_ds2))

    planted = [(i, j) for i, _, _, j in data[:n_ds] if j >= 0]
    jac = {i: true_jaccard(texts[i], texts[j]) for i, j in planted}
    real = [(i, j) for i, j in planted if jac[i] >= threshold]
    inter = len(removed_ours_sub & removed_ds)
    agree = inter / max(1, len(removed_ours_sub | removed_ds))
    rate_ours, rate_ds = n_ours / t_ours, n_ds / t_ds
    print(f"near-dedup, threshold {threshold}, num_perm {num_perm}, LSH {nd.bands} bands x {nd.rows} rows, 1 process")
    print(f"{'':28}{'records':>10}{'seconds':>10}{'records/s/core':>16}")
    print(f"{'imitate (numpy)':28}{n_ours:>10}{t_ours:>10.2f}{rate_ours:>16.0f}")
    print(f"{'datasketch MinHash+LSH':28}{n_ds:>10}{t_ds:>10.2f}{rate_ds:>16.0f}")
    print(f"{'speedup per core':28}{rate_ours / rate_ds:>36.1f}x")
    print(f"on the {n_ds}-record subset:")
    print(f"  removed: imitate {len(removed_ours_sub)}, datasketch {len(removed_ds)}, both {inter}")
    print(f"  agreement (Jaccard of removed-id sets)  {agree:.4f}")
    print(f"  for scale, datasketch seed 1 vs seed 2: {agree_ds:.4f}  (LSH is random near the threshold)")
    for name, rem in (("imitate", removed_ours_sub), ("datasketch", removed_ds)):
        rec = sum(i in rem for i, _ in real) / max(1, len(real))
        print(f"  recall of planted dups with true J >= {threshold} ({len(real)} of {len(planted)}): {name} {rec:.4f}")
    print(f"  recall by true Jaccard of the planted pair:{'pairs':>8}{'imitate':>10}{'datasketch':>12}")
    for lo, hi in ((0.0, threshold), (threshold, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.01)):
        ids = [i for i, _ in planted if lo <= jac[i] < hi]
        if ids:
            r1 = sum(i in removed_ours_sub for i in ids) / len(ids)
            r2 = sum(i in removed_ds for i in ids) / len(ids)
            print(f"    [{lo:.2f}, {min(hi, 1.0):.2f}){'':22}{len(ids):>8}{r1:>10.3f}{r2:>12.3f}")
    extra = len(removed_ours_sub - {i for i, _ in planted})
    print(f"  removed but not planted: imitate {extra}, datasketch {len(removed_ds - {i for i, _ in planted})}")


psutil_errors: tuple = ()


class PeakRSS:
    """Peak RSS of this process plus its children, sampled every 0.1 s (needs psutil; else ru_maxrss)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        try:
            import psutil

            self.proc = psutil.Process(pid)
            global psutil_errors
            psutil_errors = (psutil.NoSuchProcess, psutil.AccessDenied)
        except ImportError:
            self.proc = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil_errors:  # a worker exited between listing and reading it
                pass
            time.sleep(0.1)

    def __enter__(self) -> PeakRSS:
        if self.proc is not None:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.proc is None:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def big_run(n: int, workers: int, keep: bool) -> None:
    from imitate.clean.stage import CleanConfig, run
    from imitate.records import dumps

    tmp = Path(tempfile.mkdtemp(prefix="imitate_bench_"))
    src = tmp / "records.jsonl"
    t = time.perf_counter()
    n_planted = 0
    with src.open("w", encoding="utf-8") as fh:
        for i, p, a, j in corpus(n, seed=1):
            n_planted += j >= 0
            rec = {
                "id": f"r{i:07d}",
                "teacher": "bench:synthetic",
                "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                "params": {"temperature": 0.7},
                "sample": 0,
                "finish_reason": "stop",
                "usage": {"input_tokens": 10, "output_tokens": 100},
            }
            fh.write(dumps(rec) + "\n")
    t_gen = time.perf_counter() - t
    size = src.stat().st_size
    cfg = CleanConfig(inputs=[src], out=tmp / "clean.jsonl", removed=tmp / "removed.jsonl", workers=workers)
    with PeakRSS(os.getpid()) as rss:
        t = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - t
    timing = summary["timing"]
    print(f"\nfull `imitate clean` (all default filters + exact + near dedup), {workers} workers")
    print(f"  corpus: {n} records, {size / 1e9:.2f} GB, {n_planted} planted near-dups (generated in {t_gen:.0f} s)")
    print(f"  wall {wall:.1f} s  ({n / wall:.0f} records/s, {n / wall / workers:.0f} records/s/core)")
    steps = ("map", "cluster", "write")
    print("  " + ", ".join(f"{k} {timing[k + '_wall_s']:.1f} s" for k in steps))
    print(f"  peak RSS (main + workers): {rss.peak / 2**30:.2f} GiB")
    print(f"  out {summary['out']}, removed {json.dumps(summary['removed'])}")
    if not keep:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--records", type=int, default=0, help="also run `imitate clean` on this many records (e.g. 1000000)"
    )
    ap.add_argument("--ours", type=int, default=100_000, help="records for our per-core rate")
    ap.add_argument("--datasketch", type=int, default=20_000, help="records for datasketch (and the agreement)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the generated files of the big run")
    args = ap.parse_args()
    compare(args.ours, args.datasketch, args.threshold, args.num_perm)
    if args.records:
        big_run(args.records, args.workers, args.keep)


if __name__ == "__main__":
    main()
