"""examples/takd.toml: teacher -> assistant (the teacher cut to half its layers, trained with KD) -> student (KD from
the assistant), beside direct KD; valid as shipped and runnable end to end on the demo teacher, cut down."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from test_demo import DATA, ROOT, _toml

EXAMPLE = ROOT / "examples" / "takd.toml"


def test_takd_pipeline_is_valid_and_chains_the_assistant_into_the_student():
    from imitate import pipeline as pl

    runs = {r.name: r for r in pl.load_pipeline(EXAMPLE)}
    assert [n for n in runs if n.startswith("train.")] == ["train.assistant", "train.takd", "train.direct"]
    cut = Path(runs["init-student"].cfg.out)
    assert Path(runs["train.assistant"].cfg.student) == cut  # the assistant starts from the cut teacher
    assert runs["init-student"].cfg.layers == 2
    assistant = Path(runs["train.assistant"].cfg.out)
    assert runs["train.takd"].cfg.teacher == f"hf:{assistant}"  # resolved from the file before it exists
    assert runs["train.direct"].cfg.teacher == runs["train.assistant"].cfg.teacher
    assert Path(runs["eval.takd"].cfg.model) == Path(runs["train.takd"].cfg.out)


def test_mini_takd(tmp_path):
    """The example with 40 prompts, 4 steps per run and 20 eval numbers: every run succeeds, in order."""
    from typer.testing import CliRunner

    from imitate.cli import app

    spec = tomllib.loads(EXAMPLE.read_text())
    for name, n in (("numbers_train.jsonl", 40), ("numbers_eval.jsonl", 20)):
        (tmp_path / name).write_text("".join((DATA / name).read_text().splitlines(keepends=True)[:n]))
    teacher = "hf:" + str((ROOT / "data" / "demo_teacher").resolve())
    spec["collect"].update(prompts=str(tmp_path / "numbers_train.jsonl"), teacher=teacher,
                           out=str(tmp_path / "runs" / "collected.jsonl"))
    spec["clean"].update(out=str(tmp_path / "runs" / "clean.jsonl"), decontaminate=[str(tmp_path / "numbers_eval.jsonl")])
    spec["init-student"].update(teacher=teacher, out=str(tmp_path / "runs" / "assistant-init"))
    spec["train"].pop("epochs")
    spec["train"]["max-steps"] = 4
    student = str((ROOT / "data" / "demo_student").resolve())
    spec["train"]["assistant"].update(teacher=teacher, out=str(tmp_path / "runs" / "assistant"))
    spec["train"]["takd"].update(student=student, teacher=f"hf:{tmp_path / 'runs' / 'assistant'}",
                                 out=str(tmp_path / "runs" / "takd"))
    spec["train"]["direct"].update(student=student, teacher=teacher, out=str(tmp_path / "runs" / "direct"))
    spec["eval"]["prompts"] = str(tmp_path / "numbers_eval.jsonl")
    for name in ("assistant", "takd", "direct"):
        spec["eval"][name]["out"] = str(tmp_path / "runs" / f"eval-{name}.jsonl")
    p = tmp_path / "takd.toml"
    p.write_text(_toml(spec))
    result = CliRunner().invoke(app, ["run", str(p), "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [r["name"] for r in runs] == ["collect", "clean", "init-student", "train.assistant", "train.takd",
                                         "train.direct", "eval.assistant", "eval.takd", "eval.direct"]
    assert {r["status"] for r in runs} == {"ran"}
    by = {r["name"]: r for r in runs}
    assert by["train.takd"]["summary"]["distill"]["teacher"] == f"hf:{tmp_path / 'runs' / 'assistant'}"
    assert by["eval.takd"]["summary"]["n"] == 20
