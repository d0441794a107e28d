"""The student of `imitate train`: its reference resolved (a directory, a GGUF file or a hub id), its tokenizer and
chat template, its weights (wrapped in a LoRA adapter unless --full) and the precision to train it in.

Everything here but `load_student` reads configs and tokenizers only, so `loop.prepare` can run it before any weights
load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imitate.errors import ImitateError, UsageError
from imitate.train import distill
from imitate.train.config import TrainConfig
from imitate.train.data import check_chat_template


def resolve_student(spec: str) -> str:
    """A local model directory, a GGUF file (its converted directory) or a hub id; anything else is an error here,
    before any weights load."""
    from imitate.gguf_models import names_gguf
    from imitate.models import local_dir, resolve_model

    if names_gguf(spec):
        return local_dir(spec)
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UsageError(f"student {spec}: no config.json there, so it is not a transformers model directory")
        return str(p.resolve())  # absolute, so the adapter's base_model_name_or_path works from any directory
    try:  # the same rule as for teachers: what looks like a path must exist, anything else is a hub id
        return resolve_model(spec)
    except ImitateError:
        raise UsageError(
            f"student {spec}: no such directory", hint="give --student a model directory or a hub id"
        ) from None


def load_tokenizer(cfg: TrainConfig, student: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(student, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ImitateError(
            f"cannot load the tokenizer of student {student}: {str(exc).splitlines()[0]}",
            hint="check --student (a local directory or a hub id); offline, hub ids must already be in the HF cache",
        ) from None
    if cfg.chat_template is not None:
        tok.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
    check_chat_template(tok, student)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def precision(cfg: TrainConfig) -> str | None:
    """None leaves the choice to the user's accelerate config (`accelerate launch --mixed_precision ...`)."""
    if cfg.precision != "auto":
        return cfg.precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def load_student(cfg: TrainConfig, student: str, mixed: str | None) -> Any:
    """The student, wrapped in a LoRA adapter unless --full. A frozen LoRA base loads in bf16 when training in bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if (mixed == "bf16" and not cfg.full) else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            student, dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ImitateError(
            f"cannot load the weights of student {student}: {str(exc).splitlines()[0]}",
            hint="imitate loads .safetensors weights only; convert .bin checkpoints with transformers save_pretrained",
        ) from None
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        checkpoint_layers(model, cfg.gradient_checkpointing_every)
    from imitate.train.fused_mlp import fuse_gated_mlps  # torch at import: loaded here, with the weights

    if cfg.full:
        fuse_gated_mlps(model, cfg.gradient_checkpointing)  # SiLU and the product recomputed in backward
        return model
    from peft import LoraConfig, get_peft_model

    from imitate.train.lora_dropout import fuse_lora_dropout  # torch at import: loaded here, with the weights

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else [
        t.strip() for t in cfg.target_modules.split(",") if t.strip()
    ]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise UsageError(f"--target-modules {cfg.target_modules}: {exc}") from None
    fuse_lora_dropout(model)  # the same dropout, saving a 1-byte mask instead of a float copy of each layer's input
    fuse_gated_mlps(model, cfg.gradient_checkpointing)  # SiLU and the product recomputed in backward
    return model


def student_vocab(model: Any, tokenizer: Any) -> int | None:
    """The real vocabulary of the student: len(tokenizer) when its output head has at least that many rows (rows past
    it are padding no token maps to), else None (the whole head)."""
    rows = distill.unwrap(model).get_output_embeddings().weight.shape[0]
    return len(tokenizer) if len(tokenizer) <= rows else None


def checkpoint_layers(model, every: int = 1) -> int:
    """Gradient checkpointing on every `every`-th decoder layer (1: all of them); the number of layers recomputed.
    The rest keep their activations, so about 1/every of full checkpointing's memory saving remains."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers 5.x choose the layers themselves
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if every > 1 and not layers:
        raise UsageError(f"--gradient-checkpointing-every {every}: this model's layers cannot be checkpointed one by "
                         f"one ({type(model).__name__} has no transformers GradientCheckpointingLayer)",
                         hint="drop --gradient-checkpointing-every to checkpoint the whole model")
    for i, layer in enumerate(layers):  # what newer versions did already; older ones checkpoint every layer
        layer.gradient_checkpointing = i % every == 0
    return sum(layer.gradient_checkpointing for layer in layers)
