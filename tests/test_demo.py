"""The offline demo's shipped files: the teacher writes held-out numbers in words, the prompt files match the script,
and examples/*.toml are valid pipelines for the real stages."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def load_script():
    spec = importlib.util.spec_from_file_location("make_demo_teacher", ROOT / "examples" / "make_demo_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (47, "forty-seven"),
        (100, "one hundred"),
        (347, "three hundred forty-seven"),
        (1005, "one thousand five"),
        (2019, "two thousand nineteen"),
        (9999, "nine thousand nine hundred ninety-nine"),
        (10000, "ten thousand"),
    ],
)
def test_in_words(script, n, words):
    assert script.in_words(n) == words


def test_prompt_files_match_the_script(script):
    train_numbers, held = script.split_numbers()
    assert not set(train_numbers) & set(held) and len(train_numbers) + len(held) == script.LIMIT
    rows = [json.loads(x) for x in (DATA / "numbers_eval.jsonl").read_text().splitlines()]
    assert len(rows) == script.N_EVAL
    assert all(r["number"] in set(held) for r in rows)  # the teacher never trained on an eval number
    assert all(
        r["reference"] == script.in_words(r["number"]) and r["prompt"] == script.prompt_for(r["number"]) for r in rows
    )
    train_rows = [json.loads(x) for x in (DATA / "numbers_train.jsonl").read_text().splitlines()]
    assert len(train_rows) == script.N_TRAIN_PROMPTS and not {r["number"] for r in train_rows} & set(held)


def test_demo_teacher_and_student_are_small_and_share_a_tokenizer():
    for name, limit_mb in (("demo_teacher", 5), ("demo_student", 1)):
        d = DATA / name
        size = sum(f.stat().st_size for f in d.iterdir()) / 2**20
        assert (d / "model.safetensors").exists() and size < limit_mb, (name, size)
    assert (DATA / "demo_teacher" / "tokenizer.json").read_bytes() == (
        DATA / "demo_student" / "tokenizer.json"
    ).read_bytes()


def test_demo_teacher_writes_held_out_numbers(script):
    """Greedy answers of the shipped teacher on 20 held-out numbers (never trained on): > 90% exact."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(DATA / "demo_teacher")
    model = AutoModelForCausalLM.from_pretrained(DATA / "demo_teacher")
    assert tok.tokenize("Write 347 in words.")[1:4] == ["3", "4", "7"] or "3" in tok.tokenize("347")
    _, held = script.split_numbers()
    numbers = random.Random(5).sample(held, 20)
    answers = script.generate(model, tok, numbers)
    right = sum(a == script.in_words(n) for a, n in zip(answers, numbers))
    assert right >= 19, list(zip(numbers, answers))


def test_digits_are_single_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DATA / "demo_teacher")
    assert [t for t in tok.tokenize("Write 9081 in words.") if t.strip("Ġ").isdigit()] == ["9", "0", "8", "1"]
    assert tok.decode(tok("three hundred forty-seven")["input_ids"]) == "three hundred forty-seven"


@pytest.mark.parametrize("name", ["demo.toml", "refresh.toml"])
def test_example_pipelines_are_valid(name):
    """Every key of the shipped pipelines is an option of the real stages (checked without running anything)."""
    from imitate import manifest as mf
    from imitate import pipeline as pl

    try:
        runs = pl.load_pipeline(ROOT / "examples" / name)
    except ModuleNotFoundError as exc:  # a stage module not written yet
        pytest.skip(str(exc))
    assert runs[0].stage == "collect"
    if name == "demo.toml":
        names = [r.name for r in runs]
        assert {"train.sft", "train.kd", "eval.teacher", "eval.sft", "eval.kd"} <= set(names)
        for r in runs:  # the demo needs nothing outside the repository
            for paths in mf.path_values(r.cfg).values():
                assert all(ROOT in Path(p).resolve().parents for p in paths), (r.name, paths)


def test_refresh_workflow():
    """The CI example runs the refresh pipeline on a schedule with the key from secrets, caches the run directory
    (collect journal + manifests) and turns exit code 3 into a failed job with an 'eval gate failed' annotation."""
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "examples" / "github-actions-refresh.yml").read_text()
    wf = yaml.safe_load(text)
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert on["schedule"][0]["cron"]
    steps = wf["jobs"]["refresh"]["steps"]
    run_step = next(s for s in steps if "imitate run" in s.get("run", ""))
    assert "examples/refresh.toml" in run_step["run"] and 'exit "$code"' in run_step["run"]
    assert "eval gate failed" in run_step["run"] and "-eq 3" in run_step["run"]
    assert run_step["env"]["OPENAI_API_KEY"] == "${{ secrets.OPENAI_API_KEY }}"
    restore = next(s for s in steps if s.get("uses", "").startswith("actions/cache/restore"))
    save = next(s for s in steps if s.get("uses", "").startswith("actions/cache/save"))
    assert restore["with"]["path"] == save["with"]["path"] == "runs/refresh" and save["if"] == "always()"
    from imitate import pipeline as pl

    runs = pl.load_pipeline(ROOT / "examples" / "refresh.toml")
    collect_out = Path(runs[0].cfg.out)
    assert collect_out.parent == (ROOT / "runs" / "refresh")  # the journal lives in the cached directory


def _toml(data: dict, prefix: str = "") -> str:
    """A tiny TOML writer for the demo's shapes (scalars, lists of scalars, nested tables)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = [f"{k} = {val(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            lines += ["", f"[{name}]", _toml(v, name)]
    return "\n".join(lines)


def test_mini_demo(tmp_path):
    """examples/demo.toml end to end with the shipped teacher and student, cut down to 40 prompts, a few training
    steps and 20 eval numbers: every run succeeds and the teacher scores > 90% through `imitate eval`."""
    import tomllib

    from typer.testing import CliRunner

    from imitate.cli import app

    demo = tomllib.loads((ROOT / "examples" / "demo.toml").read_text())
    examples = ROOT / "examples"
    for name, n in (("numbers_train.jsonl", 40), ("numbers_eval.jsonl", 20)):
        (tmp_path / name).write_text("".join((DATA / name).read_text().splitlines(keepends=True)[:n]))
    demo["collect"]["prompts"] = str(tmp_path / "numbers_train.jsonl")
    demo["collect"]["teacher"] = "hf:" + str((examples / demo["collect"]["teacher"][3:]).resolve())
    demo["collect"]["out"] = str(tmp_path / "runs" / "collected.jsonl")
    for key in ("out", "removed", "report"):
        demo["clean"][key] = str(tmp_path / "runs" / f"clean-{key}.jsonl")
    demo["clean"]["decontaminate"] = [str(tmp_path / "numbers_eval.jsonl")]
    demo["train"]["student"] = str((examples / demo["train"]["student"]).resolve())
    demo["train"].pop("epochs", None)
    demo["train"]["max-steps"] = 4
    demo["eval"]["prompts"] = str(tmp_path / "numbers_eval.jsonl")
    for stage in ("train", "eval"):
        for name, sub in demo[stage].items():
            if isinstance(sub, dict):
                sub["out"] = str(tmp_path / "runs" / (f"{stage}-{name}" + (".jsonl" if stage == "eval" else "")))
                for key in ("teacher", "model"):
                    if key in sub:
                        spec = sub[key]
                        prefix = "hf:" if spec.startswith("hf:") else ""
                        sub[key] = prefix + str((examples / spec[len(prefix) :]).resolve())
    p = tmp_path / "mini.toml"
    p.write_text(_toml(demo))
    result = CliRunner().invoke(app, ["run", str(p), "--json"])
    assert result.exit_code == 0, result.output
    runs = {r["name"]: r for r in json.loads(result.stdout)["runs"]}
    assert {r["status"] for r in runs.values()} == {"ran"}, runs
    assert runs["collect"]["summary"]["completed"] == 40
    assert runs["clean"]["summary"]["out"] == 40  # the demo prompts are distinct and never in the eval set
    assert runs["eval.teacher"]["summary"]["score"] >= 0.9
    assert runs["eval.sft"]["summary"]["n"] == 20
