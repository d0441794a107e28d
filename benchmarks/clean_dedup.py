"""Near-dedup benchmark: imitate (MinHash LSH candidates + exact check) vs datasketch `MinHash` + `MinHashLSH`, one run.

Texts are generated from prose nobody wrote for this benchmark -- sentences of the Python standard library's docstrings
(read from its source files with `ast`) -- in several shapes: one to three sentences, longer paragraphs, sums with
their numbers, small Python functions with constants. Planted near-duplicates copy a recent text and change one word,
append a short sentence, or change only case and whitespace.

Both sides see the same texts and the same shingles: character 5-grams of the normalized text (`keys.normalize`), 128
permutations, threshold 0.8. datasketch runs with its own parameters for that threshold (9 bands x 13 rows) and with
ours (21 x 6, no exact check). The truth is computed here, independently, with Python sets: a pair's true Jaccard.

  recall     of the planted pairs whose true Jaccard is >= the threshold, the share whose copy was removed
  precision  of the removed texts, the share whose true Jaccard with the text they were matched to is >= threshold
  < t - 0.1  removed texts whose match is below threshold - 0.1 (the target is none)

    python benchmarks/clean_dedup.py                      # 100k texts for us, 20k for datasketch
    python benchmarks/clean_dedup.py --records 1000000    # + a full `imitate clean` run on 1M records, 2 workers
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import resource
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imitate.clean.dedup import NearDup, candidate_edges, select  # noqa: E402
from imitate.clean.keys import normalize  # noqa: E402

# --- text ------------------------------------------------------------------------------------------------------------


def sentence_pool(max_files: int = 400) -> list[str]:
    """Sentences of 5-40 words from the docstrings of the standard library's .py files (sorted, so stable)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(lib.glob("*.py"))[:max_files] + sorted(lib.glob("*/*.py"))[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for s in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                    if 5 <= len(s.split()) <= 40 and s[0].isupper():
                        out.append(s)
    return list(dict.fromkeys(out))


class Texts:
    """Generates (text, planted original or -1, kind) in shapes mixed at random."""

    def __init__(self, pool: list[str], seed: int, dup_rate: float = 0.1):
        self.pool, self.rng, self.dup_rate = pool, np.random.default_rng(seed), dup_rate
        self.words = sorted({w for s in pool[:5000] for w in re.findall(r"[a-z]{4,}", s)})
        self.names = sorted({w for s in pool for w in re.findall(r"\b[a-z]+_[a-z_]+\b", s)}) or ["f"]

    def fresh(self) -> str:
        r, rng, pool = self.rng.random(), self.rng, self.pool
        if r < 0.45:
            return " ".join(pool[i] for i in rng.integers(0, len(pool), int(rng.integers(1, 4))))
        if r < 0.7:
            return " ".join(pool[i] for i in rng.integers(0, len(pool), int(rng.integers(4, 9))))
        if r < 0.85:
            a, b = (int(x) for x in rng.integers(10, 10000, 2))
            lead = pool[int(rng.integers(0, len(pool)))]
            return f"{lead} What is {a} plus {b}? {a} plus {b} is {a + b}."
        name = self.names[int(rng.integers(0, len(self.names)))]
        k, m = (int(x) for x in rng.integers(2, 500, 2))
        doc = pool[int(rng.integers(0, len(pool)))]
        return f'```python\ndef {name}(x):\n    """{doc}"""\n    return x * {k} + {m}\n```'

    def edit(self, text: str) -> tuple[str, str]:
        rng = self.rng
        kind = int(rng.integers(0, 3))
        if kind == 0:
            spots = [m.span() for m in re.finditer(r"[A-Za-z]{3,}", text)]
            a, b = spots[int(rng.integers(0, len(spots)))]
            return text[:a] + self.words[int(rng.integers(0, len(self.words)))] + text[b:], "one word"
        if kind == 1:
            extra = " ".join(self.words[i] for i in rng.integers(0, len(self.words), int(rng.integers(3, 8))))
            return text + " " + extra.capitalize() + ".", "appended"
        return re.sub(r" ", "  ", text.upper(), count=3), "case/space"

    def __call__(self, n: int):
        recent: list[tuple[int, str]] = []
        for i in range(n):
            if recent and self.rng.random() < self.dup_rate:
                j, orig = recent[int(self.rng.integers(0, len(recent)))]
                text, kind = self.edit(orig)
                yield text, j, kind
                continue
            text = self.fresh()
            recent.append((i, text))
            if len(recent) > 2000:
                recent.pop(0)
            yield text, -1, ""


def grams(text: str, n: int = 5) -> set[str]:
    t = normalize(text)
    return {t[i : i + n] for i in range(len(t) - n + 1)} or {t}


def true_jaccard(a: str, b: str) -> float:
    sa, sb = grams(a), grams(b)
    return len(sa & sb) / len(sa | sb)


# --- the two sides ---------------------------------------------------------------------------------------------------


def imitate_dedup(texts: list[str], nd: NearDup, chunk: int = 4000) -> dict[int, int]:
    """As `imitate clean` does: map (chunks) -> group by band -> sketch prefilter -> exact check -> select.
    Returns removed -> its survivor."""
    recs = [[normalize(t)] for t in texts]
    mapped = [nd.keys_and_sketch(recs[i : i + chunk]) for i in range(0, len(recs), chunk)]
    keys, sketch = np.concatenate([k for k, _ in mapped]), np.concatenate([s for _, s in mapped])
    edges = candidate_edges(keys, max_pairs_bucket=50)
    edges = edges[nd.plausible(sketch[edges[:, 0]], sketch[edges[:, 1]])] if len(edges) else edges
    if len(edges):
        nodes = np.unique(edges)
        sets = dict(zip(nodes.tolist(), nd.turn_sets([recs[k] for k in nodes.tolist()])))
        keep = [nd.similarity(sets[u], sets[v]) >= nd.threshold for u, v in edges.tolist()]
        edges = edges[np.asarray(keep, bool)]
    surv = select(len(texts), edges, np.arange(len(texts)))
    return {i: int(s) for i, s in enumerate(surv.tolist()) if s != i}


def datasketch_dedup(texts: list[str], num_perm: int, threshold: float, params=None) -> dict[int, int]:
    """Stream: query the LSH, then insert. removed -> the earliest candidate it matched."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=params)
    removed = {}
    for i, t in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([g.encode("utf-8") for g in grams(t)])
        hits = lsh.query(m)
        if hits:
            removed[i] = min(hits)
        else:
            lsh.insert(i, m, check_duplication=False)
    return removed


def scores(name: str, removed: dict[int, int], texts: list[str], planted: list[tuple[int, int]], t: float) -> list:
    real = [(i, j) for i, j in planted if true_jaccard(texts[i], texts[j]) >= t]
    recall = sum(i in removed for i, _ in real) / max(1, len(real))
    sims = [true_jaccard(texts[i], texts[j]) for i, j in removed.items()]
    precision = sum(s >= t for s in sims) / max(1, len(sims))
    return [name, len(removed), recall, precision, sum(s < t - 0.1 for s in sims)]


def compare(n_ours: int, n_ds: int, threshold: float, num_perm: int, pool: list[str]) -> None:
    data = list(Texts(pool, seed=0)(n_ours))
    texts = [x for x, _, _ in data]
    nd = NearDup(num_perm=num_perm, threshold=threshold)
    imitate_dedup(texts[:500], nd)  # warm up

    t0, c0 = time.perf_counter(), time.process_time()
    ours_all = imitate_dedup(texts, nd)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
    sub = texts[:n_ds]
    t0, c0 = time.perf_counter(), time.process_time()
    ds = datasketch_dedup(sub, num_perm, threshold)
    t_ds, c_ds = time.perf_counter() - t0, time.process_time() - c0
    ds_ours = datasketch_dedup(sub, num_perm, threshold, params=(nd.bands, nd.rows))
    ours = imitate_dedup(sub, nd)

    planted = [(i, j) for i, (_, j, _) in enumerate(data[:n_ds]) if j >= 0]
    planted_all = [(i, j) for i, (_, j, _) in enumerate(data) if j >= 0]
    from datasketch.lsh import _optimal_param

    b_ds, r_ds = _optimal_param(threshold, num_perm, 0.5, 0.5)
    print(f"near-dedup on generated texts (stdlib docstring sentences, sums, code), character 5-grams, "
          f"threshold {threshold}, {num_perm} permutations, 1 process")  # fmt: skip
    print(f"{'':40}{'texts':>8}{'removed':>9}{'recall':>9}{'precision':>11}{'< t-0.1':>9}")
    rows = [
        scores(f"imitate {nd.bands}x{nd.rows} + exact check", ours, sub, planted, threshold),
        scores(f"datasketch {b_ds}x{r_ds} (its choice)", ds, sub, planted, threshold),
        scores(f"datasketch {nd.bands}x{nd.rows} (ours, no check)", ds_ours, sub, planted, threshold),
    ]
    for name, removed, rec, prec, bad in rows:
        print(f"{name:40}{n_ds:>8}{removed:>9}{rec:>9.4f}{prec:>11.4f}{bad:>9}")
    name, removed, rec, prec, bad = scores("imitate, all texts", ours_all, texts, planted_all, threshold)
    print(f"{name:40}{n_ours:>8}{removed:>9}{rec:>9.4f}{prec:>11.4f}{bad:>9}")
    print(f"  planted pairs on the {n_ds} texts: {len(planted)}, of which true Jaccard >= {threshold}: "
          f"{sum(true_jaccard(sub[i], sub[j]) >= threshold for i, j in planted)}")  # fmt: skip
    print(f"  recall by true Jaccard of the planted pair{'pairs':>10}{'imitate':>10}{'datasketch':>12}")
    jac = {i: true_jaccard(sub[i], sub[j]) for i, j in planted}
    for lo, hi in ((0.0, threshold - 0.1), (threshold - 0.1, threshold), (threshold, 0.85), (0.85, 0.9),
                   (0.9, 0.95), (0.95, 1.01)):  # fmt: skip
        ids = [i for i, _ in planted if lo <= jac[i] < hi]
        if ids:
            r1 = sum(i in ours for i in ids) / len(ids)
            r2 = sum(i in ds for i in ids) / len(ids)
            print(f"    [{lo:.2f}, {min(hi, 1.0):.2f}){'':26}{len(ids):>10}{r1:>10.3f}{r2:>12.3f}")
    rate_ours, rate_ds = n_ours / c_ours, n_ds / c_ds
    print("speed, 1 process (texts per CPU second of the process: on a shared machine, wall time is not one core)")
    print(f"{'':40}{'texts':>8}{'wall s':>9}{'CPU s':>9}{'texts/s/core':>14}")
    print(f"{'imitate (numpy, with the exact check)':40}{n_ours:>8}{t_ours:>9.2f}{c_ours:>9.2f}{rate_ours:>14.0f}")
    print(f"{'datasketch MinHash+LSH':40}{n_ds:>8}{t_ds:>9.2f}{c_ds:>9.2f}{rate_ds:>14.0f}")
    print(f"{'speedup per core':40}{rate_ours / rate_ds:>40.1f}x")


# --- the full stage on a big corpus -----------------------------------------------------------------------------------

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


PROMPTS = ["Explain this in your own words.", "Summarize the following.", "What does this mean?", "Rewrite this."]


def big_run(n: int, workers: int, keep: bool, pool: list[str]) -> None:
    """Records: a prompt (a template with an item number, so prompts differ) and a generated answer; planted copies
    keep the prompt and edit the answer (one word, an appended sentence, case and whitespace)."""
    from imitate.clean.stage import CleanConfig, run
    from imitate.records import dumps

    tmp = Path(tempfile.mkdtemp(prefix="imitate_bench_"))
    src = tmp / "records.jsonl"
    t = time.perf_counter()
    planted: dict[str, str] = {}
    prompts: dict[int, str] = {}
    with src.open("w", encoding="utf-8") as fh:
        for i, (a, j, kind) in enumerate(Texts(pool, seed=1)(n)):
            prompts[i] = prompts[j] if j >= 0 else f"{PROMPTS[i % len(PROMPTS)]} (item {i})"
            if j >= 0:
                planted[f"r{i:07d}"] = kind
            if len(prompts) > 4000:
                prompts.pop(next(iter(prompts)))
            rec = {
                "id": f"r{i:07d}",
                "teacher": "bench:synthetic",
                "messages": [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": a}],
                "finish_reason": "stop",
                "usage": {"input_tokens": 10, "output_tokens": 100},
            }
            fh.write(dumps(rec) + "\n")
    t_gen = time.perf_counter() - t
    size = src.stat().st_size
    cfg = CleanConfig(inputs=[src], out=tmp / "clean.jsonl", removed=tmp / "removed.jsonl", workers=workers)
    def cpu() -> float:
        return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))  # fmt: skip

    with PeakRSS(os.getpid()) as rss:
        t, c = time.perf_counter(), cpu()
        summary = run(cfg)
        wall, cpu_s = time.perf_counter() - t, cpu() - c
    caught = {}
    with (tmp / "removed.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            caught[r["id"]] = r["removed"]["filter"]
    timing = summary["timing"]
    print(f"\nfull `imitate clean` (default filters + exact + near dedup with the exact check), {workers} workers")
    print(f"  corpus: {n} records, {size / 1e9:.2f} GB, {len(planted)} planted copies (generated in {t_gen:.0f} s)")
    print(f"  wall {wall:.1f} s  ({n / wall:.0f} records/s); CPU {cpu_s:.1f} s in main + workers "
          f"({n / cpu_s:.0f} records per CPU second)")  # fmt: skip
    steps = ("map", "cluster", "write")
    print("  " + ", ".join(f"{k} {timing[k + '_wall_s']:.1f} s" for k in steps))
    print(f"  peak RSS (main + workers): {rss.peak / 2**30:.2f} GiB")
    print(f"  out {summary['out']}, removed {json.dumps(summary['removed'])}")
    for kind in ("one word", "appended", "case/space"):
        ids = [i for i, k in planted.items() if k == kind]
        got = sum(i in caught for i in ids)
        print(f"  planted {kind:>10}: {len(ids):>7}, removed {got:>7} ({got / max(1, len(ids)):.3f})")
    print(f"  removed but not planted: {sum(i not in planted for i in caught)}")
    if not keep:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=0, help="also run `imitate clean` on this many records")
    ap.add_argument("--ours", type=int, default=100_000, help="texts for our rate and scores")
    ap.add_argument("--datasketch", type=int, default=20_000, help="texts for datasketch (and the side-by-side)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the generated files of the big run")
    args = ap.parse_args()
    pool = sentence_pool()
    print(f"{len(pool)} docstring sentences from {sysconfig.get_paths()['stdlib']}")
    compare(args.ours, args.datasketch, args.threshold, args.num_perm, pool)
    if args.records:
        big_run(args.records, args.workers, args.keep, pool)


if __name__ == "__main__":
    main()
