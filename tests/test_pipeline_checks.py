"""`imitate run` checks every section's options and every input file before the first stage runs: a mistake in a late
section costs nothing (the loopback teacher sees no request), and the message names the file, section and option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_server import FakeServer
from typer.testing import CliRunner

from imitate.cli import app

TRAIN_OK = 'student = "student-dir"\nout = "runs/student"\n'


@pytest.fixture
def server():
    with FakeServer(latency=0.0) as s:
        yield s


def pipeline(tmp: Path, server: FakeServer, clean: str = "", train: str = TRAIN_OK) -> Path:
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{n} plus {n}?"}) + "\n" for n in range(4)))
    (tmp / "student-dir").mkdir(exist_ok=True)
    (tmp / "student-dir" / "config.json").write_text("{}")
    p = tmp / "pipe.toml"
    p.write_text(f"""
[collect]
teacher = "openai:fake-model"
base-url = "{server.base_url}/v1"
prompts = "prompts.jsonl"
out = "runs/records.jsonl"
progress = false

[clean]
out = "runs/clean.jsonl"
{clean}
[train]
{train}""")
    return p


def run(p: Path, *args: str):
    return CliRunner().invoke(app, ["run", str(p), *args], env={"OPENAI_API_KEY": "k"})


@pytest.mark.parametrize("train, message", [
    (TRAIN_OK + 'kd = "kl"\n', "'kd' must be one of forward-kl, reverse-kl, jsd, got 'kl'"),
    (TRAIN_OK + "kd_weigth = 0.3\n", "unknown key 'kd_weigth'"),
    (TRAIN_OK + "kd-weight = 1.5\n", "--kd-weight must be >= 0 and <= 1, got 1.5"),
    (TRAIN_OK + "lora-r = 0\n", "--lora-r must be at least 1, got 0"),
    (TRAIN_OK + 'feature-kd = "auto"\n', "--feature-kd needs a local teacher"),  # a cross-field rule
    (TRAIN_OK + 'teacher = "openai:gpt-4o-mini"\n', "white-box distillation needs the teacher's weights"),
    (TRAIN_OK + 'chat-template = "missing.jinja"\n', "chat-template: "),
    ('student = "./no-such-student"\nout = "runs/s"\n', "student: "),
])
def test_a_bad_train_section_stops_the_run_before_collect_sends_anything(tmp_path, server, train, message):
    result = run(pipeline(tmp_path, server, train=train))
    assert result.exit_code == 2, result.output
    assert "Error:" in result.stderr and message in result.stderr, result.stderr
    assert "pipe.toml [train]" in result.stderr
    assert server.count() == 0 and not (tmp_path / "runs").exists()


def test_missing_input_files_of_a_later_stage_are_found_first(tmp_path, server):
    result = run(pipeline(tmp_path, server, clean='decontaminate = ["evals/test.jsonl"]\n'))
    assert result.exit_code == 2 and "[clean]: decontaminate:" in result.stderr and "test.jsonl" in result.stderr
    assert server.count() == 0


def test_outputs_of_earlier_stages_count_as_present(tmp_path, server):
    """clean's inputs and train's data are written by earlier stages: no error for them; the pipeline runs collect
    (against the loopback server) and stops only in train, whose student is not a real model."""
    result = run(pipeline(tmp_path, server), "--json")
    assert server.count() == 4
    report = json.loads(result.stdout)
    assert [r["status"] for r in report["runs"]] == ["ran", "ran", "failed"]


def test_stage_command_checks_options_before_work(tmp_path, server):
    """The single commands build the same checked configs: bounds from the field definitions, exit 2."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    for flag, value, message in (("--n", "0", "--n must be at least 1"),
                                 ("--top-p", "1.5", "--top-p must be > 0 and <= 1"),
                                 ("--retries", "-1", "--retries must be at least 0")):
        r = CliRunner().invoke(app, ["collect", "--teacher", "openai:m", "--base-url", server.base_url + "/v1",
                                     "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                                     flag, value], env={"OPENAI_API_KEY": "k"})
        assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert server.count() == 0
