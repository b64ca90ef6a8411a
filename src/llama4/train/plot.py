"""PNG charts of a run's metrics.jsonl (matplotlib, Agg backend).

Writes OUT/plots/loss.png (train and validation loss), lr.png (learning rate) and, for MoE
models, expert_load.png (per layer: the busiest expert's load as a multiple of the mean, and
the number of dead experts).
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="train")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["lr"] for r in records])
    ax.set(xlabel="step", ylabel="learning rate")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    with_experts = [r for r in records if r.get("experts")]
    if with_experts:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        layers = sorted({e["layer"] for r in with_experts for e in r["experts"]})
        for layer in layers:
            pts = [(r["step"], e) for r in with_experts for e in r["experts"] if e["layer"] == layer]
            xs = [s for s, _ in pts]
            top.plot(xs, [e["max_load"] for _, e in pts], label=f"layer {layer}")
            bottom.plot(xs, [e["dead"] for _, e in pts], label=f"layer {layer}")
        top.axhline(1.0, color="gray", lw=0.8, ls="--")
        top.set(ylabel="max expert load / mean", title="expert load")
        bottom.set(xlabel="step", ylabel="dead experts")
        bottom.set_ylim(
            bottom=-0.1, top=max(1, *(e["dead"] for r in with_experts for e in r["experts"])) + 0.5
        )
        bottom.yaxis.get_major_locator().set_params(integer=True)
        for a in (top, bottom):
            a.grid(alpha=0.3)
        if len(layers) <= 12:
            top.legend(fontsize=7, ncol=2)
        save(fig, "expert_load.png")
    return written
