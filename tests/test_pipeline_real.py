"""`imitate run` end to end with the real stages on tiny random models (a few seconds of CPU per run)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from imitate.cli import app


def write_pipeline(tmp: Path, teacher: Path, student: Path, min_score: float) -> Path:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Write {n} in words."}) + "\n" for n in (3, 14, 159, 2653, 58, 979))
    )
    (tmp / "eval.jsonl").write_text("".join(json.dumps({"prompt": f"Write {n} in words."}) + "\n" for n in (7, 42)))
    p = tmp / "pipe.toml"
    p.write_text(f"""
[collect]
teacher = "hf:{teacher}"
prompts = "prompts.jsonl"
out = "runs/collected.jsonl"
temperature = 0
max-tokens = 6
progress = false

[clean]
out = "runs/clean.jsonl"
drop-truncated = false      # a random teacher never stops by itself
drop-repetitive = false

[train]
student = "{student}"
out = "runs/student"
full = true
max-steps = 2
batch-size = 4
eval-split = 0
save-every = 0
progress = false

[eval]
prompts = "eval.jsonl"
teacher = "hf:{teacher}"
max-tokens = 6
min-score = {min_score}
out = "runs/eval.jsonl"
""")
    return p


def run(*args) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["run", *map(str, args), "--json"])
    assert result.exit_code in (0, 3), result.output
    return result.exit_code, json.loads(result.stdout)


def test_real_stages_run_skip_and_gate(tmp_path, tiny_teacher_dir, tiny_model_dir):
    p = write_pipeline(tmp_path, tiny_teacher_dir, tiny_model_dir, min_score=0.0)
    code, first = run(p)
    assert code == 0
    assert [(r["name"], r["status"]) for r in first["runs"]] == [
        ("collect", "ran"),
        ("clean", "ran"),
        ("train", "ran"),
        ("eval", "ran"),
    ]
    assert first["runs"][0]["summary"]["completed"] == 6
    assert first["runs"][3]["summary"]["n"] == 2
    assert (tmp_path / "runs" / "student.manifest.json").exists()

    code, second = run(p)
    assert code == 0 and {r["status"] for r in second["runs"]} == {"skipped"}

    # one new prompt: collect sends only that request, and everything after it re-runs
    with (tmp_path / "prompts.jsonl").open("a") as fh:
        fh.write(json.dumps({"prompt": "Write 8979 in words."}) + "\n")
    p.write_text(p.read_text().replace("min-score = 0.0", "min-score = 1.0"))  # no random student matches its teacher
    code, third = run(p)
    assert code == 3
    collect = third["runs"][0]
    assert collect["status"] == "ran" and collect["summary"]["sent"] == 1 and collect["summary"]["cached"] == 6
    assert [r["status"] for r in third["runs"]] == ["ran", "ran", "ran", "gate_failed"]
    assert third["runs"][3]["summary"]["score"] < 1.0  # the eval summary survives a failed gate
    assert (tmp_path / "runs" / "eval.jsonl").exists()
