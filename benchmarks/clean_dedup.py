"""Near-dedup benchmark: imitate (MinHash LSH candidates + exact check) vs datasketch `MinHash` + `MinHashLSH` and rensa
(Rust `RMinHash` + `RMinHashLSH`), one run.

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
    python benchmarks/clean_dedup.py --records 1000000    # + the whole `imitate clean` on 1M records in 4 shards,
                                                          # local engine (2 workers) and Ray engine (local Ray, 2 CPUs)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import resource
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imitate.clean import minhash  # noqa: E402
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
        spots = [m.span() for m in re.finditer(r"[A-Za-z]{3,}", text)] if kind == 0 else []
        if kind == 0 and spots:  # (a text without a word to change gets the case/space edit)
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


def rensa_dedup(texts: list[str], num_perm: int, threshold: float, bands: int) -> dict[int, int]:
    """rensa (Rust MinHash, Python bindings), as datasketch: query, then insert; the same character 5-grams."""
    from rensa import RMinHash, RMinHashLSH

    lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
    removed = {}
    for i, t in enumerate(texts):
        n = normalize(t)
        m = RMinHash(num_perm=num_perm, seed=1)
        m.update([n[k : k + 5] for k in range(len(n) - 4)] or [n])  # a list (duplicates do not change a MinHash)
        hits = lsh.query(m)
        if hits:
            removed[i] = min(hits)
        else:
            lsh.insert(i, m)
    return removed


def clean_whole(texts: list[str], tmp: Path) -> tuple[dict[int, int], set[int], float, float]:
    """The whole `imitate clean` with its defaults (1 process, every default filter, exact and near dedup with the
    exact check) on records whose answer is each text (one prompt for all). Returns (removed by dedup -> survivor,
    removed by anything, wall s, CPU s)."""
    from imitate.clean.stage import CleanConfig, run
    from imitate.records import dumps

    src = tmp / "texts.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            msgs = [{"role": "user", "content": "Write a paragraph."}, {"role": "assistant", "content": t}]
            fh.write(dumps({"id": str(i), "messages": msgs, "finish_reason": "stop"}) + "\n")
    cfg = CleanConfig(inputs=[src], out=tmp / "clean.jsonl", removed=tmp / "removed.jsonl", max_removed=1.0)
    t0, c0 = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as null:  # the report table goes to stderr
        err, sys.stderr = sys.stderr, null
        try:
            run(cfg)
        finally:
            sys.stderr = err
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    dup, gone = {}, set()
    with (tmp / "removed.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            gone.add(int(r["id"]))
            if "duplicate_of" in r["removed"]:
                dup[int(r["id"])] = int(r["removed"]["duplicate_of"])
    return dup, gone, wall, cpu


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
    have_rensa = importlib.util.find_spec("rensa") is not None
    if have_rensa:
        rensa_dedup(texts[:500], num_perm, threshold, 16)  # warm up
        t0, c0 = time.perf_counter(), time.process_time()
        rn_all = rensa_dedup(texts, num_perm, threshold, 16)
        t_rn, c_rn = time.perf_counter() - t0, time.process_time() - c0
        rn32 = rensa_dedup(texts, num_perm, threshold, 32)
    tmp = Path(tempfile.mkdtemp(prefix="imitate_bench_"))
    whole, whole_gone, t_whole, c_whole = clean_whole(texts, tmp)
    kernels = minhash.native
    same_files = None
    if kernels is not None:  # the numpy fallback: the same files, and its speed
        out = (tmp / "clean.jsonl").read_bytes(), (tmp / "removed.jsonl").read_bytes()
        minhash.native = None
        try:
            _, _, t_np, c_np = clean_whole(texts, tmp)
        finally:
            minhash.native = kernels
        same_files = out == ((tmp / "clean.jsonl").read_bytes(), (tmp / "removed.jsonl").read_bytes())
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()

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
    full = [scores("imitate dedup only, all texts", ours_all, texts, planted_all, threshold)]
    if have_rensa:
        full.append(scores("rensa 16x8 (query, insert), all texts", rn_all, texts, planted_all, threshold))
        full.append(scores("rensa 32x4, all texts", rn32, texts, planted_all, threshold))
    row = scores("whole `imitate clean`, all texts", whole, texts, planted_all, threshold)
    real = [i for i, j in planted_all if true_jaccard(texts[i], texts[j]) >= threshold]
    row[2] = sum(i in whole_gone for i in real) / max(1, len(real))  # recall: the copy is gone, whatever took it
    full.append(row)
    for name, removed, rec, prec, bad in full:
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
    how = "C kernels" if kernels is not None else "numpy: no C kernels"
    print(f"{f'imitate dedup ({how})':40}{n_ours:>8}{t_ours:>9.2f}{c_ours:>9.2f}{rate_ours:>14.0f}")
    print(f"{'datasketch MinHash+LSH':40}{n_ds:>8}{t_ds:>9.2f}{c_ds:>9.2f}{rate_ds:>14.0f}")
    if have_rensa:
        print(f"{'rensa RMinHash+LSH (16x8), no check':40}{n_ours:>8}{t_rn:>9.2f}{c_rn:>9.2f}{n_ours / c_rn:>14.0f}")
    rate_whole = n_ours / c_whole
    print(f"{'whole `imitate clean` (defaults)':40}{n_ours:>8}{t_whole:>9.2f}{c_whole:>9.2f}{rate_whole:>14.0f}")
    if same_files is not None:
        print(f"{'  the same without the C kernels':40}{n_ours:>8}{t_np:>9.2f}{c_np:>9.2f}{n_ours / c_np:>14.0f}"
              f"   same files: {same_files}")  # fmt: skip
    print(f"{'imitate dedup / datasketch, per core':40}{rate_ours / rate_ds:>40.1f}x")
    print(f"{'whole imitate clean / datasketch':40}{rate_whole / rate_ds:>40.1f}x")
    if have_rensa:
        print(f"{'whole imitate clean / rensa':40}{rate_whole / (n_ours / c_rn):>40.2f}x")


# --- the full stage on a big corpus -----------------------------------------------------------------------------------

class PeakRSS:
    """Peak RSS, sampled every 0.2 s, of this process (the driver), of the processes doing the map (local worker
    processes, or Ray's `ray::` worker processes), and of Ray's own daemons (GCS, raylet, ...), each summed over its
    processes at one instant. Needs psutil. When the machine's available memory falls under `floor` bytes it stops the
    run (kills the processes under this one, exits 3): a benchmark must not make the kernel's OOM killer pick a
    process of someone else's on a shared machine."""

    def __init__(self, floor: int = 1 << 30):
        import psutil

        self.psutil, self.proc, self.floor = psutil, psutil.Process(), floor
        self.peak = {"driver": 0, "workers": 0, "ray daemons": 0}
        self._stop = threading.Event()

    def _sample(self) -> None:
        now = {k: 0 for k in self.peak}
        now["driver"] = self.proc.memory_info().rss
        for p in self.proc.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                kind = "workers" if "ray::" in cmd or "default_worker" in cmd or "ray" not in cmd else "ray daemons"
                now[kind] += p.memory_info().rss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                pass
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        avail = self.psutil.virtual_memory().available
        if avail < self.floor:
            print(f"\nstopped: the machine has {avail / 2**30:.2f} GiB available (under {self.floor / 2**30:.1f}); "
                  f"peak RSS so far {', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in self.peak.items())}",
                  file=sys.__stderr__, flush=True)  # fmt: skip
            for p in self.proc.children(recursive=True):
                try:
                    p.kill()
                except self.psutil.Error:
                    pass
            os._exit(3)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.2)

    def __enter__(self) -> PeakRSS:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


PROMPTS = ["Explain this in your own words.", "Summarize the following.", "What does this mean?", "Rewrite this."]


def generate(n: int, pool: list[str], out: Path, shards: int = 1, jobs: int = 1) -> dict[str, str]:
    """Records: a prompt (a template with an item number, so prompts differ) and a generated answer; planted copies
    keep the prompt and edit the answer (one word, an appended sentence, case and whitespace). Written to `shards`
    files out-00.jsonl ... holding consecutive ranges of ids. With jobs == 1 one stream (seed 1) runs through all
    shards, so a copy near a shard boundary lands in the next shard; with jobs > 1 each shard is its own stream (seed
    1 + shard) written by one of `jobs` processes, and copies stay in their shard. Returns copy id -> kind."""
    per = -(-n // shards)
    if jobs <= 1:
        return _generate(pool, out, per, 1, 0, n)
    import multiprocessing as mp

    spans = [(pool, out, per, 1 + k, k * per, min(n, (k + 1) * per)) for k in range(shards)]
    with mp.get_context("fork").Pool(min(jobs, shards)) as workers:
        parts = workers.starmap(_generate, spans)
    return {k: v for part in parts for k, v in part.items()}


def _generate(pool: list[str], out: Path, per: int, seed: int, start: int, stop: int) -> dict[str, str]:
    """Ids start..stop-1 from one stream of `Texts(pool, seed)`, written to the shard files of `per` ids each."""
    from imitate.records import dumps

    planted: dict[str, str] = {}
    prompts: dict[int, str] = {}
    files: dict[int, object] = {}
    for i, (a, j, kind) in enumerate(Texts(pool, seed=seed)(stop - start), start):
        j = j + start if j >= 0 else -1
        prompts[i] = prompts[j] if j >= 0 else f"{PROMPTS[i % len(PROMPTS)]} (item {i})"
        if j >= 0:
            planted[f"r{i:08d}"] = kind
        if len(prompts) > 4000:
            prompts.pop(next(iter(prompts)))
        rec = {
            "id": f"r{i:08d}",
            "teacher": "bench:synthetic",
            "messages": [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": a}],
            "finish_reason": "stop",
            "usage": {"input_tokens": 10, "output_tokens": 100},
        }
        k = i // per
        if k not in files:
            files[k] = open(out.with_name(f"{out.stem}-{k:02d}.jsonl"), "w", encoding="utf-8")
        files[k].write(dumps(rec) + "\n")
    for fh in files.values():
        fh.close()
    return planted


def big_run(n: int, workers: int, keep: bool, pool: list[str], engines: list[str], shards: int) -> None:
    """The whole `imitate clean` on n generated records (in `shards` files, read through a glob) with each engine;
    the shards are generated by `workers` processes side by side."""
    from imitate.clean.stage import CleanConfig, run

    tmp = Path(tempfile.mkdtemp(prefix="imitate_bench_"))
    t = time.perf_counter()
    planted = generate(n, pool, tmp / "records.jsonl", shards, jobs=workers)
    t_gen = time.perf_counter() - t
    size = sum(f.stat().st_size for f in tmp.glob("records-*.jsonl"))
    print(f"\nfull `imitate clean` (default filters + exact + near dedup with the exact check) on {n} records, "
          f"{size / 1e9:.2f} GB in {shards} shard(s), {len(planted)} planted copies (generated in {t_gen:.0f} s by {min(workers, shards)} processes); "
          f"load average before: {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'engine':34}{'wall s':>9}{'CPU s':>9}{'rec/CPU s':>11}{'driver GiB':>12}{'workers GiB':>13}"
          f"{'ray daemons':>13}{'out':>10}{'same bytes':>12}")  # fmt: skip
    first = None
    for engine in engines:
        d = tmp / engine
        cfg = CleanConfig(inputs=[tmp / "records-*.jsonl"], out=d / "clean.jsonl", removed=d / "removed.jsonl",
                          workers=workers if engine == "local" else 1, engine=engine)  # fmt: skip
        if engine == "ray":
            import ray

            ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR")
        with PeakRSS() as rss:
            t, c = time.perf_counter(), cpu_of_tree()
            with open(os.devnull, "w") as null:
                err, sys.stderr = sys.stderr, null
                try:
                    summary = run(cfg)
                finally:
                    sys.stderr = err
            wall, cpu_s = time.perf_counter() - t, cpu_of_tree() - c
        if engine == "ray":
            ray.shutdown()
        out = (d / "clean.jsonl").read_bytes() + (d / "removed.jsonl").read_bytes()
        same = "-" if first is None else str(out == first)
        first = out if first is None else first
        gib = {k: v / 2**30 for k, v in rss.peak.items()}
        label = f"{engine} ({workers} {'workers' if engine == 'local' else 'Ray CPUs'})"
        print(f"{label:34}{wall:>9.1f}{cpu_s:>9.1f}{n / cpu_s:>11.0f}{gib['driver']:>12.2f}{gib['workers']:>13.2f}"
              f"{gib['ray daemons']:>13.2f}{summary['out']:>10}{same:>12}")  # fmt: skip
        timing = summary["timing"]
        print("    " + ", ".join(f"{k} {timing[k + '_wall_s']:.1f} s" for k in ("map", "cluster", "write")))
    caught = {}
    with (tmp / engines[0] / "removed.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            caught[r["id"]] = r["removed"]["filter"]
    print(f"  removed {json.dumps(summary['removed'])}")
    for kind in ("one word", "appended", "case/space"):
        ids = [i for i, k in planted.items() if k == kind]
        got = sum(i in caught for i in ids)
        print(f"  planted {kind:>10}: {len(ids):>8}, removed {got:>8} ({got / max(1, len(ids)):.3f})")
    print(f"  removed but not planted: {sum(i not in planted for i in caught)}; load average after: "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    if not keep:
        shutil.rmtree(tmp)


def cpu_of_tree() -> float:
    """CPU seconds (user + system) of this process and every process under it, alive or reaped: Ray's workers are not
    reaped children until Ray shuts down, so the live ones are read with psutil."""
    import psutil

    total = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for f in ("ru_utime", "ru_stime"))  # fmt: skip
    for p in psutil.Process().children(recursive=True):
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=0, help="also run `imitate clean` on this many records")
    ap.add_argument("--ours", type=int, default=100_000, help="texts for our rate and scores")
    ap.add_argument("--datasketch", type=int, default=20_000, help="texts for datasketch (and the side-by-side)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the generated files of the big run")
    ap.add_argument("--engines", default="local,ray", help="engines of the big run, comma-separated")
    ap.add_argument("--shards", type=int, default=4, help="files the big run's records are written to")
    ap.add_argument("--skip-compare", action="store_true", help="only the big run")
    args = ap.parse_args()
    pool = sentence_pool()
    print(f"{len(pool)} docstring sentences from {sysconfig.get_paths()['stdlib']}")
    if not args.skip_compare:
        compare(args.ours, args.datasketch, args.threshold, args.num_perm, pool)
    if args.records:
        big_run(args.records, args.workers, args.keep, pool, args.engines.split(","), args.shards)


if __name__ == "__main__":
    main()
