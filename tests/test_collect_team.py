"""`imitate collect` with several teachers over the loopback server: an openai-compatible and an anthropic teacher
answer every prompt and sample; one of them fails for a while (or for good); resume per teacher; never paid twice."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate.cli import app
from imitate.collect.stage import CollectConfig, run
from imitate.errors import BudgetExceeded

OA, AN = "openai:fake-a", "anthropic:fake-b"
PROMPTS = [  # shapes the team code was not written for: numbers, code, words, non-English, multi-turn, long
    {"prompt": "What is 17 * 23?"},
    {"prompt": "Write a Python function that reverses a list."},
    {"prompt": "Spell out 4821 in words."},
    {"prompt": "Übersetze: the cat sleeps."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Name three rivers."}]},
    {"prompt": "Tell a long story: " + "and then " * 30},
]


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    import functools

    from imitate.collect.limiter import RetryPolicy

    monkeypatch.setattr("imitate.collect.engine.RetryPolicy", functools.partial(RetryPolicy, base=0.01))


@pytest.fixture
def server(monkeypatch):
    with FakeServer(retry_after=0.01) as s:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", s.base_url)  # --base-url belongs to the openai: teachers
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key-b")
        yield s


def prompts(tmp_path: Path) -> Path:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PROMPTS), encoding="utf-8")
    return p


def cfg(server, tmp_path, teacher=(OA, AN), **kw) -> CollectConfig:
    kw.setdefault("prompts", prompts(tmp_path))
    return CollectConfig(teacher=list(teacher) if len(teacher) > 1 else teacher[0], out=tmp_path / "out.jsonl",
                         base_url=server.base_url + "/v1", progress=False, **kw)


def read(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def sent(server, kind: str) -> int:
    return sum(1 for h in server.history if h["kind"] == kind)


def test_every_prompt_and_sample_of_each_teacher_while_one_fails_for_a_while(server, tmp_path):
    server.enqueue(*["500"] * 4, kind="anthropic")  # the anthropic teacher fails its first 4 calls
    s = run(cfg(server, tmp_path, n=2, retries=6, concurrency=2))
    recs = read(tmp_path / "out.jsonl")
    assert Counter(r["teacher"] for r in recs) == {OA: 12, AN: 12}  # 6 prompts x 2 samples each
    assert len({r["id"] for r in recs}) == 24
    for t in (OA, AN):  # the same student views from both teachers
        views = Counter(json.dumps(r["messages"][:-1]) for r in recs if r["teacher"] == t)
        assert len(views) == 6 and set(views.values()) == {2}
    assert s["completed"] == 24 and s["failed"] == 0
    assert s["teachers"][AN]["retries"] == 4 and s["teachers"][OA]["retries"] == 0
    assert s["teachers"][OA]["completed"] == s["teachers"][AN]["completed"] == 12
    # openai draws both samples of a prompt in one call (n=2); anthropic asks once per sample, plus the 4 failures
    assert sent(server, "openai") == 6 and sent(server, "anthropic") == 12 + 4


def test_a_teacher_failing_for_good_leaves_the_other_done_and_a_rerun_asks_only_it(server, tmp_path):
    server.enqueue(*["500"] * 50, kind="anthropic")
    c = cfg(server, tmp_path, retries=1, concurrency=1)
    s = run(c)
    assert s["teachers"][OA]["completed"] == 6 and s["teachers"][AN]["failed"] == 6
    fails = read(tmp_path / "out.failures.jsonl")
    assert {f["teacher"] for f in fails} == {AN} and len(fails) == 6
    server.kind_faults.clear()
    before = sent(server, "openai"), sent(server, "anthropic")
    s2 = run(c)
    assert sent(server, "openai") == before[0]  # never asked again: paid once
    assert sent(server, "anthropic") == before[1] + 6
    assert s2["teachers"][OA]["cached"] == 6 and s2["teachers"][AN]["completed"] == 6
    assert Counter(r["teacher"] for r in read(c.out)) == {OA: 6, AN: 6}
    assert not (tmp_path / "out.failures.jsonl").exists()
    s3 = run(c)  # everything answered: nothing is sent
    assert s3["cached"] == 12 and s3["sent"] == 0 and len(server.history) == before[0] + before[1] + 6


def test_adding_a_teacher_resumes_the_first_and_asks_only_the_new_one(server, tmp_path):
    run(cfg(server, tmp_path, teacher=(OA,)))
    assert sent(server, "openai") == 6
    s = run(cfg(server, tmp_path))
    assert sent(server, "openai") == 6 and sent(server, "anthropic") == 6
    assert s["teachers"][OA]["cached"] == 6 and s["teachers"][AN]["completed"] == 6
    # a torn last line (kill -9 mid-write) is cut and only that record is asked again
    out = tmp_path / "out.jsonl"
    data = out.read_bytes()
    last = read(out)[-1]
    out.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1] + b'{"id": "x", "teach')
    s2 = run(cfg(server, tmp_path))
    assert s2["completed"] == 1 and s2["teachers"][last["teacher"]]["completed"] == 1
    assert len(read(out)) == 12 and len({r["id"] for r in read(out)}) == 12


def test_budget_is_one_pot_for_all_teachers(server, tmp_path):
    prices = dict(price_in=1.0, price_out=1.0, max_tokens=100)  # worst case per request ~ 100e-6 + input
    one = cfg(server, tmp_path, teacher=(OA,), max_cost=0.0009, **prices)
    assert run(one)["completed"] == 6  # one teacher's worst case fits
    (tmp_path / "out.jsonl").unlink()
    with pytest.raises(BudgetExceeded) as exc:  # both teachers together could pass it: refused, nothing sent
        run(cfg(server, tmp_path, max_cost=0.0009, **prices))
    assert "12 request(s)" in exc.value.message and not read(tmp_path / "out.jsonl")
    assert len(server.history) == 6


def test_cli_repeated_flag_toml_list_dry_run_and_per_teacher_table(server, tmp_path):
    p = prompts(tmp_path)
    base = ["--prompts", str(p), "--out", str(tmp_path / "o.jsonl"), "--base-url", server.base_url + "/v1",
            "--no-progress", "--json"]
    dry = CliRunner().invoke(app, ["collect", "--teacher", OA, "--teacher", AN, "--n", "3", "--dry-run", *base])
    assert dry.exit_code == 0, dry.output
    d = json.loads(dry.stdout)
    assert d["would_send"] == 36 and set(d["teachers"]) == {OA, AN} and not server.history
    assert "per teacher" in dry.stderr and "total" in dry.stderr
    toml = tmp_path / "c.toml"
    toml.write_text(f'[collect]\nteacher = ["{OA}", "{AN}"]\nprompts = "p.jsonl"\nout = "o.jsonl"\n'
                    f'base-url = "{server.base_url}/v1"\nprogress = false\n')
    r = CliRunner().invoke(app, ["collect", "--config", str(toml), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["completed"] == 12 and s["teachers"][AN]["completed"] == 6
    assert OA in r.stderr and AN in r.stderr and "USD" in r.stderr
    twice = CliRunner().invoke(app, ["collect", "--teacher", OA, "--teacher", OA, *base])
    assert twice.exit_code == 2 and "given twice" in twice.stderr and "Traceback" not in twice.output


def test_one_teacher_in_a_toml_list_is_a_plain_single_teacher_run(server, tmp_path):
    c = CollectConfig(teacher=[OA], out=tmp_path / "o.jsonl", prompts=prompts(tmp_path),
                      base_url=server.base_url + "/v1", progress=False)
    assert c.teacher == OA
    s = run(c)
    assert s["teacher"] == OA and "teachers" not in s and s["completed"] == 6


def test_batch_mode_per_provider_and_rerun_never_submits_twice(server, tmp_path):
    c = cfg(server, tmp_path, batch=True, poll_interval=0.001, poll_max=0.01)
    s = run(c)
    assert s["teachers"][OA]["batches"] == 1 and s["teachers"][AN]["batches"] == 1
    assert server.batch.batch_requests == {"openai": 6, "anthropic": 6}
    assert Counter(r["teacher"] for r in read(c.out)) == {OA: 6, AN: 6}
    run(c)
    assert server.batch.batch_requests == {"openai": 6, "anthropic": 6}


def test_self_instruct_tasks_come_from_the_first_teacher_and_every_teacher_answers(server, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": f"Seed task number {w} please"}) + "\n" for w in "abcd"))
    c = cfg(server, tmp_path, prompts=None, self_instruct=5, seed_tasks=seeds, concurrency=2)
    s = run(c)
    recs = read(c.out)
    assert s["self_instruct"]["generated"] == 5 and Counter(r["teacher"] for r in recs) == {OA: 5, AN: 5}
    asked = {t: {r["messages"][-2]["content"] for r in recs if r["teacher"] == t} for t in (OA, AN)}
    assert asked[OA] == asked[AN]
    gen = [h for h in server.history if "numbered list" in json.dumps(h["body"])]
    assert gen and all(h["kind"] == "openai" for h in gen)
    before = len(server.history)
    assert run(c)["sent"] == 0 and len(server.history) == before


def test_no_wait_then_cancel_with_only_out_cancels_every_teachers_batches(server, tmp_path):
    c = cfg(server, tmp_path, batch=True, wait=False, poll_interval=0.001, poll_max=0.01)
    s = run(c)
    assert s["pending"] == 12 and s["completed"] == 0
    r = CliRunner().invoke(app, ["collect", "--out", str(c.out), "--cancel", "--base-url", server.base_url + "/v1",
                                 "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["teachers"]) == {OA, AN}
    assert len(server.batch.batches) == 2 and all(b["cancelled"] for b in server.batch.batches.values())
