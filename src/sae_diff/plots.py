"""Figures: one function per figure, fed by the stage tables (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from .experiments import DIRECTION_COMPARISONS
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


def message(text: str, out: str | Path, size=(8, 3), dpi: int = 110) -> Path:
    """A figure that states why a stage had nothing to draw (a skipped probe, say)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11)
    ax.set_axis_off()
    return _save(fig, out, dpi)


def training_curves(rows: list[dict], out: str | Path, title: str = "", size=(10, 6.5), dpi: int = 110) -> Path:
    """Loss, FVU, L0 and dead fraction against training tokens (one SAE's train_log.jsonl)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=size, sharex=True)
    tokens = [r["tokens"] for r in rows]
    panels = [
        ("loss", "training loss", "log"),
        ("fvu", "FVU (lower is better)", "log"),
        ("l0", "L0 (active latents per token)", "linear"),
        ("dead_fraction", "dead fraction", "linear"),
    ]
    for ax, (key, label, scale) in zip(axes.flat, panels):
        values = [r.get(key, float("nan")) for r in rows]
        ax.plot(tokens, values, color="tab:blue", lw=1.6, label="training batch")
        if key == "fvu" and any("heldout_fvu" in r for r in rows):
            held = [(r["tokens"], r["heldout_fvu"]) for r in rows if "heldout_fvu" in r]
            ax.plot(*zip(*held), color="tab:orange", lw=1.6, marker="o", ms=3, label="held-out (convergence)")
            ax.legend(frameon=False, fontsize=8)
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
        ax.stairs(
            counts,
            edges,
            fill=True,
            alpha=0.75,
            color="tab:blue",
            label=f"live features ({sum(counts)}); dead: {hist['n_dead']}",
        )
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


def metric_per_iteration(
    metric_block: dict, metric: str, out: str | Path, subtitle: str = "", size=(7, 4.2), dpi: int = 110
) -> Path:
    """A metric's mean per iteration with bootstrap 95% CIs: all samples and held-out prompts."""
    plt = _pyplot()
    block = metric_block["per_iteration"]
    names = list(block)
    fig, ax = plt.subplots(figsize=size)
    for offset, (part, label, color) in enumerate(
        [("all", "all prompts", "tab:blue"), ("eval", "held-out prompts", "tab:orange")]
    ):
        xs, means, errs = [], [], [[], []]
        for i, name in enumerate(names):
            stats = block[name][part]
            if stats["mean"] is None:
                continue
            xs.append(i + (offset - 0.5) * 0.12)
            means.append(stats["mean"])
            errs[0].append(stats["mean"] - stats["ci_low"])
            errs[1].append(stats["ci_high"] - stats["mean"])
        n = [block[name][part]["n"] for name in names]
        ax.errorbar(
            xs,
            means,
            yerr=errs,
            marker="o",
            capsize=4,
            lw=1.6,
            color=color,
            label=f"{label} (n = {', '.join(map(str, n))})",
        )
    ax.set_xticks(range(len(names)), [f"{m}\n({block[m]['data']})" for m in names])
    ax.set_xlabel("iteration (model, and the data it generated)")
    ax.set_ylabel(f"mean {metric} (95% bootstrap CI)")
    shift_block = metric_block.get("shift", {})
    shift = shift_block.get("all")
    title = f"{metric} per iteration" + (f" ({subtitle})" if subtitle else "")
    if shift and shift["diff"] is not None:
        title += (
            f"\nshift {shift_block['from']}→{shift_block['to']}: {shift['diff']:+.3f} "
            f"[{shift['ci_low']:+.3f}, {shift['ci_high']:+.3f}]"
        )
    ax.set_title(title)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, out, dpi)


# --------------------------------------------------------------------------- features


def _log10_positive(values):
    import numpy as np

    values = np.asarray(values, dtype=float)
    return np.log10(values[values > 0])


def feature_statistics(
    stats, sample_l0, groups_block: dict, out: str | Path, title: str = "", size=(15, 12), dpi: int = 110
) -> Path:
    """Nine panels on one SAE's features: how often and how strongly they fire, where, for whom.

    sample_l0: each sample's mean number of active features per token.
    """
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(3, 3, figsize=size)
    live = stats[~stats["dead"]]
    ax = axes[0, 0]
    ax.hist(_log10_positive(live["freq"]), bins=40, color="tab:blue", alpha=0.8)
    ax.set(
        xlabel="log10 firing frequency (fraction of eval tokens)", ylabel="features", title="how often features fire"
    )
    ax = axes[0, 1]
    ax.hist(live["mean_act"].dropna(), bins=40, color="tab:green", alpha=0.8)
    ax.set(xlabel="mean activation when firing", ylabel="features", title="activation strength")
    ax = axes[0, 2]
    ax.scatter(live["freq"], live["max_act"], s=4, alpha=0.4, color="tab:purple")
    ax.set_xscale("log")
    ax.set(xlabel="firing frequency (log)", ylabel="max activation", title="strength vs frequency")
    ax = axes[1, 0]
    ax.hist(np.asarray(sample_l0, dtype=float), bins=30, color="tab:orange", alpha=0.8)
    ax.set(xlabel="mean L0 per token of a sample (active features)", ylabel="samples", title="sparsity per sample")
    ax = axes[1, 1]
    counts = {
        "live": len(live),
        "dead": int(stats["dead"].sum()),
        "prompt-only": int(stats["prompt_only"].sum()),
        "completion-only": int(stats["completion_only"].sum()),
    }
    bars = ax.bar(list(counts), list(counts.values()), color=["tab:blue", "tab:red", "tab:gray", "tab:cyan"])
    ax.bar_label(bars, fmt="%d")
    ax.set(ylabel="features", title="dictionary use")
    ax = axes[1, 2]
    ax.hist(live["mean_rel_position"].dropna(), bins=30, range=(0, 1), color="tab:brown", alpha=0.8)
    ax.set(
        xlabel="mean relative firing position (0 = first kept token, 1 = last)",
        ylabel="features",
        title="where in the sequence",
    )
    ax = axes[2, 0]
    ax.scatter(live["freq"], live["seq_freq"], s=4, alpha=0.4, color="tab:olive")
    ax.set_xscale("log")
    ax.set(xlabel="token frequency (log)", ylabel="fraction of sequences", title="bursty vs spread out")
    ax = axes[2, 1]
    group_sets = groups_block.get("groups", {})
    if group_sets:
        column, values = next(iter(group_sets.items()))
        names = list(values)
        ax.bar(names, [values[n]["l0"] or 0 for n in names], color="tab:blue", alpha=0.8, label="L0 per token")
        ax2 = ax.twinx()
        ax2.plot(names, [values[n]["dead_features"] for n in names], "o-", color="tab:red", label="dead features")
        ax2.set_ylabel("dead features", color="tab:red")
        ax.set(ylabel="L0 per token", title=f"by {column}")
    else:
        ax.text(
            0.5,
            0.5,
            "no group column configured\n(features.group_columns)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
    ax = axes[2, 2]
    d_columns = [c for c in stats.columns if c.startswith("cohens_d_")]
    if d_columns:
        d = stats[d_columns[0]].dropna()
        ax.hist(d, bins=40, color="tab:pink", alpha=0.8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set(
            xlabel=d_columns[0].replace("cohens_d_", "Cohen's d, ").replace("_vs_", " vs "),
            ylabel="features",
            title="group effect sizes",
        )
    else:
        ax.hist(stats["enc_norm"], bins=40, color="tab:gray", alpha=0.8)
        ax.set(xlabel="encoder norm", ylabel="features", title="encoder norms")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.suptitle(title or "feature statistics", fontsize=14)
    return _save(fig, out, dpi)


def group_bias(
    panels: list[tuple[str, dict]], out: str | Path, title: str = "", top: int = 10, size=(13, 5), dpi: int = 110
) -> Path:
    """Top features each way by Cohen's d, one panel per subset (all samples, each language)."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(size[0], size[1]), squeeze=False)
    for ax, (name, block) in zip(axes[0], panels):
        a, b = block["a"], block["b"]
        up, down = block[f"top_{a}"][:top], block[f"top_{b}"][:top]
        labels = [f"#{j}" for j, _ in up] + [f"#{j}" for j, _ in down]
        values = [v for _, v in up] + [v for _, v in down]
        colors = ["tab:red"] * len(up) + ["tab:blue"] * len(down)
        ypos = np.arange(len(values))[::-1]
        ax.barh(ypos, values, color=colors)
        ax.set_yticks(ypos, labels, fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set(xlabel=f"Cohen's d ({a} − {b})", title=f"{name}: n={block['n_a']} {a}, {block['n_b']} {b}")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title or "features by group effect size (red: more active for the first group)")
    return _save(fig, out, dpi)


def embeddings(
    x,
    labels,
    out: str | Path,
    title: str = "",
    markers=None,
    perplexity: float = 30.0,
    seed: int = 0,
    size=(13, 5.5),
    dpi: int = 110,
) -> Path:
    """PCA and t-SNE of the per-sample feature activations, coloured by group."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = _pyplot()
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    pca = PCA(n_components=min(50, *x.shape), random_state=seed).fit(x)
    reduced = pca.transform(x)
    tsne = TSNE(
        n_components=2, perplexity=min(perplexity, max(2.0, (len(x) - 1) / 3)), random_state=seed, init="pca"
    ).fit_transform(reduced)
    fig, axes = plt.subplots(1, 2, figsize=size)
    shapes = np.asarray(markers).astype(str) if markers is not None else None
    marker_of = {m: s for m, s in zip(sorted(set(shapes)) if shapes is not None else [], "o^sDvP*X")}
    for ax, points, name in ((axes[0], reduced[:, :2], "PCA"), (axes[1], tsne, "t-SNE")):
        for value in sorted(set(labels)):
            for shape in sorted(marker_of) if shapes is not None else [None]:
                rows = (labels == value) & ((shapes == shape) if shape is not None else True)
                if rows.any():
                    ax.scatter(
                        points[rows, 0],
                        points[rows, 1],
                        s=14,
                        alpha=0.7,
                        marker=marker_of.get(shape, "o"),
                        label=f"{value}" + (f" / {shape}" if shape is not None else ""),
                    )
        ax.set(
            title=name,
            xlabel=f"{name} 1" + (f" ({pca.explained_variance_ratio_[0]:.0%} var.)" if name == "PCA" else ""),
            ylabel=f"{name} 2" + (f" ({pca.explained_variance_ratio_[1]:.0%} var.)" if name == "PCA" else ""),
        )
        ax.grid(alpha=0.3)
    axes[1].legend(frameon=False, fontsize=8, loc="best")
    fig.suptitle(title or "samples in feature space")
    return _save(fig, out, dpi)


def coactivation_heatmap(
    matrix,
    classes: list[str],
    out: str | Path,
    title: str = "",
    top: int | None = None,
    cmap: str = "viridis",
    size=(14, 6),
    dpi: int = 110,
) -> Path:
    """Class x feature mean activations: all live features (sorted by the class they peak for),
    or the ``top`` features with the largest spread across classes."""
    import numpy as np

    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.float64)
    live = np.nonzero(matrix.max(axis=0) > 0)[0]
    if top is not None:
        spread = matrix[:, live].max(axis=0) - matrix[:, live].min(axis=0)
        columns = live[np.argsort(-spread, kind="stable")[:top]]
        columns = columns[np.lexsort((-matrix[:, columns].max(axis=0), matrix[:, columns].argmax(axis=0)))]
    else:
        columns = live[np.lexsort((-matrix[:, live].max(axis=0), matrix[:, live].argmax(axis=0)))]
    fig, ax = plt.subplots(figsize=(size[0], max(size[1], 0.25 * len(classes) + 2)))
    shown = matrix[:, columns]
    image = ax.imshow(shown, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(classes)), classes, fontsize=7 if len(classes) > 20 else 9)
    if top is not None and len(columns) <= 60:
        ax.set_xticks(range(len(columns)), [str(j) for j in columns], rotation=90, fontsize=6)
        ax.set_xlabel("feature")
    else:
        ax.set_xlabel(f"{len(columns)} live features, grouped by the class they peak for")
    fig.colorbar(image, ax=ax, label="mean activation")
    ax.set_title(title or "co-activation")
    return _save(fig, out, dpi)


def coactivation_layers(
    panels: list[tuple[str, object, list[str]]],
    out: str | Path,
    title: str = "",
    top: int = 50,
    cmap: str = "viridis",
    size=(14, 4),
    dpi: int = 110,
) -> Path:
    """Top-``top`` co-activation heatmaps of one SAE config at every layer, one row per layer."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(size[0], size[1] * len(panels)), squeeze=False)
    for ax, (name, matrix, classes) in zip(axes[:, 0], panels):
        matrix = np.asarray(matrix, dtype=np.float64)
        spread = matrix.max(axis=0) - matrix.min(axis=0)
        columns = np.argsort(-spread, kind="stable")[:top]
        columns = columns[np.argsort(matrix[:, columns].argmax(axis=0), kind="stable")]
        normalised = matrix[:, columns] / np.maximum(matrix[:, columns].max(axis=0), 1e-12)
        image = ax.imshow(normalised, aspect="auto", cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
        ax.set_yticks(range(len(classes)), classes, fontsize=7 if len(classes) > 20 else 9)
        ax.set_xticks([])
        ax.set_title(f"{name}: top {len(columns)} features by spread across classes (each column scaled to its max)")
        fig.colorbar(image, ax=ax, label="relative activation")
    fig.suptitle(title or "co-activation across layers")
    return _save(fig, out, dpi)


# --------------------------------------------------------------------------- evolution


def evolution_counts(block: dict, out: str | Path, title: str = "", size=None, dpi: int = 110) -> Path:
    """Top row: per branch and step (and for the model and data effects summed over iterations), each
    label's count as a bar with the resampling null's mean and 95% interval drawn over it; a bar
    outside its interval is outlined. Bottom row: the lineage counts per step (stacked). The title
    says so loudly when the layer's SAEs have not converged."""
    import numpy as np

    plt = _pyplot()
    branches = block["branches"]
    effects = [(k, block[k]) for k in ("model_effect", "data_effect") if block.get(k)]
    n_top = len(branches) + (1 if effects else 0)
    width_ratios = [max(1, len(p["steps"])) for p in branches.values()] + ([max(1, len(effects))] if effects else [])
    size = size or (4.2 * sum(width_ratios) + 2, 8.6)
    fig = plt.figure(figsize=size)
    grid = fig.add_gridspec(2, n_top, width_ratios=width_ratios)
    labels = {"same": "tab:gray", "changed": "tab:orange", "died": "tab:red", "born": "tab:green"}

    def against_null(ax, groups, heading):
        bar_w = 0.8 / len(labels)
        for j, (label, color) in enumerate(labels.items()):
            x = np.arange(len(groups)) + (j - (len(labels) - 1) / 2) * bar_w
            rows = [g[1][label] for g in groups]
            obs = np.array([r["observed"] for r in rows], dtype=float)
            called = [r["called"] for r in rows]
            ax.bar(
                x,
                obs,
                bar_w,
                color=color,
                alpha=0.85,
                label=label,
                edgecolor=["black" if c else color for c in called],
                linewidth=[1.6 if c else 0 for c in called],
            )
            mean = np.array([r["null_mean"] for r in rows])
            low, high = np.array([r["null_low"] for r in rows]), np.array([r["null_high"] for r in rows])
            ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="_", color="black", capsize=3, lw=1.2, ms=8)
        ax.set_xticks(np.arange(len(groups)), [g[0] for g in groups], fontsize=8)
        # 'same' is thousands where the others are tens: a log axis keeps every bar and interval readable
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
        ax.set(ylabel="features (log scale)", title=heading)
        ax.grid(alpha=0.3, axis="y")

    for c, (branch, part) in enumerate(branches.items()):
        ax = fig.add_subplot(grid[0, c])
        groups = [(f"{s['from']}\n→ {s['to']}", s) for s in part.get("steps_vs_null", [])]
        if groups:
            against_null(ax, groups, f"{branch}: each step against the null")
    if effects:
        ax = fig.add_subplot(grid[0, -1])
        names = {"model_effect": "model effect\n(M0Di vs MiDi)", "data_effect": "data effect\n(M0D0 vs M0Di)"}
        against_null(ax, [(names[k], e["labels"]) for k, e in effects], "summed over iterations")
        ax.errorbar([], [], yerr=[], fmt="_", color="black", label="null mean, 95% interval")
        ax.legend(frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left", fontsize=8)
    colors = dict(labels, reverted="tab:purple")
    for c, (branch, part) in enumerate(branches.items()):
        ax = fig.add_subplot(grid[1, c])
        steps = part["steps"]
        names = [f"{s['from']}\n→ {s['to']}" for s in steps]
        bottom = np.zeros(len(steps))
        for key, color in colors.items():
            values = np.array([s[key] for s in steps], dtype=float)
            bars = ax.bar(names, values, bottom=bottom, color=color, label=key)
            ax.bar_label(bars, labels=[f"{int(v)}" if v else "" for v in values], label_type="center", fontsize=8)
            bottom += values
        ax.set(ylabel="lineages", title=f"{branch}: what happened to each lineage")
        ax.grid(alpha=0.3, axis="y")
    source = {"resampling": "the resampling null", "seed_pair": "a seed pair"}[
        block.get("thresholds_from", "seed_pair")
    ]
    heading = title or (
        f"feature evolution (thresholds from {source}: same ≥ {block['thresholds']['same']:.3f}, "
        f"no counterpart < {block['thresholds']['new']:.3f}; null: {block.get('null', {}).get('pairs', 0)} "
        "resampling pairs)"
    )
    if block.get("unconverged"):
        reasons = "; ".join(block["convergence"]["reasons"][:3])
        heading = f"UNCONVERGED SAEs: labels not trustworthy ({reasons})\n" + heading
    fig.suptitle(heading, color="tab:red" if block.get("unconverged") else "black")
    return _save(fig, out, dpi)


def similarity_histograms(
    steps: list[tuple[str, object]],
    null,
    thresholds: dict,
    out: str | Path,
    title: str = "",
    size=(9, 5),
    dpi: int = 110,
    null_label: str = "seed pair (null: only the seed differs)",
) -> Path:
    """Matched decoder cosine of each step against the null the thresholds come from, with the thresholds."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size)
    bins = np.linspace(-0.2, 1.0, 61)
    ax.hist(
        np.asarray(null, dtype=float),
        bins=bins,
        density=True,
        histtype="stepfilled",
        alpha=0.3,
        color="black",
        label=null_label,
    )
    for name, values in steps:
        ax.hist(np.asarray(values, dtype=float), bins=bins, density=True, histtype="step", lw=1.6, label=name)
    ax.axvline(thresholds["same"], color="tab:green", ls="--", label=f"same ≥ {thresholds['same']:.3f}")
    ax.axvline(thresholds["new"], color="tab:red", ls=":", label=f"no counterpart < {thresholds['new']:.3f}")
    ax.set(xlabel="decoder cosine with the Hungarian match", ylabel="density", title=title or "feature similarity")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, dpi)


# --------------------------------------------------------------------------- probes


def probe_auroc(
    rows: list[dict], branches: dict[str, list[str]], out: str | Path, title: str = "", size=(11, 4.5), dpi: int = 110
) -> Path:
    """Nested-CV AUROC per iteration along each branch: SAE-feature probe, random features, raw activations."""
    plt = _pyplot()
    by_cell = {r["cell"]: r for r in rows}
    fig, axes = plt.subplots(1, len(branches), figsize=size, squeeze=False, sharey=True)
    styles = [
        ("auroc", "SAE features (top-k)", "tab:blue", "-o"),
        ("auroc_random_features", "random features (same k)", "tab:gray", "--s"),
        ("auroc_raw_activations", "raw activations (dense)", "tab:orange", ":^"),
    ]
    for ax, (branch, cells) in zip(axes[0], branches.items()):
        for key, label, color, style in styles:
            values = [by_cell.get(c, {}).get(key) for c in cells]
            ax.plot(
                range(len(cells)),
                [v if v is not None else float("nan") for v in values],
                style,
                color=color,
                label=label,
            )
        ax.axhline(0.5, color="black", lw=0.8, alpha=0.6)
        ax.set_xticks(range(len(cells)), cells)
        ax.set(title=f"branch {branch}", xlabel="cell (model_data)", ylim=(0.3, 1.02))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("AUROC, nested CV (0.5 = chance)")
    axes[0, -1].legend(frameon=False, fontsize=8)
    fig.suptitle(title or "probe AUROC per iteration")
    return _save(fig, out, dpi)


def probe_importance(
    table, correlations: dict, out: str | Path, title: str = "", size=(15, 4.2), dpi: int = 110
) -> Path:
    """|standardised difference| against cosine to base, firing rate and encoder norm, and how the
    correlation with the cosine moves with the activity threshold (connected scatter)."""
    plt = _pyplot()
    live = table[~table["dead"]]
    importance = live["smd"].abs()
    panels = [
        (c, n)
        for c, n in (
            ("cos_to_base", "decoder cosine to the base SAE"),
            ("freq", "firing rate"),
            ("enc_norm", "encoder norm"),
        )
        if c in live.columns
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=size)
    keys = {"cos_to_base": "cos_to_base", "freq": "firing_rate", "enc_norm": "encoder_norm"}
    for ax, (column, name) in zip(axes, panels):
        significant = live["q"] < 0.05
        ax.scatter(
            live.loc[~significant, column], importance[~significant], s=4, alpha=0.3, color="tab:gray", label="q ≥ 0.05"
        )
        ax.scatter(
            live.loc[significant, column], importance[significant], s=10, alpha=0.8, color="tab:red", label="q < 0.05"
        )
        if column == "freq":
            ax.set_xscale("log")
        rho = correlations.get(keys[column], {})
        note = (
            f"Spearman {rho['rho']:+.2f} [{rho['ci_low']:+.2f}, {rho['ci_high']:+.2f}]"
            if rho.get("rho") is not None
            else ""
        )
        ax.set(xlabel=name, ylabel="importance |Cohen's d|", title=note)
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize=8)
    ax = axes[-1]
    steps = [s for s in correlations.get("by_activity", []) if s.get("rho") is not None]
    if steps:
        xs = [s["min_freq"] for s in steps]
        ys = [s["rho"] for s in steps]
        ax.plot(xs, ys, "-o", color="tab:blue")
        ax.fill_between(xs, [s["ci_low"] for s in steps], [s["ci_high"] for s in steps], alpha=0.2, color="tab:blue")
        for s in steps:
            ax.annotate(f"n={s['n']}", (s["min_freq"], s["rho"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("symlog", linthresh=1e-3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(
        xlabel="minimum firing rate of the features kept",
        ylabel="Spearman(importance, cos to base)",
        title="by activity threshold",
    )
    ax.grid(alpha=0.3)
    fig.suptitle(title or "feature importance against weight and firing statistics")
    return _save(fig, out, dpi)


def probe_overlap(
    rows: list[dict],
    cells: list[str],
    out: str | Path,
    title: str = "",
    cmap: str = "viridis",
    size=(6.5, 5.5),
    dpi: int = 110,
) -> Path:
    """Jaccard of the top-k feature sets between cells (through the diffs' matching; blank: no diff)."""
    import numpy as np

    plt = _pyplot()
    matrix = np.full((len(cells), len(cells)), np.nan)
    np.fill_diagonal(matrix, 1.0)
    for r in rows:
        if r.get("jaccard_top") is None:
            continue
        i, j = cells.index(r["a"]), cells.index(r["b"])
        matrix[i, j] = matrix[j, i] = r["jaccard_top"]
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(matrix, cmap=cmap, vmin=0, vmax=1)
    for i in range(len(cells)):
        for j in range(len(cells)):
            if np.isfinite(matrix[i, j]):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if matrix[i, j] < 0.5 else "black",
                )
    ax.set_xticks(range(len(cells)), cells, rotation=45, ha="right")
    ax.set_yticks(range(len(cells)), cells)
    fig.colorbar(image, ax=ax, label="Jaccard of top-k features")
    ax.set_title(title or "overlap of important features")
    return _save(fig, out, dpi)


# --------------------------------------------------------------------------- interventions


# the causal tests' comparison methods (experiments.DIRECTION_COMPARISONS) as the figures name them
COMPARISON_LABELS = {
    "diffmean": "difference in means",
    "adl": "lens direction",
    "crosscoder": "crosscoder Mi-only",
    "diff_sae": "diff-SAE latents of the metric",
}


def dose_response(block: dict, out: str | Path, title: str = "", size=(13, 4.6), dpi: int = 110) -> Path:
    """An intervention's effect on its metric and on coherence.

    The curves and bars show every condition on the select half (the only half where all of them
    generate: it picks what is reported); the reported condition's value on the report half is
    drawn over them as a star (and its matched random control's as a cross), and the title gives
    its paired effect. Swept experiments (steering, clamping): the metric against the signed
    strength alpha (sign-flipped steering at -alpha), with the no-op's mean and CI as a band and
    the picked alpha marked. Ablation: one bar per condition.
    """
    plt = _pyplot()
    metric = block["metric"]
    rows = [r for r in block["conditions"] if r["half"] == "select"]
    reported_rows = [r for r in block["conditions"] if r["half"] == "report"]
    noop = next(r for r in rows if r["condition"] == "noop")
    fig, axes = plt.subplots(1, 3, figsize=size, gridspec_kw={"width_ratios": [1.6, 1, 1]})
    report = block.get("report") or {}
    styles = {
        "features": ("tab:red", "o", 2.2),
        "flipped": ("tab:purple", "v", 1.6),
        "random": ("tab:gray", "s", 1.6),
        "diffmean": ("tab:green", "D", 1.6),
        "adl": ("tab:olive", "^", 1.6),
        "crosscoder": ("tab:cyan", "P", 1.6),
        "diff_sae": ("tab:brown", "X", 1.6),
    }
    swept = block.get("alphas") is not None
    if swept:

        def line(name, sign=1.0):
            chosen = sorted((r for r in rows if r["condition"] == name), key=lambda r: r["alpha"])
            xs = [sign * r["alpha"] for r in chosen]
            return chosen, xs

        names = ["features", "random"] + (["flipped"] if any(r["condition"] == "flipped" for r in rows) else [])
        names += [m for m in DIRECTION_COMPARISONS if any(r["condition"] == m for r in rows)]
        names += sorted({r["condition"] for r in rows if r["role"] == "single"})
        for name in names:
            chosen, xs = line(name, -1.0 if name == "flipped" else 1.0)
            color, marker, width = styles.get(name, (None, ".", 1.0))
            label = {
                "features": f"top features {block['features']}",
                "random": "matched random features",
                "flipped": "top features, sign flipped",
                **{m: f"{COMPARISON_LABELS[m]}, same |dx|" for m in DIRECTION_COMPARISONS},
            }.get(name, name.replace("_", " "))
            if name == report.get("condition"):
                label += " (reported)"
            stats = [r["metrics"][metric] for r in chosen]
            ok = [s["mean"] is not None for s in stats]
            axes[0].errorbar(
                [x for x, k in zip(xs, ok) if k],
                [s["mean"] for s, k in zip(stats, ok) if k],
                yerr=[
                    [s["mean"] - s["ci_low"] for s, k in zip(stats, ok) if k],
                    [s["ci_high"] - s["mean"] for s, k in zip(stats, ok) if k],
                ],
                color=color,
                marker=marker,
                lw=width,
                capsize=3,
                label=label,
                alpha=1.0 if name in styles else 0.6,
            )
            for x, s_, r in zip(xs, stats, chosen):  # a mean over few texts (metric undefined elsewhere)
                if s_["mean"] is not None and s_["n"] < r["n"] / 2:
                    axes[0].annotate(
                        f"n={s_['n']}",
                        (x, s_["mean"]),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=color,
                    )
            axes[1].plot(
                xs,
                [_ratio(r) for r in chosen],
                color=color,
                marker=marker,
                lw=width,
                alpha=1.0 if name in styles else 0.6,
            )
            axes[2].plot(
                xs,
                [r["repetition"] for r in chosen],
                color=color,
                marker=marker,
                lw=width,
                alpha=1.0 if name in styles else 0.6,
            )
        for ax in axes:
            ax.set_xlabel("strength α (× typical activation; < 0: sign flipped)")
            if report.get("alpha") is not None:
                ax.axvline(report["alpha"], color="tab:red", ls=":", lw=1)
        base = noop["metrics"][metric]
        if base["mean"] is not None:
            axes[0].axhspan(base["ci_low"], base["ci_high"], color="tab:blue", alpha=0.12)
            axes[0].axhline(base["mean"], color="tab:blue", lw=1.2, label="no-op splice (95% CI)")
    else:
        # each single feature next to its own matched random control
        singles = sorted({r["condition"] for r in rows if r["role"] == "single"})
        order, colors = ["noop", "features", "random"], ["tab:blue", "tab:red", "tab:gray"]
        for name in singles:
            control = "random_" + name.split("_", 1)[1]
            order += [name] + ([control] if any(r["condition"] == control for r in rows) else [])
            colors += ["tab:orange"] + (["silver"] if order[-1] == control else [])
        # and the comparison methods, mean-ablated the same way
        compared = [m for m in DIRECTION_COMPARISONS if any(r["condition"] == m for r in rows)]
        order += compared
        colors += [styles[m][0] if m in styles else "0.5" for m in compared]
        chosen = [next(r for r in rows if r["condition"] == name) for name in order]
        stats = [r["metrics"][metric] for r in chosen]
        means = [s["mean"] if s["mean"] is not None else float("nan") for s in stats]
        errs = [
            [(s["mean"] - s["ci_low"]) if s["mean"] is not None else 0 for s in stats],
            [(s["ci_high"] - s["mean"]) if s["mean"] is not None else 0 for s in stats],
        ]
        labels = ["no-op", "top features", "matched random"] + [
            COMPARISON_LABELS.get(n, n.replace("random_", "random for ").replace("_", " ")) for n in order[3:]
        ]
        labels = [
            label + (" (reported)" if name == report.get("condition") else "") for name, label in zip(order, labels)
        ]
        axes[0].bar(range(len(order)), means, yerr=errs, color=colors, capsize=4)
        axes[0].set_xticks(range(len(order)), labels, rotation=20, ha="right")
        axes[1].bar(range(len(order)), [_ratio(r) for r in chosen], color=colors)
        axes[1].set_xticks(range(len(order)), labels, rotation=20, ha="right")
        axes[2].bar(range(len(order)), [r["repetition"] for r in chosen], color=colors)
        axes[2].set_xticks(range(len(order)), labels, rotation=20, ha="right")
    _mark_report_half(axes[0], block, reported_rows, metric, swept, order if not swept else None)
    axes[0].set_ylabel(f"mean {metric} (95% bootstrap CI), select half")
    axes[1].set_ylabel("perplexity under M0 / no-op's")
    axes[1].set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axes[1].yaxis.set_major_formatter(plain)
    axes[1].yaxis.set_minor_formatter(plain)
    axes[1].axhline(1.0, color="tab:blue", lw=1)
    if block.get("max_perplexity_ratio"):
        axes[1].axhline(block["max_perplexity_ratio"], color="black", ls="--", lw=0.8, label="coherence limit")
        axes[1].legend(frameon=False, fontsize=8)
    axes[2].set_ylabel("repeated word 3-grams (share)")
    top = max([r["repetition"] for r in rows] + [0.0])
    axes[2].set_ylim(0, max(0.05, 1.1 * top))
    axes[0].set_title(metric)
    axes[1].set_title("coherence: perplexity")
    axes[2].set_title("coherence: repetition")
    axes[0].legend(frameon=False, fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    if report and report.get("effect") is not None:
        p_control = (report.get("vs_control") or {}).get("p")
        title += (
            f"\neffect vs no-op {report['effect']:+.3f} [{report['ci_low']:+.3f}, {report['ci_high']:+.3f}], "
            f"p = {report['p']:.3g}; random control {report['control_effect']:+.3f}"
            + (f" (top vs random p = {p_control:.3g})" if p_control is not None else "")
            + f"; n = {report['n']} report prompts"
        )
    fig.suptitle(title, fontsize=10)
    return _save(fig, out, dpi)


def _mark_report_half(ax, block: dict, rows: list[dict], metric: str, swept: bool, order: list[str] | None) -> None:
    """The reported condition and its control on the report half, over the select-half curves,
    with the random null beside it: the report-half no-op's mean plus each null edit's paired
    effect (edits of the same size with other features or random directions)."""
    import numpy as np

    report = block.get("report") or {}
    control = (block.get("chosen") or {}).get("control")
    null = report.get("null") or {}
    noop = next((r for r in rows if r["condition"] == "noop"), None)
    level = noop["metrics"][metric]["mean"] if noop else None
    if swept:
        x_report = report.get("alpha")
    else:
        x_report = order.index(report["condition"]) if order and report.get("condition") in order else None
    if level is not None and x_report is not None:
        spread = 0.08 * max(abs(x_report), 1.0) if swept else 0.15
        rng = np.random.default_rng(0)
        for kind, color in (("features", "tab:olive"), ("directions", "tab:cyan")):
            values = (null.get(kind) or {}).get("effects") or []
            if not values:
                continue
            xs = x_report + rng.uniform(-spread, spread, len(values))
            label = f"random null: {kind}, same |dx| (report half, n={len(values)}"
            label += f"; pooled rank p={null['p']:.3g})" if null.get("p") is not None else ")"
            ax.scatter(xs, level + np.asarray(values), s=9, color=color, alpha=0.55, zorder=4, label=label)
    for name, marker, color, label in (
        (report.get("condition"), "*", "black", "reported, report half"),
        (control, "x", "dimgray", "its random control, report half"),
    ):
        row = next((r for r in rows if r["condition"] == name), None)
        stats = row["metrics"][metric] if row else None
        if not stats or stats["mean"] is None:
            continue
        if swept:
            x = row["alpha"]
        elif order and name in order:
            x = order.index(name)
        else:
            continue
        ax.plot([x], [stats["mean"]], marker=marker, color=color, ms=13, ls="none", label=label, zorder=5)


def _ratio(row: dict) -> float:
    """Perplexity relative to the no-op's (1 = unchanged)."""
    return 1.0 + (row["perplexity_change"] or 0.0)


def metric_latents_panel(ax, metric: str, block: dict) -> None:
    """The diff-SAE latents chosen for ``metric`` on train: their eval |ρ| (called ones red, the
    others gray, with q), and the median eval |ρ| over the null's draws of the random direction
    chosen at the same rank (black tick): selection alone. The title holds the count called against
    the draws' counts (rank p)."""
    chosen = block["chosen"]
    if not chosen:
        ax.text(0.5, 0.5, f"{metric}: {block.get('skipped', 'nothing chosen')}", ha="center", va="center", color="0.4")
        ax.set_axis_off()
        return
    n = len(chosen)
    colors = ["tab:red" if j in block["called"] else "0.55" for j in chosen]
    ax.barh(range(n)[::-1], [abs(r) for r in block["rho_eval"]], color=colors, height=0.6)
    randoms = block.get("random_directions_abs_rho_eval", [])
    ax.scatter(randoms, list(range(len(randoms)))[::-1], marker="|", s=300, color="k")
    labels = [f"{j} (ρ train {r:+.2f})" for j, r in zip(chosen, block.get("rho_train", [0.0] * n))]
    ax.set_yticks(range(n)[::-1], labels, fontsize=8)
    for i, q in enumerate(block["q"]):
        ax.annotate(f"q={q:.2g}", (abs(block["rho_eval"][i]), n - 1 - i), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=7)  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set(xlabel=f"|Spearman ρ| with {metric}, eval (n={block['n_eval']})")
    null = block["random_directions_called"]
    ax.set_title(
        f"diff-SAE latents behind {metric}: {len(block['called'])} called (red)\n"
        f"{len(null)} draws of random directions: {sum(null) / max(len(null), 1):.2g} called\n"
        f"per draw (max {max(null, default=0)}), p = {block['random_directions_p']:.2g}; black: same rank (median)",
        fontsize=9,
    )


def examples_panel(ax, metric: str, block: dict, examples: dict, per_latent: int = 3) -> None:
    """The top-activating contexts of the latents called for ``metric`` (chosen ones when none was):
    over every eval token, not only the tokens the association pooled."""
    shown = block["called"] or block["chosen"]
    ax.set_axis_off()
    if not shown:
        ax.text(0.5, 0.5, f"{metric}: no latent chosen", ha="center", va="center", color="0.4")
        return
    lines = []
    for j in shown[:4]:
        lines.append(f"latent {j}")
        for row in examples.get(str(j), [])[:per_latent]:
            context = " ".join(row["context"].split())  # one line: newlines and runs of spaces folded
            at = max(context.find("⟦"), 0)  # the firing token, with what comes before and after it
            lines.append(f"  {row['activation']:.2f} {context[max(at - 14, 0) : at + 22]}")
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=7.5, family="monospace", transform=ax.transAxes)
    what = "called" if block["called"] else "chosen (none called)"
    ax.set_title(f"where the {what} latents fire most (⟦token⟧; eval)", fontsize=10)


def same_token_diffing(
    record: dict,
    crosscoder_table,
    diff_sae_table,
    kl_table,
    out: str | Path,
    title: str = "",
    size=(21, 9.5),
    diff_sae_examples: dict | None = None,
    dpi: int = 110,
) -> Path:
    """One same-token pair at one layer, every method on one page (a table is None when its method
    did not run): the crosscoder's Δnorm histogram with its class bands, Latent Scaling ratios of its
    Mi-only latents, the diff-SAE's top latents, the lens's promoted tokens, per-token KL and KL
    recovery beside random latents, and the diff-SAE latents behind the first probed metric beside
    as many random directions chosen the same way, with where they fire (``diff_sae_examples``: the
    diff-SAE's features/examples.json)."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=size, gridspec_kw={"width_ratios": [1, 1, 1, 0.9]})
    methods = record["methods"]

    def absent(ax, what):
        ax.text(0.5, 0.5, f"{what}: not run", ha="center", va="center", color="0.4")
        ax.set_axis_off()

    # (a) crosscoder: Δnorm histogram, the class bands shaded
    ax = axes[0, 0]
    if crosscoder_table is not None:
        block = methods["crosscoder"]
        values = crosscoder_table["delta_norm"].dropna().to_numpy()
        for (lo, hi), color in (((0.0, 0.1), "tab:blue"), ((0.4, 0.6), "0.85"), ((0.9, 1.0), "tab:red")):
            ax.axvspan(lo, hi, color=color, alpha=0.15, lw=0)
        ax.hist(values, bins=np.linspace(0, 1, 51), color="0.3")
        ax.set_yscale("log")
        ax.set(xlabel="Δnorm  (0: M0 only · 0.5: shared · 1: Mi only)", ylabel="latents")
        ax.set_title(
            f"crosscoder decoder norms: {block['n_mi_only']} Mi-only, {block['n_shared']} shared, "
            f"{block['n_m0_only']} M0-only",
            fontsize=10,
        )
    else:
        absent(ax, "crosscoder")

    # (b) Latent Scaling of the Mi-only latents
    ax = axes[0, 1]
    if crosscoder_table is not None and "nu_error" in crosscoder_table:
        mi = crosscoder_table[crosscoder_table["class"] == "mi_only"]
        colors = {"genuine": "tab:green", "complete_shrinkage": "tab:orange", "latent_decoupling": "tab:purple"}
        for label, part in mi.groupby("scaling_label"):
            ax.scatter(part["nu_error"], part["nu_reconstruction"], s=14, color=colors.get(label, "0.5"), label=label)
        thresholds = record.get("thresholds") or {}
        ax.axvline(thresholds.get("nu_error_max", 0.2), color="0.5", ls="--", lw=0.8)
        ax.axhline(thresholds.get("nu_reconstruction_max", 0.5), color="0.5", ls="--", lw=0.8)
        ax.set(xlabel="ν^ε = β^ε(M0) / β^ε(Mi)", ylabel="ν^r = β^r(M0) / β^r(Mi)")
        ax.set_title("Latent Scaling of Mi-only latents (low-low: genuinely Mi-only)", fontsize=10)
        ax.legend(frameon=False, fontsize=8)
    elif (
        crosscoder_table is not None
        and "moved_rank" in crosscoder_table
        and crosscoder_table["moved_rank"].notna().any()
    ):
        # no Mi-only latent: where the change rides on shared latents instead (crosscoder.moved_vectors)
        from .crosscoder import ranked_moved

        top = ranked_moved(crosscoder_table, 10)
        lens = sorted(c for c in top.columns if c.startswith("promoted_m"))
        labels = [
            f"{int(row['latent'])}  " + " ".join(repr(t)[1:-1] for t in list(row[lens[-1]])[:3]) if lens
            else str(int(row["latent"]))
            for _, row in top.iterrows()
        ]  # fmt: skip
        ax.barh(range(len(top))[::-1], top["moved_norm"], color="tab:red", alpha=0.7)
        ax.set_yticks(range(len(top))[::-1], labels, fontsize=8)
        ax.set(xlabel="‖mean activation · (Mi decoder − M0 decoder)‖  (raw activation units)")
        ax.set_title(
            f"no Mi-only latent: the latents whose decoders moved most "
            f"({len(top)} of {int(crosscoder_table['moved_rank'].notna().sum())} moved)",
            fontsize=10,
        )
    elif crosscoder_table is not None:
        ax.text(0.5, 0.5, "no Mi-only latent to scale, no decoder moved", ha="center", va="center", color="0.4")
        ax.set_axis_off()
    else:
        absent(ax, "crosscoder")

    # (c) diff-SAE: the top latents' share of Mi − M0
    ax = axes[0, 2]
    if diff_sae_table is not None and len(diff_sae_table):
        top = diff_sae_table.head(10)
        labels = [
            f"{int(row.latent)}  " + " ".join(repr(t)[1:-1] for t in list(row.promoted)[:3])
            if "promoted" in top
            else str(int(row.latent))
            for row in top.itertuples()
        ]
        ax.barh(range(len(top))[::-1], top["share"], color="tab:cyan")
        ax.set_yticks(range(len(top))[::-1], labels, fontsize=8)
        ax.set(xlabel="share of ‖Mi − M0‖² carried (train split)")
        ax.set_title(
            f"diff-SAE top latents (b_dec carries {methods['diff_sae'].get('b_dec_share', 0):.2f})", fontsize=10
        )
    elif diff_sae_table is not None:
        ax.text(0.5, 0.5, "identical activations: nothing to diff", ha="center", va="center", color="0.4")
        ax.set_axis_off()
    else:
        absent(ax, "diff-SAE")

    # (d) activation-difference lens: promoted tokens, unrelated text and the iteration's data
    ax = axes[1, 0]
    if "adl" in methods:
        block = methods["adl"]
        ax.set_axis_off()
        rows = [
            ["unrelated text", ", ".join(repr(t)[1:-1] for t in block["top"][:8])],
            ["suppressed", ", ".join(repr(t)[1:-1] for t in block["suppressed"][:8])],
            ["the data", ", ".join(repr(t)[1:-1] for t in block["data_top"][:8])],
        ]
        table = ax.table(cellText=rows, colWidths=[0.27, 0.73], loc="center", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 2.2)
        lo, hi = block["positions"]
        ax.set_title(f"activation-difference lens: tokens Mi − M0 promotes (positions {lo}..{hi - 1})", fontsize=10)
    else:
        absent(ax, "activation-difference lens")

    # (e) per-token KL in the prompt and in the completion
    ax = axes[1, 1]
    if kl_table is not None and len(kl_table):
        values = kl_table["kl_tuned_base"].clip(lower=1e-9)
        bins = np.logspace(np.log10(values.min()), np.log10(values.max() + 1e-12), 40)
        for part, color, name in (
            (kl_table["in_prompt"], "tab:gray", "prompt"),
            (~kl_table["in_prompt"], "tab:red", "completion"),
        ):
            ax.hist(values[part], bins=bins, alpha=0.6, color=color, label=f"{name} (mean {values[part].mean():.3g})")
        ax.set_xscale("log")
        ax.set(xlabel="KL(Mi ‖ M0) per token (nats)", ylabel="tokens")
        top_tokens = ", ".join(repr(t)[1:-1] for t in methods.get("kl", {}).get("top", [])[:6])
        ax.set_title(f"per-token KL on eval samples; largest at: {top_tokens}", fontsize=10)
        ax.legend(frameon=False, fontsize=8)
    else:
        absent(ax, "per-token KL")

    # (f) KL recovery beside random latents
    ax = axes[1, 2]
    recovery = methods.get("kl", {}).get("recovery", {})
    if recovery:
        names = list(recovery)
        values = [recovery[n]["recovery"] for n in names]
        ax.bar(range(len(names)), values, color="tab:green")
        for i, name in enumerate(names):
            block = recovery[name]
            if "null_range" in block:
                lo, hi = block["null_range"]
                ax.plot([i, i], [lo, hi], color="k", lw=3, alpha=0.5)
                ax.plot(i, block["null_median"], "k_", ms=18)
                ax.annotate(f"p={block['null_p']:.2g}", (i, max(values[i], hi)), ha="center", va="bottom", fontsize=8)
        readable = {
            "crosscoder_mi_only": "crosscoder\nMi-only latents",
            "diff_sae_top": "diff-SAE\ntop latents",
            "diff_sae_all": "diff-SAE\nwhole reconstruction",
            "adl_data": "lens direction\n(the data)",
        }
        ax.set_xticks(range(len(names)), [readable.get(n, n) for n in names], fontsize=8)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set(ylabel="share of KL(Mi ‖ M0) closed")
        ax.set_title("KL closed at this layer (black: as many random latents)", fontsize=10)
    else:
        absent(ax, "KL recovery")

    # (g) the diff-SAE latents behind the first probed metric: held-out rho beside random directions;
    # (h) where they fire
    behind = methods.get("diff_sae", {}).get("metric", {})
    if behind:
        metric = next(iter(behind))
        metric_latents_panel(axes[0, 3], metric, behind[metric])
        examples_panel(axes[1, 3], metric, behind[metric], diff_sae_examples or {})
    else:
        absent(axes[0, 3], "diff-SAE latents behind a metric")
        absent(axes[1, 3], "diff-SAE latents behind a metric")
    fig.suptitle(title or f"{record['pair']}, layer {record['layer']}: same-token diffing")
    return _save(fig, out, dpi)
