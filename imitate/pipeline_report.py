"""The human summary `imitate run` prints at the end: one line per run (status, seconds, its stage's headline
numbers), then the eval scores side by side."""

from __future__ import annotations

from typing import Any

# The number worth showing first for each stage, looked up in its summary in this order.
HEADLINE_KEYS = {
    "collect": ("requests", "sent", "cached", "failed"),
    "clean": ("in", "out", "removed_total"),
    "init-student": ("params", "teacher_params"),
    "train": ("steps", "train_loss", "eval_loss"),
    "eval": ("score", "agreement", "teacher_score", "n"),
}


def headline(stage: str, summary: Any) -> str:
    if not isinstance(summary, dict):
        return ""
    parts = []
    for key in HEADLINE_KEYS.get(stage, ()):
        v = summary.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{key} {v:.4f}" if isinstance(v, float) else f"{key} {v}")
    distill = summary.get("distill")
    if isinstance(distill, dict) and isinstance(distill.get("on_rate"), dict):  # SCKD: how often each term counted
        parts += [f"sckd on-rate {term} {rate:.2f}" for term, rate in distill["on_rate"].items() if rate is not None]
    return ", ".join(parts)


def _num(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def format_report(result: dict) -> str:
    """A table of every run: status, seconds, headline numbers; then the eval scores side by side."""
    rows = [("run", "status", "seconds", "result")]
    for r in result["runs"]:
        detail = r.get("error") or headline(r["stage"], r["summary"])
        rows.append((r["name"], r["status"].replace("_", " "), f"{r['seconds']:.1f}", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    evals = [r for r in result["runs"] if r["stage"] == "eval" and isinstance(r["summary"], dict)]
    if evals:
        lines += ["", "eval scores (held-out prompts):"]
        width = max(len(r["name"]) for r in evals)
        for r in evals:
            s = r["summary"]
            line = f"  {r['name'].ljust(width)}  score {_num(s.get('score'))}"
            if s.get("agreement") is not None:
                line += f"  agreement with teacher {_num(s.get('agreement'))}"
            if s.get("rouge_l") is not None:
                line += f"  ROUGE-L {_num(s.get('rouge_l'))}"
            if s.get("loss") is not None:
                line += f"  NLL of teacher answers {_num(s.get('loss'))}"
            lines.append(line + ("  (gate FAILED)" if r["status"] == "gate_failed" else ""))
    return "\n".join(lines)
