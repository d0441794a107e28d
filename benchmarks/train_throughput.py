"""Training throughput and peak memory: `imitate train` versus TRL's SFTTrainer, side by side in one run.

Both train the same randomly initialised model shape on the same synthetic records (loss on the final assistant turn:
TRL's prompt/completion format with completion_only_loss), with the same batch size, gradient accumulation, max length,
learning rate, LoRA settings and precision. Each trainer runs in its own subprocess so peak memory is its own.

    python benchmarks/train_throughput.py                                  # CPU, "small" shape
    python benchmarks/train_throughput.py --device cuda --shape qwen0.5b --bf16 --steps 30 --batch-size 8

tokens/s counts real (non-padding) tokens of the training loop; model loading and tokenization are outside the timing
for both. Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's max RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
         "twenty thirty forty fifty hundred thousand hello world quick brown fox jumps over the lazy dog capital of "
         "France Paris is write in words explain summarize translate answer question why how what").split()

SHAPES = {  # name -> (config class, kwargs)
    "tiny": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=384)),
    "small": ("LlamaConfig", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                  num_key_value_heads=8, vocab_size=8192)),
    "qwen0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                     tie_word_embeddings=True, rope_theta=1000000.0)),
}


def build_model_and_data(work: Path, shape: str, n_records: int, seed: int) -> None:
    """A random model of `shape` with the test suite's tiny tokenizer (the embedding is as wide as the shape says),
    and synthetic records with answers of 10-250 words."""
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tokenizer

    tok = make_tokenizer(work / "model")
    cls_name, kw = SHAPES[shape]
    cfg = getattr(transformers, cls_name)(max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)
    import torch

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(work / "model", safe_serialization=True)
    rng = random.Random(seed)
    with (work / "data.jsonl").open("w") as fh:
        for _ in range(n_records):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(10, 250)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]}) + "\n")


def peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_imitate(a: argparse.Namespace, work: Path, packing: bool) -> dict:
    from imitate.config import build
    from imitate.train.loop import TrainConfig, run

    cfg = build(TrainConfig, dict(
        data=[str(work / "data.jsonl")], student=str(work / "model"), out=str(work / f"out-imitate-{packing}"),
        max_steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, max_length=a.max_length, lr=2e-4,
        lora_r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.05, eval_split=0.0, save_every=0, eval_every=0,
        precision="bf16" if a.bf16 else "no", packing=packing, progress=False, seed=a.seed,
        gradient_checkpointing=a.gradient_checkpointing,
    ))
    s = run(cfg)
    return {"tokens_per_s": s["tokens_per_s"], "peak_mb": peak_mb(a.device), "loss": s["train_loss"]}


def worker_trl(a: argparse.Namespace, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(x)["messages"] for x in (work / "data.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    tok = AutoTokenizer.from_pretrained(work / "model")
    dtype = torch.bfloat16 if a.bf16 else torch.float32  # imitate also keeps a frozen LoRA base in bf16 under bf16
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype, use_safetensors=True)
    args = SFTConfig(
        output_dir=str(work / "out-trl"), per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, max_steps=a.steps, learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=0, max_length=a.max_length, bf16=a.bf16, use_cpu=a.device == "cpu", logging_steps=a.steps,
        save_strategy="no", report_to="none", completion_only_loss=True, packing=False, seed=a.seed,
        disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=a.gradient_checkpointing,
    )
    peft = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
    t0 = time.time()
    result = trainer.train()
    seconds = time.time() - t0
    tokens = trainer._total_train_tokens  # real tokens seen (attention_mask sum), TRL's own count
    return {"tokens_per_s": tokens / seconds, "peak_mb": peak_mb(a.device), "loss": result.training_loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["imitate", "imitate-packing", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        if a.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        work = Path(a.work)
        res = worker_trl(a, work) if a.worker == "trl" else worker_imitate(a, work, a.worker == "imitate-packing")
        print("RESULT " + json.dumps(res), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n_records = a.steps * a.batch_size * a.grad_accum + 8
        build_model_and_data(work, a.shape, n_records, a.seed)
        results = {}
        for name in ("trl", "imitate", "imitate-packing"):
            cmd = [sys.executable, __file__, "--worker", name, "--work", str(work)] + [
                x for x in sys.argv[1:] if x not in ("--worker", "--work")
            ]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{name} worker failed (exit {proc.returncode})")
            results[name] = json.loads(line[len("RESULT "):])

    trl = results["trl"]
    print(f"\nshape={a.shape} device={a.device} bf16={a.bf16} steps={a.steps} batch={a.batch_size} "
          f"grad_accum={a.grad_accum} max_length={a.max_length} lora_r={a.lora_r} "
          f"gradient_checkpointing={a.gradient_checkpointing}")
    print(f"{'trainer':<22}{'tokens/s':>12}{'x TRL':>8}{'peak MB':>12}{'x TRL':>8}{'final loss':>12}")
    labels = {"trl": "TRL SFTTrainer", "imitate": "imitate train", "imitate-packing": "imitate --packing"}
    for name, label in labels.items():
        r = results[name]
        print(f"{label:<22}{r['tokens_per_s']:>12.0f}{r['tokens_per_s'] / trl['tokens_per_s']:>8.2f}"
              f"{r['peak_mb']:>12.0f}{r['peak_mb'] / trl['peak_mb']:>8.2f}{r['loss']:>12.4f}")


if __name__ == "__main__":
    main()
