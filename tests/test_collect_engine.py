"""Engine pieces without HTTP: batching for local teachers, the hf hand-off, the limiter, retry timing, the journal."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from pathlib import Path

import pytest

from imitate.collect.limiter import Bucket, RateLimiter, RetryPolicy, retry_after
from imitate.collect.stage import CollectConfig, make_teacher, run
from imitate.collect.teachers import Completion


class BatchTeacher:
    """A stand-in for the hf teacher: records the batches it is given and how many run at once."""

    def __init__(self, model, **opts):
        self.spec, self.opts, self.batch_size = f"hf:{model}", opts, opts.get("batch_size", 4)
        self.batches, self.running, self.peak = [], 0, 0

    async def complete(self, requests):
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.001)
        self.running -= 1
        self.batches.append(requests)
        t = requests[0].params["temperature"]
        return [Completion(f"local answer {r.messages[-1]['content']} t={t}", "stop", 3, 4) for r in requests]

    async def aclose(self):
        pass


@pytest.fixture
def fake_local(monkeypatch):
    made = []
    mod = types.ModuleType("imitate.collect.teachers.local")

    def factory(model, **opts):
        made.append(BatchTeacher(model, **opts))
        return made[-1]

    mod.LocalTeacher = factory
    monkeypatch.setitem(sys.modules, "imitate.collect.teachers.local", mod)
    return made


def test_hf_teacher_gets_agreed_kwargs_and_batches(fake_local, tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("".join(f"prompt {i}\n" for i in range(10)))
    cfg = CollectConfig(
        teacher="hf:./tiny",
        prompts=p,
        out=tmp_path / "o.jsonl",
        batch_size=4,
        n=2,
        temperature=0.0,
        trust_remote_code=True,
        progress=False,
    )
    s = run(cfg)
    t = fake_local[0]
    assert t.opts == {"device": None, "batch_size": 4, "trust_remote_code": True}
    assert [len(b) for b in t.batches] == [4, 4, 4, 4, 4] and t.peak == 1
    assert s["completed"] == 20 and s["cost_usd"] == 0.0
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in recs}) == 20 and all(r["params"]["temperature"] == 0.0 for r in recs)
    assert recs[0]["usage"] == {"input_tokens": 3, "output_tokens": 4}


def test_dry_run_does_not_load_a_local_teacher(fake_local, tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a\nb\n")
    s = run(CollectConfig(teacher="hf:./tiny", prompts=p, out=tmp_path / "o.jsonl", dry_run=True, progress=False))
    assert s["would_send"] == 2 and fake_local == []


def test_bucket_paces_requests_with_a_fake_clock():
    now = [0.0]
    b = Bucket(per_minute=120, clock=lambda: now[0])  # 2 per second, bucket of 2
    assert b.wait_time(1) == 0
    b.take(1)
    b.take(1)
    assert b.wait_time(1) == pytest.approx(0.5)
    now[0] += 0.5
    assert b.wait_time(1) == 0
    b.take(1)
    big = Bucket(per_minute=600, clock=lambda: now[0])  # 10/s: a cost of 25 is allowed but leaves a debt
    big.take(25)
    assert big.wait_time(1) == pytest.approx(1.6)  # from -15 back to +1 at 10/s


def test_rate_limiter_holds_rpm():
    async def go():
        lim = RateLimiter(rpm=1200)  # 20/s, bucket of 20
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(30):
            await lim.acquire(1, 0)
        return loop.time() - t0

    assert asyncio.run(go()) >= 0.45  # the 10 beyond the bucket need >= 0.5 s at 20/s (minus clock slack)


def test_retry_after_parsing_and_delay():
    class R:
        def __init__(self, h):
            self.headers = h

    class E(Exception):
        def __init__(self, h):
            self.response = R(h)

    assert retry_after(E({"retry-after": "3"})) == 3.0
    assert retry_after(E({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert retry_after(E({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0  # a date in the past
    assert retry_after(E({"retry-after": "soon"})) is None and retry_after(E({})) is None
    p = RetryPolicy(retries=3, base=0.5, cap=4.0)
    delays = [p.delay(10, None) for _ in range(200)]
    assert max(delays) <= 4.0 and min(delays) >= 0 and len(set(delays)) > 100  # jittered and capped
    assert all(7.0 <= p.delay(0, 7.0) <= 8.4 for _ in range(50))  # Retry-After honoured, lightly jittered


def test_journal_group_commit_and_finished_ids(tmp_path):
    from imitate.collect.journal import Journal, finished_ids

    path = tmp_path / "j.jsonl"

    async def go():
        j = Journal(path)
        for i in range(50):
            j.put({"id": f"r{i}"})
            if i % 7 == 0:
                await asyncio.sleep(0)
        await j.close()
        return j.written

    assert asyncio.run(go()) == 50
    with path.open("a") as fh:
        fh.write('{"id": "torn')
    assert finished_ids(path) == {f"r{i}" for i in range(50)}
    assert path.read_text().endswith("}\n")


def test_api_teachers_do_not_retry_by_themselves(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    t, _ = make_teacher(CollectConfig(teacher="openai:m", out=Path("x.jsonl"), prompts=Path("p")))
    a, _ = make_teacher(CollectConfig(teacher="anthropic:m", out=Path("x.jsonl"), prompts=Path("p")))
    assert t.client.max_retries == 0 and a.client.max_retries == 0
    asyncio.run(t.aclose())
    asyncio.run(a.aclose())


def test_collect_with_a_tiny_local_teacher(tiny_teacher_dir, tmp_path):
    """The real hf teacher end to end: batched, greedy at temperature 0, top-K logprobs with token ids."""
    from typer.testing import CliRunner

    from imitate.cli import app

    p = tmp_path / "p.txt"
    p.write_text("What is the capital of France?\nWrite 347 in words.\nhello world\n")
    out = tmp_path / "o.jsonl"
    args = [
        "collect",
        "--teacher",
        f"hf:{tiny_teacher_dir}",
        "--prompts",
        str(p),
        "--out",
        str(out),
        "--n",
        "2",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--logprobs",
        "2",
        "--batch-size",
        "4",
        "--json",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["completed"] == 6
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    answers: dict = {}
    for rec in recs:
        answers.setdefault(rec["source"]["prompt"], set()).add(rec["messages"][-1]["content"])
        assert 1 <= len(rec["logprobs"]) <= rec["usage"]["output_tokens"]
        assert isinstance(rec["logprobs"][0]["id"], int) and len(rec["logprobs"][0]["top"]) == 2
    assert all(len(v) == 1 for v in answers.values())  # temperature 0: both samples are the greedy answer
    assert json.loads(CliRunner().invoke(app, args).stdout)["cached"] == 6


def test_teachers_with_injected_sdk_clients_over_http():
    """The adapters alone: n choices in one call, and an unreadable body becomes MalformedResponse (retryable)."""
    import anthropic
    import openai
    from fake_server import FakeServer

    from imitate.collect.limiter import MalformedResponse, classify
    from imitate.collect.teachers import Request
    from imitate.collect.teachers.anthropic import AnthropicTeacher
    from imitate.collect.teachers.openai import OpenAITeacher

    async def go(base):
        o = OpenAITeacher("m", client=openai.AsyncOpenAI(api_key="k", base_url=base + "/v1", max_retries=0))
        a = AnthropicTeacher("c", client=anthropic.AsyncAnthropic(api_key="k", base_url=base, max_retries=0))
        req = Request("id", [{"role": "user", "content": "two words"}], {"temperature": 0.3, "max_tokens": 3})
        outs = await o.complete([req, Request("id2", req.messages, req.params, 1)])
        one = await a.complete([req])
        server.enqueue("malformed")
        with pytest.raises(Exception) as err:
            await o.complete([req])
        await o.aclose()
        await a.aclose()
        return outs, one, err.value

    with FakeServer() as server:
        outs, one, err = asyncio.run(go(server.base_url))
    assert [c.text for c in outs] == ["Answer to: two", "Answer to: two"] and outs[0].finish_reason == "length"
    assert outs[0].extra["billed"] == (2, 6) and outs[1].extra["billed"] == (0, 0)
    assert one[0].text == "Answer to: two" and one[0].finish_reason == "length"
    assert isinstance(err, (MalformedResponse, json.JSONDecodeError)) and classify(err)[0] == "retry"
    assert server.history[0]["body"]["n"] == 2
