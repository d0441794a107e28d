"""--max-cost: refused before anything is sent when the worst case is over it (exit 4, with the estimate), and a hard
stop while running when the provider bills more than estimated (live and batch); `imitate run` stops on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate.cli import app

KNOWN = "openai:gpt-4o-mini"  # in the price table: 0.15 / 0.60 USD per million tokens live


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def prompts(path: Path, n: int) -> Path:
    kinds = ["What is {i} + {i}?", "Écris un haïku sur le nombre {i}.", "def f{i}(x): return x  # explain", "ok {i}"]
    path.write_text("".join(json.dumps({"prompt": kinds[i % 4].format(i=i)}) + "\n" for i in range(n)))
    return path


def collect(*args: str):
    return CliRunner().invoke(app, ["collect", *args])


def base(server, tmp_path, n: int, teacher: str = KNOWN, *extra: str) -> list[str]:
    return ["--teacher", teacher, "--prompts", str(prompts(tmp_path / "p.jsonl", n)), "--out",
            str(tmp_path / "out.jsonl"), "--base-url", server.base_url + "/v1", "--no-progress",
            "--poll-interval", "0.001", "--poll-max", "0.01", *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def worst_case(server, tmp_path, n: int, *extra: str) -> float:
    dry = collect(*base(server, tmp_path, n, KNOWN, "--dry-run", "--json", *extra))
    assert dry.exit_code == 0, dry.output
    return json.loads(dry.stdout)["est_cost_max_usd"]


def test_refused_up_front_with_the_estimate_and_nothing_sent(server, tmp_path):
    worst = worst_case(server, tmp_path, 12, "--max-tokens", "200")
    r = collect(*base(server, tmp_path, 12, KNOWN, "--max-tokens", "200", "--max-cost", f"{worst * 0.9:.8f}"))
    assert r.exit_code == 4, r.output
    assert f"could cost up to ${worst:.4f}" in r.stderr and "nothing was sent" in r.stderr
    assert "Hint:" in r.stderr and "--batch costs half" in r.stderr
    assert server.count() == 0 and not lines(tmp_path / "out.jsonl")


def test_batch_half_price_fits_where_live_does_not(server, tmp_path):
    worst = worst_case(server, tmp_path, 10, "--max-tokens", "300")
    budget = f"{worst * 0.75:.8f}"  # under the live worst case, over the batch one (half)
    live = collect(*base(server, tmp_path, 10, KNOWN, "--max-tokens", "300", "--max-cost", budget))
    assert live.exit_code == 4 and server.count() == 0
    batch = collect(*base(server, tmp_path, 10, KNOWN, "--max-tokens", "300", "--max-cost", budget, "--batch", "--json"))
    assert batch.exit_code == 0, batch.output
    s = json.loads(batch.stdout)
    assert s["completed"] == 10 and s["not_sent"] == 0 and s["cost_usd"] <= float(budget)
    assert server.batch.batch_requests["openai"] == 10


def test_max_cost_needs_prices(server, tmp_path):
    r = collect(*base(server, tmp_path, 3, "openai:no-such-model", "--max-cost", "1"))
    assert r.exit_code == 2 and "--price-in" in r.stderr
    r = collect(*base(server, tmp_path, 3, "openai:no-such-model", "--max-cost", "1", "--price-in", "1",
                      "--price-out", "2", "--json"))
    assert r.exit_code == 0 and json.loads(r.stdout)["completed"] == 3


def test_live_stops_when_the_provider_bills_more_than_estimated(server, tmp_path):
    """The estimate passes, but the server bills 3000 extra input tokens a request (a tokenizer that counts more
    than chars/4): the run stops sending, keeps what it collected, exits 4 naming what is left; a re-run with more
    budget sends only what is left."""
    server.extra_input_tokens = 3000
    per_request = 3000 * 0.15e-6  # the extra alone, USD
    budget = 4.5 * per_request
    r = collect(*base(server, tmp_path, 20, KNOWN, "--max-tokens", "8", "--max-cost", f"{budget:.8f}",
                      "--concurrency", "1", "--json"))
    assert r.exit_code == 4, r.output
    s = json.loads(r.stdout)
    got = lines(tmp_path / "out.jsonl")
    # 4 requests fit the budget; a 5th still looks cheap by its estimate, so it may go; never a 6th
    assert 4 <= s["completed"] == len(got) <= 5 and s["not_sent"] == 20 - len(got) == 20 - server.count()
    assert f"{s['not_sent']} request(s) not sent" in r.stderr and "--max-cost" in r.stderr
    assert s["cost_usd"] <= budget + per_request  # at most the one request in flight beyond its estimate
    first = server.count()
    again = collect(*base(server, tmp_path, 20, KNOWN, "--max-tokens", "8", "--max-cost", "1", "--json"))
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["sent"] == 20 - first and server.count() == 20
    assert len({r["id"] for r in lines(tmp_path / "out.jsonl")}) == 20


def test_live_stop_with_concurrency_keeps_in_flight_answers(server, tmp_path):
    server.extra_input_tokens = 3000
    budget = 10 * 3000 * 0.15e-6
    r = collect(*base(server, tmp_path, 40, KNOWN, "--max-tokens", "8", "--max-cost", f"{budget:.8f}",
                      "--concurrency", "8", "--json"))
    assert r.exit_code == 4, r.output
    s = json.loads(r.stdout)
    assert s["completed"] == len(lines(tmp_path / "out.jsonl")) == server.count() and s["not_sent"] == 40 - s["sent"]
    assert 0 < s["completed"] < 40


def test_batch_retry_round_stops_at_the_budget(server, tmp_path):
    """Round 1 bills far more than estimated; the retry batch for its errored rows no longer fits: not submitted."""
    server.extra_input_tokens = 3000
    for needle in ("+ 4?", "+ 8?"):
        server.batch_faults[needle] = ["500", 1]
    # worst case up front: 12 x 400 output tokens at 0.30/M = $0.00144, fits; round 1 bills 10 x 3000 input tokens at
    # 0.075/M = $0.00225; the retry's worst case (2 x 400 output tokens, $0.00024) would pass $0.0023
    budget = 0.0023
    r = collect(*base(server, tmp_path, 12, KNOWN, "--batch", "--max-tokens", "400", "--max-cost", f"{budget}",
                      "--json"))
    assert r.exit_code == 4, r.output
    s = json.loads(r.stdout)
    assert s["completed"] == 10 and s["not_sent"] == 2 and server.batch.batch_requests["openai"] == 12
    assert s["cost_usd"] <= budget
    again = collect(*base(server, tmp_path, 12, KNOWN, "--batch", "--max-tokens", "400", "--json"))
    assert again.exit_code == 0 and len(lines(tmp_path / "out.jsonl")) == 12
    assert server.batch.batch_requests["openai"] == 14  # only the 2 left were submitted


def test_pipeline_stops_on_exit_4(server, tmp_path):
    prompts(tmp_path / "prompts.jsonl", 6)
    (tmp_path / "pipeline.toml").write_text(
        f"""[collect]
teacher = "{KNOWN}"
prompts = "prompts.jsonl"
out = "runs/collected.jsonl"
base-url = "{server.base_url}/v1"
max-cost = 0.0000001
progress = false

[clean]
out = "runs/clean.jsonl"
"""
    )
    r = CliRunner().invoke(app, ["run", str(tmp_path / "pipeline.toml"), "--json"])
    assert r.exit_code == 4, r.output
    runs = {x["name"]: x for x in json.loads(r.stdout)["runs"]}
    assert runs["collect"]["status"] == "over_budget" and "--max-cost" in runs["collect"]["error"]
    assert runs["clean"]["status"] == "not_run" and server.count() == 0
    human = CliRunner().invoke(app, ["run", str(tmp_path / "pipeline.toml")])
    assert human.exit_code == 4 and "over budget" in human.stdout
