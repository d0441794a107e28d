"""The loss-curve PNG of a training run, drawn from its metrics.jsonl rows (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_metrics(rows: list[dict], path: Path) -> Path | None:
    """Train loss per step and eval loss at its steps; series named `on_rate/...` (distillation gates), if any, on a
    second panel. Returns the path, or None when there is nothing to draw."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    gates = sorted({k for r in rows for k in r if k.startswith("on_rate/")})
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 if gates else 1, 1, figsize=(7, 6 if gates else 4), squeeze=False, sharex=True)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_ylabel("loss per target token")
    ax.legend()
    ax.grid(alpha=0.3)
    if gates:
        gx = axes[1][0]
        for name in gates:
            pts = [(r["step"], r[name]) for r in rows if name in r]
            gx.plot(*zip(*pts), label=name.split("/", 1)[1])
        gx.set_ylabel("gate on-rate")
        gx.set_ylim(-0.05, 1.05)
        gx.legend()
        gx.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
