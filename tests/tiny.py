"""Tiny models and tokenizers built on the fly: no hub, no network, a few hundred KB on disk.

`make_tokenizer(dir)` trains a byte-level BPE tokenizer (digits split into single tokens) with a chat template;
`make_model(dir, ...)` saves a randomly initialised Llama of the given shape with that tokenizer beside it, so the
directory loads with `AutoModelForCausalLM.from_pretrained(dir)` + `AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "Write 347 in words. three hundred forty-seven",
    "What is the capital of France? Paris is the capital of France.",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "system user assistant You are a helpful assistant.",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen",
    "eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Explain, summarize, translate, answer the question: why? how? what?",
]

SPECIAL = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]


def make_tokenizer(out: str | Path, vocab_size: int = 384, chat_template: str | None = CHAT_TEMPLATE):
    """Train and save a small fast tokenizer; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|end|>",
        unk_token=None,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def make_model(
    out: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    vocab_size: int = 384,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    pad_vocab_to: int | None = None,
):
    """Save a random tiny Llama (safetensors) plus tokenizer to `out`; returns the model.

    pad_vocab_to: give the embedding more rows than the tokenizer has tokens (like padded vocabularies in real models).
    """
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
                shutil.copy(f, out / f.name)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
    else:
        tok = make_tokenizer(out, vocab_size=vocab_size, chat_template=chat_template)
    n_vocab = pad_vocab_to or len(tok)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return model


def copy_without_chat_template(src: str | Path, dst: str | Path) -> Path:
    """Copy a model dir and strip its chat template (both the tokenizer_config field and chat_template.jinja)."""
    import json
    import shutil

    dst = Path(dst)
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    return dst


def run_torchrun(args: list, out: str | Path, nproc: int = 2):
    """`imitate train ARGS --grad-accum 1 --out OUT --json` under torchrun with `nproc` CPU ranks; the finished process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "imitate", "train", *map(str, args), "--grad-accum", "1", "--out", str(out), "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _save_fast(tok, out: str | Path | None, chat_template: str | None):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|end|>", unk_token="<|unk|>" if "<|unk|>" in tok.get_vocab() else None)
    if chat_template is not None:
        fast.chat_template = chat_template
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(out)
    return fast


def make_char_tokenizer(out: str | Path | None = None, chat_template: str | None = CHAT_TEMPLATE,
                        extra: str = ""):
    """A character-level tokenizer: one token per character of the corpus (+ `extra`), `<|unk|>` for the rest."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set("".join(CORPUS) + extra + " \n"))
    vocab = {t: i for i, t in enumerate(SPECIAL + ["<|unk|>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    return _save_fast(tok, out, chat_template)


def make_sp_tokenizer(out: str | Path | None = None, chat_template: str | None = CHAT_TEMPLATE):
    """A SentencePiece-style BPE (`▁` for spaces, a dummy prefix, `<0xAB>` byte fallback, like Llama 2's) with a
    hand-made vocabulary: the corpus's characters, 256 byte pieces and a few merges; anything else falls back to bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    chars = sorted(set("".join(CORPUS).replace(" ", "")) | {"▁"})
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "w"), ("o", "r"), ("▁w", "or"), ("▁", "h"), ("e", "l"),
              ("▁h", "el"), ("l", "o"), ("▁hel", "lo"), ("i", "n"), ("▁", "s"), ("e", "v"), ("e", "n"), ("ev", "en"),
              ("▁s", "even")]
    pieces = SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + chars + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIAL)
    return _save_fast(tok, out, chat_template)
