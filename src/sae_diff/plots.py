"""Figures: one function per figure, fed by the stage tables (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from .io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(rows: list[dict], out: str | Path, title: str = "", size=(10, 6.5), dpi: int = 110) -> Path:
    """Loss, FVU, L0 and dead fraction against training tokens (one SAE's train_log.jsonl)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=size, sharex=True)
    tokens = [r["tokens"] for r in rows]
    panels = [("loss", "training loss", "log"), ("fvu", "FVU (batch, lower is better)", "log"),
              ("l0", "L0 (active latents per token)", "linear"), ("dead_fraction", "dead fraction", "linear")]
    for ax, (key, label, scale) in zip(axes.flat, panels):
        values = [r.get(key, float("nan")) for r in rows]
        ax.plot(tokens, values, color="tab:blue", lw=1.6)
        ax.set_ylabel(label)
        if scale == "log" and all(v > 0 for v in values if v == v):
            ax.set_yscale("log")
        if key == "dead_fraction":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("training tokens")
    fig.suptitle(title or "SAE training")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(out)
