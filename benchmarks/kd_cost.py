"""What distillation costs per optimizer step: SFT vs logit KD vs KD + feature KD vs KD + SCKD (+ an unchunked KD loss),
and with two teachers: one term each, one term each + SCKD (a gate per teacher), --teacher-mix mean.

Same LoRA student, same frozen teacher, same batch, one run; each mode runs `imitate.train.step.accumulate_window`
(the code `imitate train` runs) + the optimizer step. Printed: median step time and peak memory, each as a ratio to SFT.

Peak memory: on CPU, the peak of live bytes allocated by torch during one whole step (forward, backward, optimizer),
from the torch profiler's memory events (weights and the batch already allocated before the step are not counted);
on CUDA, torch.cuda.max_memory_allocated during the step minus the allocation before it. Both count tensors only, not
allocator caches or the Python heap.

The shape makes the vocabulary dominate memory, as it does for real LLMs: vocab 32k, student hidden 256 (2 layers),
teacher hidden 512 (4 layers), batch 4 x 512 tokens with every answer token a target (~2k target tokens: one float32
[targets x vocab] tensor is 250 MiB). The second teacher is the same shape with other weights; teachers' weights are
allocated before the step, so they are not in the step's peak (their size is printed apart).

    python benchmarks/kd_cost.py                  # CPU (2 cores: ~2 minutes)
    python benchmarks/kd_cost.py --device cuda --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import statistics
import time


def build_models(args, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=args.seq, tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).to(device)

    student = llama(args.student_hidden, args.student_layers, 0)
    student.config.use_cache = False
    student = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    teachers = [llama(args.teacher_hidden, args.teacher_layers, seed).eval().requires_grad_(False) for seed in (1, 2)]
    if args.teacher_dtype == "bfloat16":
        teachers = [t.to(torch.bfloat16) for t in teachers]
    return student, teachers


def make_batch(args, device):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = torch.full_like(ids, -100)
    prompt = args.seq // 8  # the first eighth of every row is "prompt": no target there
    labels[:, prompt:-1] = ids[:, prompt + 1 :]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}, int((labels != -100).sum())


class NaiveKD:
    """The unchunked reference: full [targets x vocab] logits of both models, divergence on all of them at once."""

    def __init__(self, distiller):
        self.d, self.terms, self.w, self.regressors = distiller, ["logit_kd"], distiller.w, None

    def losses(self, model, batch):
        import torch
        import torch.nn.functional as F

        from imitate.train.losses import divergence

        # unchunked: both models' logits at every column holding a target, full vocabulary width
        cols = (batch["labels"] != -100).any(0).nonzero().squeeze(-1)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        targets = batch["labels"][:, cols]
        keep = targets != -100
        s = model(**inputs, logits_to_keep=cols, use_cache=False).logits[keep]
        terms = {"ce": F.cross_entropy(s.float(), targets[keep], reduction="sum")}
        teacher = self.d.teacher
        with torch.no_grad():
            t = teacher(**inputs, logits_to_keep=cols).logits[keep]
        cfg = self.d.cfg
        terms["logit_kd"] = divergence(s, t, self.d.beta, cfg.temperature).sum() * cfg.temperature**2
        return terms

    def combine(self, terms):
        return terms["ce"] * (1 - self.w) + terms["logit_kd"] * self.w


def measure(step, device, repeat):
    """(median seconds, peak MiB) of `step()`; the first call warms up."""
    import torch

    step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        live = top = 0
        for e in events:
            live += e.nbytes()
            top = max(top, live)
        peak = top / 2**20
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--student-hidden", type=int, default=256)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--teacher-hidden", type=int, default=512)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256, help="--kd-chunk-size")
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    args = ap.parse_args()

    import torch
    from accelerate import Accelerator

    from imitate.config import build
    from imitate.train import distill
    from imitate.train.config import TrainConfig
    from imitate.train.features import FeatureRegressors, parse_pairs, term_name
    from imitate.train.sckd import SCKDGate
    from imitate.train.step import accumulate_window

    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision="no")
    device = accelerator.device
    student, (teacher, teacher2) = build_models(args, device)
    batch, n_targets = make_batch(args, device)
    cfg = build(TrainConfig, {"data": ["-"], "student": "-", "out": "-", "teacher": "hf:-",
                              "kd_chunk_size": args.chunk})
    pairs = parse_pairs("auto", args.student_layers, args.teacher_layers)

    def plan(with_pairs):
        p = distill.Plan(teacher="-", vocab_size=args.vocab, student_width=args.student_hidden,
                         teacher_width=args.teacher_hidden, pairs=pairs if with_pairs else [])
        p.terms = [distill.LOGIT] + [term_name(x) for x in p.pairs]
        return p

    params = [p for p in student.parameters() if p.requires_grad]
    regs = FeatureRegressors(pairs, args.student_hidden, args.teacher_hidden).to(device)
    model = accelerator.prepare(student)
    kd = distill.Distiller(cfg, plan(False), teacher)
    two = {"data": ["-"], "student": "-", "out": "-", "teacher": ["hf:a", "hf:b"], "kd_chunk_size": args.chunk}
    cfg2, cfg_mean = build(TrainConfig, two), build(TrainConfig, {**two, "teacher_mix": "mean"})
    plan2, plan_mean = plan(False), plan(False)
    plan2.terms = ["logit_kd/a", "logit_kd/b"]
    kd2 = distill.Distiller(cfg2, plan2, teacher, teachers=[teacher, teacher2])
    kd_mean = distill.Distiller(cfg_mean, plan_mean, teacher, teachers=[teacher, teacher2])
    modes = {
        "SFT": (None, None, []),
        "logit KD (chunked)": (kd, None, []),
        "KD + feature KD": (distill.Distiller(cfg, plan(True), teacher, regs), None, list(regs.parameters())),
        "KD + SCKD": (kd, SCKDGate(params, kd.weights()), []),
        "logit KD, unchunked": (NaiveKD(kd), None, []),
        "2 teachers, a term each": (kd2, None, []),
        "2 teachers + SCKD": (kd2, SCKDGate(params, kd2.weights()), []),
        "2 teachers, mix mean": (kd_mean, None, []),
    }
    t_mib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
    print(f"device {device}; vocab {args.vocab}, student hidden {args.student_hidden} x {args.student_layers} layers "
          f"(LoRA r16), teacher hidden {args.teacher_hidden} x {args.teacher_layers} layers ({args.teacher_dtype}); "
          f"batch {args.batch} x {args.seq} tokens, {n_targets} targets; one float32 [targets x vocab] = "
          f"{n_targets * args.vocab * 4 / 2**20:.0f} MiB; chunk {args.chunk}; weights {t_mib:.0f} MiB per teacher")
    print("peak memory: " + ("CUDA max_memory_allocated above the pre-step allocation" if device.type == "cuda" else
                             "torch profiler memory events, peak live bytes allocated during one step"))
    results = {}
    for name, (distiller, gate, extra) in modes.items():
        optimizer = torch.optim.AdamW(params + extra, lr=1e-4)

        def step(distiller=distiller, gate=gate, optimizer=optimizer):
            accumulate_window(accelerator, model, [batch], n_targets, distiller, gate)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        results[name] = measure(step, device, args.repeat)
        del optimizer
    t0, m0 = results["SFT"]
    tkd = results["logit KD (chunked)"][0]
    print(f"\n{'mode':26s} {'step s':>8s} {'x SFT':>7s} {'x KD':>6s} {'peak MiB':>9s} {'x SFT':>7s}")
    for name, (t, m) in results.items():
        print(f"{name:26s} {t:8.3f} {t / t0:7.2f} {t / tkd:6.2f} {m:9.0f} {m / m0:7.2f}")
    m_kd, t_sckd = results["logit KD (chunked)"][1], results["KD + SCKD"][0]
    print(f"\ntargets: chunked KD peak <= 1.25x SFT: {m_kd / m0:.2f}x ({'met' if m_kd / m0 <= 1.25 else 'MISSED'}); "
          f"SCKD step <= 1.5x KD: {t_sckd / tkd:.2f}x ({'met' if t_sckd / tkd <= 1.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
