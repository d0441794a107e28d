"""The printed table: per-run costs from metrics.jsonl, the accuracy table and the differences under it."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from . import teams


def run_costs(out: Path) -> dict | None:
    """From an imitate run's metrics.jsonl (None for the reference loop, which writes none): the mean optimizer step
    time (`step_s`, for ratios between modes), and for a run with both on-policy and off-policy (warm-up) steps the
    step-time ratio of the two kinds, the generation share of on-policy steps, the cap-hit rate and the mean
    generated length."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if "step_s" in r]  # not the eval_loss rows
    costs = {"step_s": statistics.mean(r["step_s"] for r in rows)}
    costs.update({k: v for k, v in rows[-1].items() if k.startswith("on_rate/")})  # SCKD: the whole run's on-rates
    on = [r for r in rows if r.get("onpolicy/share", 0) > 0]
    off = [r for r in rows if r.get("onpolicy/share") == 0]
    if on and off:
        on_s, off_s = statistics.mean(r["step_s"] for r in on), statistics.mean(r["step_s"] for r in off)
        costs.update(ratio=on_s / off_s, gen=sum(r["gen_s"] for r in on) / sum(r["step_s"] for r in on),
                     cap=statistics.mean(r["onpolicy/cap_hit"] for r in on),
                     len=statistics.mean(r["onpolicy/gen_tokens"] for r in on))
    return costs


def paired(a: list[float], b: list[float]) -> str:
    """Seed-by-seed differences of two modes that start from the same students: their spread leaves out how good
    each seed's start was, which dominates the spread of either mode alone."""
    d = [x - y for x, y in zip(a, b)]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return f"paired {statistics.mean(d):+.3f} ± {sd:.3f}, higher in {sum(x > 0 for x in d)}/{len(d)} seeds"


def print_table(table: list[dict], modes: list[str], seeds: list[int], elapsed: float, args) -> None:
    print(f"\nheld-out accuracy, mean ± std over {len(seeds)} seed(s) (training seconds per run, 'earlier': trained by "
          f"an earlier invocation, --reuse); torch threads {args.threads}, "
          f"{args.jobs} job(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    head = "| task | records | steps | teacher | " + " | ".join(modes) + " |"
    print(head)
    print("|" + "---|" * (4 + len(modes)))
    for r in table:
        cells = [f"{r[m][0]:.3f} ± {r[m][1]:.3f} ({'earlier' if r[m][2] is None else f'{r[m][2]:.0f}s'})"
                 for m in modes]
        print(f"| {r['task']} | {r['records']} | {r['steps']} | {r['teacher']:.3f} | " + " | ".join(cells) + " |")
    if "reference" in modes and "sft" in modes:
        gaps = ", ".join(f"{r['task']} {r['sft'][0] - r['reference'][0]:+.3f}" for r in table)
        print(f"sft - reference: {gaps}  (target: within 0.02)")
    if "kd" in modes and "sft" in modes:
        print("kd - sft: " + ", ".join(f"{r['task']} {r['kd'][0] - r['sft'][0]:+.3f}" for r in table))
    if "x_sft" in modes:  # issue #22's targets
        for m in (m for m in ("x_kd", "x_gb5", "x_gb20") if m in modes):
            print(f"{m} - x_sft: " + ", ".join(
                f"{r['task']} {r[m][0] - r['x_sft'][0]:+.3f} (spread {max(r[m][1], r['x_sft'][1]):.3f})"
                for r in table))
        if "kd" in modes and "sft" in modes and "x_kd" in modes:
            share = ", ".join(f"{r['task']} " + (f"{(r['x_kd'][0] - r['x_sft'][0]) / (r['kd'][0] - r['sft'][0]):.2f}"
                                                 if r["kd"][0] != r["sft"][0] else "n/a (kd = sft)") for r in table)
            print(f"cross-tokenizer share of same-tokenizer KD's gain over SFT ((x_kd - x_sft) / (kd - sft)): {share}")
    if "sckd" in modes and "kd" in modes:
        print("sckd - kd: " + ", ".join(f"{r['task']} {r['sckd'][0] - r['kd'][0]:+.3f}" for r in table))
    for m in (m for m in modes if m.startswith("sft_op")):  # from the same SFT'd students
        for base in ("sft_kd", "sft_sft"):
            if base in modes:
                print(f"{m} - {base}: " + ", ".join(
                    f"{r['task']} {r[m][0] - r[base][0]:+.3f} (spread {max(r[m][1], r[base][1]):.3f}; "
                    f"{paired(r[f'accs/{m}'], r[f'accs/{base}'])})" for r in table))
        if "sft_kd" in modes:
            print(f"{m} step time / sft_kd step time: " + ", ".join(
                f"{r['task']} {r[f'cost/{m}']['step_s'] / r['cost/sft_kd']['step_s']:.2f}x" for r in table
                if f"cost/{m}" in r and "cost/sft_kd" in r))
    for m in (m for m in modes if m.startswith("op")):
        for base in ("kd", "sft"):
            if base in modes:
                print(f"{m} - {base}: " + ", ".join(
                    f"{r['task']} {r[m][0] - r[base][0]:+.3f} (spread {max(r[m][1], r[base][1]):.3f})" for r in table))
        print(f"{m} step time on-policy / off-policy (same run): " + ", ".join(
            f"{r['task']} {c['ratio']:.2f}x (generation {c['gen']:.0%} of an on-policy step, {c['len']:.1f} tokens, "
            f"cap hit {c['cap']:.0%})" for r in table if "ratio" in (c := r.get(f"cost/{m}", {}))))
    teams.report(table, modes)
    print(f"total {elapsed:.0f}s")
