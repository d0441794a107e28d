"""`imitate clean --engine ray` writes the same bytes as the local engine: on the shapes corpus, on shards with planted
duplicates across them (read through a glob), and when a Ray worker dies mid-run. All on one local Ray (2 CPUs)
shared by the tests of this file; without Ray, `--engine ray` is a clear error naming the extra."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
from test_clean_shapes import distinct_corpus, docstrings, planted, write
from typer.testing import CliRunner

from imitate.clean.ray_engine import line_ranges, read_range
from imitate.clean.scan import Mapper, _raw_chunks
from imitate.clean.stage import CleanConfig, run
from imitate.cli import app


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def both(tmp_path: Path, inputs: list, **kw) -> dict[str, dict]:
    """Run each engine into its own folder; returns engine -> (clean bytes, removed bytes, report without paths)."""
    out = {}
    for engine in ("local", "ray"):
        d = tmp_path / engine
        c = CleanConfig(inputs=inputs, out=d / "clean.jsonl", removed=d / "removed.jsonl", report=d / "report.json",
                        engine=engine, **kw)  # fmt: skip
        run(c)
        report = json.loads((d / "report.json").read_text())
        for k in ("timing", "outputs"):
            report.pop(k)
        for k in ("out", "removed", "report"):
            report["config"].pop(k)
        out[engine] = {"clean": c.out.read_bytes(), "removed": c.removed.read_bytes(), "report": report}
    return out


def test_line_ranges_cover_every_line_once(tmp_path):
    """Ranges of k lines, cut at newlines, with blank lines, CRLF, a lone \\r inside a line and no final newline:
    their lines are exactly the local engine's chunks' lines, numbered alike."""
    src = tmp_path / "x.jsonl"
    src.write_bytes(b'{"a": 1}\n\n{"b": "x\rstill b"}\r\n  \n{"c": 3}\n' * 7 + b'{"end": true}')
    want = [line for _, lines in _raw_chunks([src], 1000) for line in lines]
    for k in (1, 2, 3, 5, 1000):
        got = [line for p, s, e, ln in line_ranges([src], k) for line in read_range(p, s, e, ln)]
        assert got == want, k
    assert want[-1] == (36, b'{"end": true}') and (3, b'{"b": "x\rstill b"}\r\n') in want


def test_shapes_corpus_same_bytes(tmp_path, ray_cluster):
    rnd = random.Random(0)
    recs, fate = planted(distinct_corpus(rnd), rnd)
    src = write(tmp_path / "in.jsonl", recs + [{"id": "bad", "messages": "not a list"}])
    got = both(tmp_path, [src], chunk_size=40, drop_repetitive=False, on_bad_line="skip")
    assert got["ray"] == got["local"]
    removed = [json.loads(x) for x in got["ray"]["removed"].splitlines()]
    assert {r["id"]: (r["removed"]["filter"], r["removed"]["duplicate_of"]) for r in removed} == fate
    assert got["ray"]["report"]["bad_lines"] == 1


def shards(tmp_path: Path, n_shards: int = 3, per_shard: int = 400) -> tuple[list[Path], dict[str, str]]:
    """Shards of distinct records (docstring answers, sums); later shards hold copies and one-word edits of records of
    earlier shards. Returns the shard paths and copy id -> survivor id."""
    rnd = random.Random(7)
    docs = docstrings()
    fate: dict[str, str] = {}
    made: list[dict] = []
    paths = []
    for s in range(n_shards):
        recs = []
        for i in range(per_shard):
            rid = f"s{s}r{i}"
            if made and rnd.random() < 0.15:
                src = rnd.choice(made)
                cp = json.loads(json.dumps(src))
                words = cp["messages"][1]["content"].split(" ")
                if len(words) >= 20 and rnd.random() < 0.5:  # a one-word edit of a long answer, else an exact copy
                    words[rnd.randrange(len(words))] = "zebra"
                cp["messages"][1]["content"] = " ".join(words)
                cp["id"] = rid
                fate[rid] = src["id"]
            elif rnd.random() < 0.5:
                a, b = rnd.randrange(10**6), rnd.randrange(10**6)
                q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
                cp = {"id": rid, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}
            else:
                doc = " ".join(rnd.sample(docs, 2))
                cp = {"id": rid, "messages": [{"role": "user", "content": f"Explain {rid}."},
                                              {"role": "assistant", "content": doc}]}  # fmt: skip
            recs.append(cp)
        made += [r for r in recs if r["id"] not in fate]
        paths.append(write(tmp_path / f"shard-{s:02d}.jsonl", recs))
    return paths, fate


def test_band_shuffle_gives_the_local_edges(ray_cluster, monkeypatch):
    """Buckets of every size (random keys from a small range), hash-partitioned into 5+ partitions."""
    import numpy as np

    from imitate.clean import ray_engine
    from imitate.clean.dedup import candidate_edges

    monkeypatch.setattr(ray_engine, "ROWS_PER_PARTITION", 2000)
    keys = np.random.default_rng(0).integers(0, 400, (600, 21)).astype(np.uint64)
    keys[:80, 3] = 7  # one bucket of 80 > 50: a star
    for m in (0, 50):
        want = candidate_edges(keys, m)
        assert len(want) > 1000 and np.array_equal(ray_engine.shuffle_edges(keys, m), want)


def test_shards_through_a_glob_same_bytes(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.setattr("imitate.clean.ray_engine.ROWS_PER_PARTITION", 3000)  # the band shuffle: several partitions
    paths, fate = shards(tmp_path)
    got = both(tmp_path, [tmp_path / "shard-*.jsonl"], chunk_size=150, max_removed=0.9)
    assert got["ray"] == got["local"]
    assert got["ray"]["report"]["config"]["inputs"] == [str(p) for p in paths]
    removed = {r["id"]: r["removed"].get("duplicate_of") for r in map(json.loads, got["ray"]["removed"].splitlines())}
    across = [k for k in fate if k[:2] != fate[k][:2]]
    assert len(across) > 20 and all(k in removed for k in fate), sorted(set(fate) - set(removed))[:5]


def test_pipeline_engine_ray_and_its_mass_removal_stop(tmp_path, ray_cluster, monkeypatch):
    """`engine = "ray"` under [clean] of `imitate run`; the mass-removal stop behaves as locally (nothing written)."""
    from test_clean_shapes import mass_corpus

    from imitate.clean.ray_engine import RayEngine

    scans = []
    scan = RayEngine.scan
    monkeypatch.setattr(RayEngine, "scan", lambda self, *a: scans.append(1) or scan(self, *a))

    src = mass_corpus(tmp_path)
    pipe = tmp_path / "pipe.toml"
    body = f'inputs = ["{src.name}"]\ndrop-repetitive = false\nengine = "ray"\n'
    pipe.write_text(f'[clean]\n{body}out = "runs/clean.jsonl"\n')
    res = CliRunner().invoke(app, ["run", str(pipe), "--json"])
    assert res.exit_code == 1 and "40 of 60 records (66.7%)" in res.output
    assert not (tmp_path / "runs" / "clean.jsonl").exists()
    pipe.write_text(f'[clean]\n{body}max-removed = 0.7\nout = "runs/clean.jsonl"\n')
    res = CliRunner().invoke(app, ["run", str(pipe), "--json"])
    assert res.exit_code == 0, res.output
    local = tmp_path / "local.jsonl"
    run(CleanConfig(inputs=[src], out=local, drop_repetitive=False, max_removed=0.7))
    assert (tmp_path / "runs" / "clean.jsonl").read_bytes() == local.read_bytes()
    assert len(scans) == 2  # both pipeline runs mapped on Ray


class CrashOnce(Mapper):
    """A mapper whose worker process dies (os._exit, as a killed worker) the first time it meets a given line."""

    marker: str = ""

    def __call__(self, job):
        path, lines = job
        if lines and lines[0][0] == 301 and not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed")
            os._exit(1)
        return super().__call__(job)


def test_a_killed_worker_is_retried_and_the_output_is_the_same(tmp_path, ray_cluster, monkeypatch):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests
    paths, _ = shards(tmp_path, n_shards=2)
    want = both(tmp_path / "plain", paths, chunk_size=100, max_removed=0.9)["local"]
    monkeypatch.setattr(CrashOnce, "marker", str(tmp_path / "crashed"))
    monkeypatch.setattr("imitate.clean.stage.Mapper", CrashOnce)
    c = CleanConfig(inputs=paths, out=tmp_path / "c.jsonl", removed=tmp_path / "r.jsonl", engine="ray", chunk_size=100,
                    max_removed=0.9)  # fmt: skip
    run(c)
    assert (tmp_path / "crashed").exists()  # a worker did die
    assert c.out.read_bytes() == want["clean"] and c.removed.read_bytes() == want["removed"]


def test_engine_ray_without_ray_names_the_extra(tmp_path, monkeypatch):
    src = write(tmp_path / "in.jsonl", distinct_corpus(random.Random(1))[:5])
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    res = CliRunner().invoke(app, ["clean", str(src), "-o", str(tmp_path / "c.jsonl"), "--engine", "ray"])
    assert res.exit_code == 1, res.output
    assert "Error: --engine ray needs Ray Data" in res.stderr and "pip install 'imitate[ray]'" in res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "c.jsonl").exists()
