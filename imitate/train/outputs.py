"""What a training run leaves behind: the saved model (adapter, full or merged weights) with its tokenizer and config,
metrics.jsonl, the loss plot, and the progress bar on stderr."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imitate.config import to_dict
from imitate.records import dumps, iter_jsonl, write_jsonl


def save_outputs(accelerator: Any, model: Any, tokenizer: Any, cfg: Any, student: str, rows: list) -> dict:
    """out/: the adapter (or full weights) + tokenizer + train_config.json + loss.png; with --merge the merged weights
    in out/ and the adapter in out/adapter/. Everything loads with transformers (+ peft for an adapter) alone.
    A failed write (a full disk) is an ImitateError; the run's checkpoints are still there to --resume from."""
    import os

    from imitate.train.checkpoint import latest
    from imitate.writes import HINTS, failed_write_errno, write_error

    try:
        return _save_outputs(accelerator, model, tokenizer, cfg, student, rows)
    except Exception as exc:
        code = failed_write_errno(exc)
        if code is None:
            raise
        last = latest(Path(cfg.out))
        kept = f"the model is not complete; the last checkpoint is kept ({last})" if last else \
            "the model is not complete and the run kept no checkpoint (--save-every N keeps some)"
        hint = HINTS[code].replace("run the same command", "run the same command" + (" with --resume" if last else ""))
        raise write_error(OSError(code, os.strerror(code)), cfg.out, kept, hint=hint) from None


def _save_outputs(accelerator: Any, model: Any, tokenizer: Any, cfg: Any, student: str, rows: list) -> dict:
    from imitate.train.plot import plot_metrics

    out = Path(cfg.out)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards; every rank must call it
    files: dict[str, str] = {}
    if accelerator.is_main_process:
        target = out / "adapter" if cfg.merge else out
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(target)
        files["adapter" if not cfg.full else "model"] = str(target)
        if cfg.merge:
            files["model"] = str(merge_adapter(student, target, out, cfg.trust_remote_code))
            tokenizer.save_pretrained(out)
        (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        files["metrics"] = str(out / "metrics.jsonl")
        png = plot_metrics(rows, out / "loss.png")
        if png is not None:
            files["plot"] = str(png)
    accelerator.wait_for_everyone()
    return files


def merge_adapter(student: str, adapter_dir: Path, out: Path, trust_remote_code: bool) -> Path:
    """Fold the adapter into a fresh fp32 copy of the base weights (on CPU) and save the full model to `out`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(student, use_safetensors=True, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    return out


def peak_memory_mb(accelerator: Any) -> float | None:
    import torch

    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (whole process)
    except ImportError:  # pragma: no cover - not on Linux
        return None


def read_metrics(path: Path, upto: int) -> list[dict]:
    """Rows up to step `upto` (a resumed run drops what a killed run logged after its checkpoint; a torn line too)."""
    if not path.exists():
        return []
    return [line.data for line in iter_jsonl(path, on_bad_line="skip") if line.data.get("step", 0) <= upto]


write_metrics = write_jsonl  # the resumed run's rows, atomically (temp file + rename)


def append_metrics(path: Path, row: dict, accelerator: Any = None) -> None:
    """One row to metrics.jsonl, and to the --report-to trackers when `accelerator` has any."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(dumps(row) + "\n")
    if accelerator is not None:
        from imitate.train import trackers

        trackers.log(accelerator, row)


class ProgressBar:
    """The train bar (imitate.progress.Bar): steps, loss, tokens/s and time left; a no-op on other ranks or disabled."""

    def __init__(self, total: int, start: int, enabled: bool):
        from imitate.progress import Bar

        self.bar = Bar("train", total, enabled=enabled, completed=start, fields={"loss": "-", "tps": "-"},
                       columns=["loss {loss}", "{tps} tok/s"])

    def update(self, done: int, loss: float | None, tokens_per_s: float) -> None:
        shown = "-" if loss is None else f"{loss:.4f}"  # None: no CE yet (all on-policy)
        self.bar.update(completed=done, loss=shown, tps=f"{tokens_per_s:,.0f}")

    def close(self) -> None:
        self.bar.close()