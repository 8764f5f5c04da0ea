"""Figures: one function per figure, fed by the stage tables (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from .io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path, dpi: int) -> Path:
    """Write a figure atomically and free it."""
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(out)


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
    return _save(fig, out, dpi)


def density_histogram(hist: dict, out: str | Path, title: str = "", size=(7, 4.2), dpi: int = 110) -> Path:
    """Log10 feature density over the eval tokens; the dead count in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size)
    edges, counts = hist.get("edges", []), hist.get("counts", [])
    if counts:
        ax.stairs(counts, edges, fill=True, alpha=0.75, color="tab:blue",
                  label=f"live features ({sum(counts)}); dead: {hist['n_dead']}")
        ax.legend(loc="upper left", frameon=False)
    else:
        ax.text(0.5, 0.5, f"every feature is dead ({hist['n_dead']})", ha="center", transform=ax.transAxes)
    ax.set_xlabel("log10 feature density (fraction of eval tokens on which it fires)")
    ax.set_ylabel("features")
    ax.set_title(title or "feature density")
    ax.grid(alpha=0.3)
    return _save(fig, out, dpi)


def loss_by_position(table, out: str | Path, title: str = "", size=(8, 4.5), dpi: int = 110) -> Path:
    """Mean next-token CE by position: clean, SAE spliced in, and zero-ablated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size)
    ax.plot(table["position"], table["ce_clean"], label="clean", color="black", lw=1.8)
    ax.plot(table["position"], table["ce_with_sae"], label="SAE spliced in", color="tab:orange", lw=1.8)
    ax.plot(table["position"], table["ce_with_ablation"], label="zero-ablated", color="tab:red", lw=1.0, ls="--")
    ax.set_xlabel("token position (predicted token)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title or "loss over context length")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, out, dpi)
