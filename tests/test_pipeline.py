"""`imitate run`: chaining, skipping by content hash, --force/--only/--from, exit codes and config errors.

The stages here are small fake modules (same contract as the real ones: a frozen config dataclass + `run(cfg) -> dict`)
put in sys.modules, so these tests check the pipeline's own logic in a few seconds. tests/test_pipeline_real.py runs
the real stages on tiny models.
"""

from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imitate import manifest as mf
from imitate import pipeline as pl
from imitate.cli import app
from imitate.config import path_field
from imitate.errors import ConfigError, GateFailed, ImitateError

CALLS: list[str] = []


@dataclass(frozen=True)
class CollectConfig:
    prompts: Path = path_field()
    out: Path = path_field()
    teacher: str = "fake:upper"
    temperature: float = 0.0


def collect_run(cfg: CollectConfig) -> dict:
    CALLS.append("collect")
    rows = [json.loads(x) for x in Path(cfg.prompts).read_text().splitlines() if x.strip()]
    recs = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["prompt"].upper()}]}
        for r in rows
    ]
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text("".join(json.dumps(r) + "\n" for r in recs))
    print("collect says hello on stdout")  # must not end up in --json output
    return {"records": len(recs), "teacher": cfg.teacher}


@dataclass(frozen=True)
class CleanConfig:
    inputs: list[Path] = path_field([])
    out: Path = path_field()
    removed: Path | None = path_field()
    min_chars: int = 0


def clean_run(cfg: CleanConfig) -> dict:
    CALLS.append("clean")
    lines: list[str] = []
    for p in cfg.inputs:
        lines += [x for x in Path(p).read_text().splitlines() if x.strip()]
    kept = list(dict.fromkeys(x for x in lines if len(x) >= cfg.min_chars))
    Path(cfg.out).write_text("".join(x + "\n" for x in kept))
    if cfg.removed:
        Path(cfg.removed).write_text("")
    return {"records_in": len(lines), "records_out": len(kept)}


@dataclass(frozen=True)
class TrainConfig:
    data: list[Path] = path_field([])
    student: str = ""  # a plain string, like the real one (a directory or a hub id)
    out: Path = path_field()
    lr: float = 1e-3
    teacher: str | None = None
    fail: str | None = None  # "imitate" raises ImitateError, "bug" raises ValueError


def train_run(cfg: TrainConfig) -> dict:
    CALLS.append("train:" + Path(cfg.out).name)
    if cfg.fail == "imitate":
        raise ImitateError("student diverged", hint="lower --lr")
    if cfg.fail == "bug":
        raise ValueError("boom")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n = sum(len(Path(d).read_text().splitlines()) for d in cfg.data)
    (out / "model.json").write_text(json.dumps({"n": n, "lr": cfg.lr, "teacher": cfg.teacher}))
    return {"steps": n, "final_loss": 0.5}


@dataclass(frozen=True)
class EvalConfig:
    model: Path = path_field()
    prompts: Path = path_field()
    out: Path | None = path_field()
    min_score: float | None = None


def eval_run(cfg: EvalConfig) -> dict:
    CALLS.append("eval:" + Path(cfg.model).name)
    model = json.loads((Path(cfg.model) / "model.json").read_text())
    score = min(1.0, model["n"] / 10)
    summary = {"score": score, "n": model["n"]}
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(summary) + "\n")
    if cfg.min_score is not None and score < cfg.min_score:
        exc = GateFailed(f"score {score:.3f} < min-score {cfg.min_score}")
        exc.summary = summary  # as imitate.evaluate does, so `imitate run` still reports the score
        raise exc
    return summary


@pytest.fixture
def fake_stages(monkeypatch):
    """Put the fake stage modules where the pipeline imports the real ones from."""
    CALLS.clear()
    for stage, (mod_name, cls_name) in pl.STAGES.items():
        if stage == "init-student":  # optional stage, not faked here (tests/test_real_model.py runs it)
            continue
        mod = types.ModuleType(mod_name)
        setattr(
            mod,
            cls_name,
            {"collect": CollectConfig, "clean": CleanConfig, "train": TrainConfig, "eval": EvalConfig}[stage],
        )
        mod.run = {"collect": collect_run, "clean": clean_run, "train": train_run, "eval": eval_run}[stage]
        monkeypatch.setitem(sys.modules, mod_name, mod)
    return CALLS


PIPELINE = """
[collect]
prompts = "prompts.jsonl"
out = "runs/collected.jsonl"

[clean]
out = "runs/clean.jsonl"
removed = "runs/removed.jsonl"

[train]
student = "student"
out = "runs/student"

[eval]
prompts = "prompts.jsonl"
out = "runs/eval.jsonl"
"""


def write_project(tmp_path: Path, pipeline: str = PIPELINE, n: int = 4) -> Path:
    (tmp_path / "student").mkdir(exist_ok=True)
    (tmp_path / "student" / "weights.bin").write_bytes(b"\0" * 16)
    add_prompts(tmp_path, n, start=0)
    p = tmp_path / "pipeline.toml"
    p.write_text(pipeline)
    return p


def add_prompts(tmp_path: Path, n: int, start: int) -> None:
    with (tmp_path / "prompts.jsonl").open("a") as fh:
        for i in range(start, start + n):
            fh.write(json.dumps({"prompt": f"question {i}"}) + "\n")


def invoke(*args: str):
    result = CliRunner().invoke(app, ["run", *map(str, args)])
    return result


def run_json(*args: str, code: int = 0) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def statuses(result: dict) -> dict[str, str]:
    return {r["name"]: r["status"] for r in result["runs"]}


def test_runs_in_order_then_skips_until_inputs_change(tmp_path, fake_stages):
    p = write_project(tmp_path)
    first = run_json(p)
    assert fake_stages == ["collect", "clean", "train:student", "eval:student"]
    assert statuses(first) == {"collect": "ran", "clean": "ran", "train": "ran", "eval": "ran"}
    assert first["runs"][3]["summary"] == {"score": 0.4, "n": 4}
    assert all(r["seconds"] >= 0 for r in first["runs"])

    fake_stages.clear()
    second = run_json(p)
    assert fake_stages == []
    assert statuses(second) == dict.fromkeys(["collect", "clean", "train", "eval"], "skipped")
    assert second["runs"][3]["summary"] == {"score": 0.4, "n": 4}  # the stored summary is reported again

    add_prompts(tmp_path, 2, start=4)  # a CI refresh with two new prompts: everything downstream re-runs
    third = run_json(p)
    assert fake_stages == ["collect", "clean", "train:student", "eval:student"]
    assert third["runs"][0]["reason"] == "inputs changed: prompts"
    assert third["runs"][3]["summary"]["n"] == 6


def test_unchanged_output_stops_the_chain(tmp_path, fake_stages):
    """A re-run stage whose output is byte-identical leaves the later stages skipped (hashes, not times)."""
    p = write_project(tmp_path)
    run_json(p)
    fake_stages.clear()
    text = p.read_text().replace("[collect]\n", "[collect]\ntemperature = 0.5\n")
    p.write_text(text)
    result = run_json(p)
    assert fake_stages == ["collect"]
    assert result["runs"][0]["reason"] == "options changed: temperature"
    assert statuses(result)["clean"] == "skipped"


def test_changed_or_missing_output_reruns(tmp_path, fake_stages):
    p = write_project(tmp_path)
    run_json(p)
    fake_stages.clear()
    (tmp_path / "runs" / "student" / "model.json").write_text('{"n": 1}')
    result = run_json(p)
    assert fake_stages == ["train:student"]  # eval's input (the model) got rewritten with the same content
    assert result["runs"][2]["reason"] == "outputs missing or changed since the last run"
    fake_stages.clear()
    (tmp_path / "runs" / "eval.jsonl").unlink()
    run_json(p)
    assert fake_stages == ["eval:student"]


def test_manifest_contents(tmp_path, fake_stages):
    p = write_project(tmp_path)
    run_json(p)
    m = json.loads((tmp_path / "runs" / "student.manifest.json").read_text())
    assert m["stage"] == "train" and m["name"] == "train"
    assert m["options"]["lr"] == 1e-3
    assert m["options"]["data"] == [str(tmp_path / "runs" / "clean.jsonl")]  # chained from [clean]
    assert m["options"]["student"] == str(tmp_path / "student")  # relative to the file, not to the working directory
    data_hash = m["inputs"]["data"][str(tmp_path / "runs" / "clean.jsonl")]
    assert data_hash == mf.hash_path(tmp_path / "runs" / "clean.jsonl")
    assert set(m["inputs"]) == {"data", "student"}
    assert m["outputs"]["out"][str(tmp_path / "runs" / "student")] == mf.hash_path(tmp_path / "runs" / "student")
    assert m["summary"] == {"steps": 4, "final_loss": 0.5}
    c = json.loads((tmp_path / "runs" / "clean.jsonl.manifest.json").read_text())
    assert set(c["outputs"]) == {"out", "removed"} and set(c["inputs"]) == {"inputs"}


def test_force_only_from(tmp_path, fake_stages):
    p = write_project(tmp_path)
    run_json(p)
    fake_stages.clear()
    assert statuses(run_json(p, "--force")) == dict.fromkeys(["collect", "clean", "train", "eval"], "ran")
    fake_stages.clear()
    result = run_json(p, "--only", "train", "--force")
    assert fake_stages == ["train:student"]
    assert statuses(result) == {
        "collect": "not_selected",
        "clean": "not_selected",
        "train": "ran",
        "eval": "not_selected",
    }
    fake_stages.clear()
    result = run_json(p, "--from", "train", "--force")
    assert fake_stages == ["train:student", "eval:student"]
    fake_stages.clear()
    result = run_json(p, "--only", "train")  # up to date and not forced: skipped
    assert fake_stages == [] and statuses(result)["train"] == "skipped"
    bad = invoke(p, "--only", "trian")
    assert bad.exit_code == 2 and "did you mean 'train'" in bad.output
    both = invoke(p, "--only", "train", "--from", "clean")
    assert both.exit_code == 2 and "cannot be combined" in both.output


@pytest.mark.parametrize("fail", ["imitate", "bug"])
def test_failed_stage_exits_1_and_stops(tmp_path, fake_stages, fail):
    p = write_project(tmp_path, PIPELINE.replace('out = "runs/student"', f'out = "runs/student"\nfail = "{fail}"'))
    result = run_json(p, code=1)
    assert statuses(result) == {"collect": "ran", "clean": "ran", "train": "failed", "eval": "not_run"}
    assert (
        "student diverged" in result["runs"][2]["error"] if fail == "imitate" else "boom" in result["runs"][2]["error"]
    )
    assert not (tmp_path / "runs" / "student.manifest.json").exists()
    human = invoke(p)
    assert human.exit_code == 1 and "failed" in human.stdout


def test_failed_run_loses_its_old_manifest(tmp_path, fake_stages):
    p = write_project(tmp_path)
    run_json(p)
    p.write_text(p.read_text().replace('out = "runs/student"', 'out = "runs/student"\nfail = "imitate"'))
    run_json(p, code=1)
    assert not (tmp_path / "runs" / "student.manifest.json").exists()


TWO_STUDENTS = """
[collect]
prompts = "prompts.jsonl"
out = "runs/collected.jsonl"

[train]
student = "student"
lr = 0.01

[train.sft]
out = "runs/sft"

[train.kd]
out = "runs/kd"
teacher = "hf:student"
lr = 0.02

[eval]
prompts = "prompts.jsonl"
min-score = 0.5

[eval.teacher]
model = "runs/sft"
out = "runs/eval-teacher.jsonl"
min-score = 0.1

[eval.sft]
out = "runs/eval-sft.jsonl"

[eval.kd]
out = "runs/eval-kd.jsonl"
"""


def test_named_runs_share_options_and_chain_by_name(tmp_path, fake_stages):
    p = write_project(tmp_path, TWO_STUDENTS)
    result = run_json(p, code=3)  # 4 prompts -> score 0.4 < 0.5 for sft and kd; the teacher gate (0.1) passes
    assert fake_stages == ["collect", "train:sft", "train:kd", "eval:sft", "eval:sft", "eval:kd"]
    assert statuses(result) == {
        "collect": "ran",
        "train.sft": "ran",
        "train.kd": "ran",
        "eval.teacher": "ran",
        "eval.sft": "gate_failed",
        "eval.kd": "gate_failed",
    }
    kd = json.loads((tmp_path / "runs" / "kd" / "model.json").read_text())
    assert kd == {"n": 4, "lr": 0.02, "teacher": "hf:" + str(tmp_path / "student")}  # relative to the file
    assert json.loads((tmp_path / "runs" / "sft" / "model.json").read_text())["lr"] == 0.01
    # train.data chained to collect.out since there is no [clean]
    assert json.loads((tmp_path / "runs" / "kd.manifest.json").read_text())["options"]["data"][0].endswith(
        "collected.jsonl"
    )
    # a failed gate writes no manifest: the gate is checked again next time
    fake_stages.clear()
    again = run_json(p, code=3)
    assert fake_stages == ["eval:sft", "eval:kd"]
    assert statuses(again)["eval.teacher"] == "skipped"
    fake_stages.clear()
    only = run_json(p, "--only", "train.kd", "--force")  # one named run
    assert fake_stages == ["train:kd"] and statuses(only)["train.sft"] == "not_selected"
    human = invoke(p)
    assert human.exit_code == 3
    assert "eval.teacher  score 0.400" in human.stdout and "eval.kd       score 0.400  (gate FAILED)" in human.stdout


def test_json_stdout_is_only_json(tmp_path, fake_stages):
    p = write_project(tmp_path)
    result = invoke(p, "--json")
    assert result.exit_code == 0
    json.loads(result.stdout)  # the stage's print went to stderr
    assert "collect says hello" in result.stderr


@pytest.mark.parametrize(
    "text, message, hint",
    [
        ("[trian]\nout = 'x'\n", "unknown section 'trian'", "did you mean '[train]'"),
        (
            "[collect]\nprompts = 'p'\nout = 'o'\ntemprature = 0\n",
            "unknown key 'temprature'",
            "did you mean 'temperature'",
        ),
        (
            "[train]\nstudent = 's'\n[train.kd]\nout = 'o'\ndata = 'd'\nlrr = 1\n",
            "[train.kd]: unknown key 'lrr'",
            "did you mean 'lr'",
        ),
        ("[eval]\nprompts = 'p'\n", "missing required option(s): --model", "earlier stage"),
        ("[collect]\nprompts = 'p'\nout = 'o'\ntemperature = 'hot'\n", "'temperature' must be a number", None),
        ("[collect\n", "not valid TOML", None),
        ("verbose = true\n", "unknown key 'verbose'", "sections"),
    ],
)
def test_config_errors(tmp_path, fake_stages, text, message, hint):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        pl.load_pipeline(p)
    assert message in ei.value.message
    if hint:
        assert hint in (ei.value.hint or "")
    result = invoke(p)
    assert result.exit_code == 2 and "Error:" in result.stderr and not fake_stages


def test_whole_file_is_checked_before_any_stage_runs(tmp_path, fake_stages):
    p = write_project(tmp_path, PIPELINE + "[eval.extra]\nmodle = 'x'\n")
    result = invoke(p)
    assert result.exit_code == 2 and "did you mean 'model'" in result.stderr
    assert fake_stages == []


def test_hash_path_reads_contents(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abcd")
    st = os.stat(f)
    h1 = mf.hash_path(f)
    f.write_bytes(b"abce")  # same size, same mtime: still a different hash
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert mf.hash_path(f) != h1
    f.write_bytes(b"abcd")
    os.utime(f, ns=(0, 0))  # touched, not changed: same hash
    assert mf.hash_path(f) == h1
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "w").write_bytes(b"1")
    hd = mf.hash_path(d)
    (d / "x.manifest.json").write_text("{}")  # manifests inside a directory do not count
    assert mf.hash_path(d) == hd
    (d / "sub" / "w").rename(d / "sub" / "v")  # a renamed file does
    assert mf.hash_path(d) != hd
    assert mf.hash_path(tmp_path / "missing") is None


def test_collect_with_failed_requests_is_not_recorded(tmp_path, fake_stages, monkeypatch):
    """A collect run with failures (or a dry run) keeps no manifest, so the next scheduled run retries them."""
    p = write_project(tmp_path)

    def flaky_collect(cfg):
        summary = collect_run(cfg)
        return {**summary, "failed": 2}

    monkeypatch.setattr(sys.modules["imitate.collect.stage"], "run", flaky_collect)
    result = run_json(p)
    assert statuses(result)["collect"] == "ran" and "2 request(s) failed" in result["runs"][0]["reason"]
    assert not (tmp_path / "runs" / "collected.jsonl.manifest.json").exists()
    assert (tmp_path / "runs" / "student.manifest.json").exists()  # what was collected still trains
    fake_stages.clear()
    run_json(p)
    assert fake_stages == ["collect"]  # collect again; its output did not change, so nothing after it re-runs


def test_changed_student_retrains(tmp_path, fake_stages):
    p = write_project(tmp_path)
    run_json(p)
    fake_stages.clear()
    (tmp_path / "student" / "weights.bin").write_bytes(b"\1" * 16)
    result = run_json(p)
    assert fake_stages == ["train:student"] and result["runs"][2]["reason"] == "inputs changed: student"


def test_resolve_spec(tmp_path):
    from imitate.config import resolve_spec

    (tmp_path / "models" / "t").mkdir(parents=True)
    assert resolve_spec("hf:models/t", tmp_path) == "hf:" + str(tmp_path / "models" / "t")
    assert resolve_spec("hf:./models/../models/t", tmp_path) == "hf:" + str(tmp_path / "models" / "t")
    assert resolve_spec("hf:Qwen/Qwen2.5-0.5B", tmp_path) == "hf:Qwen/Qwen2.5-0.5B"  # a hub id: not on disk
    assert resolve_spec("openai:gpt-4o-mini", tmp_path, bare=True) == "openai:gpt-4o-mini"
    assert resolve_spec("models/t", tmp_path) == "models/t"  # bare values only for model fields
    assert resolve_spec("models/t", tmp_path, bare=True) == str(tmp_path / "models" / "t")
    assert resolve_spec("org/name", tmp_path, bare=True) == "org/name"
    assert resolve_spec("hf:/abs/x", tmp_path) == "hf:/abs/x" and resolve_spec(3, tmp_path) == 3


def test_speed_options_do_not_rerun(tmp_path, fake_stages, monkeypatch):
    monkeypatch.setattr(mf, "SPEED_OPTIONS", mf.SPEED_OPTIONS | {"temperature"})  # the fake collect has no speed knob
    p = write_project(tmp_path)
    run_json(p)
    fake_stages.clear()
    p.write_text(p.read_text().replace("[collect]\n", "[collect]\ntemperature = 0.5\n"))
    assert statuses(run_json(p))["collect"] == "skipped" and fake_stages == []


def test_new_option_at_its_default_does_not_rerun(tmp_path, fake_stages):
    """An option added by a newer imitate (absent from old manifests) re-runs nothing while it is at its default."""
    p = write_project(tmp_path)
    run_json(p)
    m = tmp_path / "runs" / "student.manifest.json"
    data = json.loads(m.read_text())
    del data["options"]["lr"]  # as if written before `lr` existed
    m.write_text(json.dumps(data))
    fake_stages.clear()
    assert statuses(run_json(p))["train"] == "skipped"
    p.write_text(p.read_text().replace('out = "runs/student"', 'out = "runs/student"\nlr = 0.5'))
    result = run_json(p)
    assert statuses(result)["train"] == "ran" and result["runs"][2]["reason"] == "options changed: lr"
