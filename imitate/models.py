"""Local models for every stage: resolving a model reference (directory, adapter, hub id), loading weights, and
batched generation with the model's own chat template.

The `hf:` teacher of `imitate collect` (`imitate.collect.teachers.local`), the student and KD teacher of `imitate train`,
and `imitate eval` all load and generate through here, so a model behaves the same in every stage.

Decoding follows the request params, not the model's `generation_config` sampling defaults (its top-k, repetition
penalty...), so an hf teacher behaves like an API teacher given the same params:
    temperature   0 -> greedy (do_sample=False, deterministic); > 0 -> sampling at that temperature (default 1.0,
                  the API default)
    top_p         nucleus sampling (default 1.0 = off); top-k is off
    max_tokens    new tokens at most (default 256); hitting it without EOS gives finish_reason "length"
    logprobs      K -> the top-K log-probabilities of every generated token (EOS excluded, like the APIs)
    seed          seeds torch before the batch (sampling is then repeatable for the same batch composition)
Log-probabilities are the log-softmax of the model's RAW logits (the distribution at temperature 1 before top-p),
i.e. what the model believes, whatever temperature the text was sampled at; for greedy decoding the top-1 entry is
the chosen token. generate() keeps every step's logits until it returns ([batch, max_tokens, vocab] in the model's
dtype), so with logprobs on a large vocabulary lower the batch size for long answers.
usage: input_tokens = the rendered prompt; output_tokens = the generated tokens including the EOS that ended them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from imitate import gguf_models
from imitate.collect.teachers import Completion
from imitate.errors import ImitateError, UsageError

DTYPES = ("auto", "float32", "float16", "bfloat16")


def split_ref(value: str) -> tuple[str | None, str]:
    """The one answer to "is this a provider spec or a model path?".

    'provider:rest' when the text before the first '/' holds a ':' ('hf:./m', 'openai:gpt-4o', 'anthropic:claude-x');
    otherwise (None, value): a bare model reference, a directory or a hub id ('runs/s1', 'Qwen/Qwen2.5-0.5B').
    """
    head = value.split("/")[0]
    if ":" in head and not _exists(value):
        provider, _, rest = value.partition(":")
        return provider, rest
    return None, value


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # a name too long to be a file (ENAMETOOLONG) is none
        return False


def looks_local(model: str) -> bool:
    """A bare model reference that can only be a local path (never a hub id 'org/name')."""
    parts = model.split("/")
    if model.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts) or "\\" in model:
        return True
    return "/" in model and Path(parts[0]).is_dir()  # 'runs/student' beside a local runs/: a path typo, not a hub id


def local_path(value: str, *, bare: bool) -> Path | None:
    """The local path a model reference names ('hf:PATH', or with `bare` a plain PATH), existing or not; None for
    API models and hub ids. bare: the field holds a model without a provider (train's student, eval's model)."""
    provider, rest = split_ref(value)
    if provider is None and not bare:
        return None
    if provider not in (None, "hf") or not rest:
        return None
    p = Path(rest).expanduser()
    return p if p.exists() or looks_local(rest) else None


def resolve_model(model: str) -> str:
    """Check a model reference cheaply: an existing directory (model or peft adapter), a GGUF file (`x.gguf`, or
    `pkg:DIST` for the one an installed package ships; see imitate/gguf_models.py) or a hub id. An `hf:` prefix is
    allowed (as in teacher specs).

    Something that looks like a path but does not exist is an error here, before any heavy import.
    """
    model = model[3:] if model.startswith("hf:") else model
    if model.startswith(gguf_models.PKG_PREFIX):
        model = str(gguf_models.package_file(model))
    if gguf_models.is_gguf(model):
        gguf_models.check(model)  # header, architecture and the gguf package: before any weights
        return str(Path(model).expanduser().resolve())
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ImitateError(
                f"model {model}: is a file, expected a model directory",
                hint="point at the directory that holds config.json (or adapter_config.json)",
            )
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise ImitateError(
                f"model directory {model} has no config.json or adapter_config.json",
                hint="point at a directory saved with save_pretrained (a model or a peft adapter)",
            )
        return str(p)
    if looks_local(model):
        raise ImitateError(
            f"model directory {model} does not exist",
            hint="check the path (relative paths start from the current directory), or give a hub id like org/name",
        )
    return model


def _torch_dtype(dtype: str | None, device: str) -> Any:
    """None or "auto": bf16 (else fp16) on CUDA, float32 elsewhere; otherwise the named torch dtype."""
    import torch

    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint=f"one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _from_pretrained(loader: Any, ref: str, **kw: Any) -> Any:
    """Call a transformers/peft loader, turning 'not found / offline' errors into an ImitateError."""
    try:
        return loader.from_pretrained(ref, **kw)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImitateError(
            f"could not load {ref}: {first}",
            hint="local directories must hold safetensors weights; hub ids need network or a cached copy "
            "(HF_HUB_OFFLINE=1 uses only the cache)",
        ) from None


def model_refs(model: str) -> tuple[str, str | None, str]:
    """(base, adapter or None, tokenizer dir) of a model directory, hub id or peft adapter directory; reads no weights.

    An adapter directory (adapter_config.json) names its base in `base_model_name_or_path`; its tokenizer is the
    adapter's own when it saved one, else the base's.
    """
    ref = local_dir(model)
    adapter = Path(ref) / "adapter_config.json"
    if not adapter.exists():
        return ref, None, ref
    base_ref = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_ref:
        raise ImitateError(f"{adapter}: no base_model_name_or_path", hint="set it to the base model's path or id")
    try:
        base_ref = resolve_model(base_ref)
    except ImitateError as exc:
        raise ImitateError(f"{adapter}: base_model_name_or_path: {exc.message}", hint=exc.hint) from None
    tok_ref = ref if (Path(ref) / "tokenizer_config.json").exists() else base_ref
    return base_ref, ref, tok_ref


# CPU threads by model size. Tiny models spend their time in small ops where threads mostly wait for each other, and on
# a shared machine (a CI runner, a laptop doing two things) every extra thread competes with the other work: the demo
# (a 0.1M-parameter student) took 34 s alone, 104 s beside one busy process with torch's default threads and 35 s with
# one thread (issue #10). Large models have matrix multiplies big enough to split.
THREADS_BY_SIZE = ((5_000_000, 1), (100_000_000, 4))  # (parameters below, at most this many threads); above: all


def choose_threads(n_params: int, cpus: int | None = None, requested: int | None = None,
                   env: dict | None = None) -> int:
    """torch CPU threads for models of `n_params` parameters in all: `requested` (--threads) if given, else
    OMP_NUM_THREADS from `env` if set, else by size (THREADS_BY_SIZE), never more than `cpus`."""
    import os

    cpus = cpus or os.cpu_count() or 1
    if requested is not None:
        return max(1, requested)
    env = os.environ if env is None else env
    if str(env.get("OMP_NUM_THREADS", "")).isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    for below, threads in THREADS_BY_SIZE:
        if n_params < below:
            return min(threads, cpus)
    return cpus


def local_dir(model: str) -> str:
    """resolve_model, and a GGUF file becomes its converted model directory (made on first use, then cached)."""
    ref = resolve_model(model)
    if gguf_models.is_gguf(ref):
        return gguf_models.to_directory(ref, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return ref


def load_weights(
    model: str, *, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The model's weights (safetensors), a peft adapter merged in, on `device`, in eval mode. No tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    base_ref, adapter_ref, _ = model_refs(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = _from_pretrained(
        AutoModelForCausalLM,
        base_ref,
        dtype=_torch_dtype(dtype, device),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    if adapter_ref:
        net = _load_adapter(net, adapter_ref)
    net.to(device)
    net.eval()
    return net


def load_model(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) for generation: eval mode, on `device` (CUDA when present), tokenizer padding left.

    `model` is a model directory, a hub id, or a peft adapter directory (adapter_config.json): then the base named by
    its `base_model_name_or_path` is loaded, the adapter applied and merged (faster generation, same outputs).
    The tokenizer (and its chat template) is checked before any weights are read.
    """
    from transformers import AutoTokenizer

    _, _, tok_ref = model_refs(model)
    tokenizer = _from_pretrained(AutoTokenizer, tok_ref, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise ImitateError(
            f"{tok_ref}: the tokenizer has no chat template",
            hint="use an instruction-tuned (chat) model, or add a chat_template to its tokenizer_config.json",
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    net = load_weights(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return net, tokenizer


def _load_adapter(base: Any, adapter_ref: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter_ref).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ImitateError(
            f"could not apply the adapter {adapter_ref}: {str(exc).splitlines()[0]}",
            hint="the adapter must have been trained on the base model its adapter_config.json names",
        ) from None


def prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered by the chat template with the assistant header appended."""
    try:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as exc:  # noqa: BLE001 - jinja errors (a template rejecting a system turn) are user-fixable
        raise ImitateError(
            f"the chat template failed on a prompt: {exc}",
            hint="check the roles your prompts use against what the model's template accepts",
        ) from None
    return list(enc["input_ids"])


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends an answer: the generation config's EOS ids plus the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) with every row right-aligned (LEFT padding), as decoder-only generation needs."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def generate_batch(
    model: Any,
    tokenizer: Any,
    messages_list: list[list[dict]],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    logprobs: int | None = None,
    seed: int | None = None,
) -> list[Completion]:
    """Generate one answer per conversation in a single batched `generate` call (see the module doc for params)."""
    import torch
    from transformers import GenerationConfig

    if not messages_list:
        return []
    rows = [prompt_ids(tokenizer, m) for m in messages_list]
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    input_ids, mask = left_pad(rows, pad_id)
    device = next(model.parameters()).device
    sample = temperature is not None and temperature > 0
    # explicit values so the model's generation_config defaults (top-k, repetition penalty...) do not leak in
    knobs: dict[str, Any] = {"temperature": float(temperature), "top_k": 0} if sample else {"temperature": 1.0}
    knobs["top_p"] = float(top_p) if sample and top_p is not None else 1.0
    # never generate past the model's context: the longest prompt plus the answer must fit its positions
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        max_tokens = max(1, min(max_tokens, context - input_ids.shape[1]))
    gen = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=sample,
        repetition_penalty=1.0,
        **knobs,
        eos_token_id=stop,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_logits=bool(logprobs),
    )
    if seed is not None:
        torch.manual_seed(int(seed))
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    new = out.sequences[:, input_ids.shape[1] :].cpu()
    if logprobs:  # raw logits, one [batch, vocab] tensor per step; keep only top-K and the chosen token per step
        picked, top_v, top_i = [], [], []
        for t, step in enumerate(out.logits):
            lp = step.float().log_softmax(-1)
            picked.append(lp.gather(-1, out.sequences[:, input_ids.shape[1] + t, None]).squeeze(-1))
            v, i = lp.topk(int(logprobs), dim=-1)
            top_v.append(v)
            top_i.append(i)
        picked_lp = torch.stack(picked, 1).tolist()  # [batch][step]
        top_lp, top_id = torch.stack(top_v, 1).tolist(), torch.stack(top_i, 1).tolist()  # [batch][step][K]
    stop_set = set(stop)
    vocab: dict[int, str] = {}
    if logprobs:  # each token's bytes, for cross-tokenizer KD (a decoded piece of an emoji is only "\ufffd")
        from imitate.train.xtok import cached_token_bytes

        table = cached_token_bytes(tokenizer)

        def bytes_of(i: int) -> list[int] | None:
            b = table[i] if 0 <= i < len(table) else None
            return list(b) if b is not None else None

    def text_of(i: int) -> str:
        if i not in vocab:
            vocab[i] = tokenizer.decode([i])
        return vocab[i]

    completions = []
    for b, row in enumerate(new.tolist()):
        end = next((t for t, tok in enumerate(row) if tok in stop_set), None)
        answer = row if end is None else row[:end]
        entries = None
        if logprobs:
            entries = []
            for t, tok in enumerate(answer):
                top = [{"token": text_of(i), "id": i, "logprob": v, "bytes": bytes_of(i)}
                       for v, i in zip(top_lp[b][t], top_id[b][t])]
                entries.append({"token": text_of(tok), "id": tok, "logprob": picked_lp[b][t], "bytes": bytes_of(tok),
                                "top": top})
        completions.append(
            Completion(
                # the text exactly as generated: no stripping, no "clean-up" of spaces around punctuation
                text=tokenizer.decode(answer, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                finish_reason="length" if end is None else "stop",  # no EOS: max_tokens cut it
                input_tokens=len(rows[b]),
                output_tokens=len(answer) + (0 if end is None else 1),
                logprobs=entries,
                extra={"answer_token_ids": answer},  # what train checks its tokenization of the answer against
            )
        )
    return completions
