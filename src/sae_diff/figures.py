"""Figure jobs: read a stage's tables, draw with ``sae_diff.plots``. One function per figure
kind, each with its own block under ``figures`` in the config, so that a style change
reruns that figure's jobs and nothing upstream.

Kept free of torch: pooled activations are read with safetensors' numpy API. Light to import
(numpy and pandas load inside the functions, matplotlib inside ``plots``), so the CLI's parser
reads the kind names from ``KINDS``; ``draw`` runs one kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import plots

if TYPE_CHECKING:
    import pandas as pd


def _pooled(feature_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(Path(feature_dir) / "pooled.safetensors"))


def statistics(feature_dir: Path, out: Path, block: dict, title: str) -> Path:
    import pandas as pd

    stats = pd.read_parquet(Path(feature_dir) / "stats.parquet")
    pooled = _pooled(feature_dir)
    has_tokens = pooled["n_tokens"] > 0
    sample_l0 = pooled["l0_sum"][has_tokens] / pooled["n_tokens"][has_tokens]
    groups_block = json.loads((Path(feature_dir) / "groups.json").read_text())
    return plots.feature_statistics(stats, sample_l0, groups_block, out, title, size=block["size"], dpi=block["dpi"])


def bias(feature_dir: Path, samples: pd.DataFrame, features_cfg: dict, out: Path, block: dict, title: str) -> Path:
    """All samples, then each value of the first group column (e.g. each language)."""
    import numpy as np
    import pandas as pd

    from . import groups

    spec = features_cfg.get("bias")
    if not spec:
        raise ValueError("figures.bias needs features.bias ({column, a, b}) in the config")
    pooled = _pooled(feature_dir)
    x = pooled[features_cfg["pooling"]].astype(np.float64)
    samples = _aligned(samples, pooled["sample_id"])
    panels = [("all samples", groups.group_bias(x, samples, spec["column"], spec["a"], spec["b"], block["top"]))]
    for column in features_cfg["group_columns"][:1]:
        if column == spec["column"]:
            continue
        for value in pd.unique(samples[column].dropna()):
            rows = samples[column].to_numpy() == value
            panels.append(
                (
                    f"{column} = {value}",
                    groups.group_bias(x[rows], samples[rows], spec["column"], spec["a"], spec["b"], block["top"]),
                )
            )
    return plots.group_bias(panels, out, title, top=block["top"], size=block["size"], dpi=block["dpi"])


def _aligned(samples: pd.DataFrame, sample_ids) -> pd.DataFrame:
    """The sample table in the pooled matrix's row order."""
    import numpy as np

    return samples.set_index("sample_id").loc[np.asarray(sample_ids)].reset_index()


def embeddings(
    feature_dir: Path, samples: pd.DataFrame, features_cfg: dict, out: Path, block: dict, title: str
) -> Path:
    import pandas as pd

    pooled = _pooled(feature_dir)
    samples = _aligned(samples, pooled["sample_id"])
    columns = features_cfg["group_columns"]
    colour = samples[columns[0]] if columns else pd.Series(["all"] * len(samples))
    markers = samples[columns[1]] if len(columns) > 1 else None
    return plots.embeddings(
        pooled[features_cfg["pooling"]],
        colour,
        out,
        title,
        markers=markers,
        perplexity=block["perplexity"],
        size=block["size"],
        dpi=block["dpi"],
    )


def coactivation(feature_dir: Path, column: str, out: Path, block: dict, title: str, top: bool) -> Path:
    import numpy as np

    matrix = np.load(Path(feature_dir) / f"coactivation_{column}.npy")
    classes = json.loads((Path(feature_dir) / f"coactivation_{column}.json").read_text())["classes"]
    return plots.coactivation_heatmap(
        matrix,
        classes,
        out,
        title,
        top=block["top"] if top else None,
        cmap=block["cmap"],
        size=block["size"],
        dpi=block["dpi"],
    )


def coactivation_layers(feature_dirs: dict[str, Path], column: str, out: Path, block: dict, title: str) -> Path:
    import numpy as np

    panels = []
    for name, folder in feature_dirs.items():
        classes = json.loads((Path(folder) / f"coactivation_{column}.json").read_text())["classes"]
        panels.append((name, np.load(Path(folder) / f"coactivation_{column}.npy"), classes))
    return plots.coactivation_layers(
        panels, out, title, top=block["top"], cmap=block["cmap"], size=block["size"], dpi=block["dpi"]
    )


def evolution(evolution_json: Path, out: Path, block: dict, title: str) -> Path:
    return plots.evolution_counts(
        json.loads(Path(evolution_json).read_text()), out, title, size=block["size"], dpi=block["dpi"]
    )


def similarity(
    diff_tables: dict[str, Path], null_table: Path, thresholds_json: Path, out: Path, block: dict, title: str
) -> Path:
    import pandas as pd

    steps = [
        (name, pd.read_parquet(path, columns=["dec_cos_match"])["dec_cos_match"].dropna())
        for name, path in diff_tables.items()
    ]
    null = pd.read_parquet(null_table, columns=["dec_cos_match"])["dec_cos_match"].dropna()
    record = json.loads(Path(thresholds_json).read_text())
    null_label = {
        "resampling": "resampling null (same model, disjoint prompt halves)",
        "seed_pair": "seed pair (null: only the seed differs)",
    }[record.get("thresholds_from", "seed_pair")]
    return plots.similarity_histograms(
        steps, null, record["thresholds"], out, title, size=block["size"], dpi=block["dpi"], null_label=null_label
    )


def iterations(iterations_json: Path, out: Path, block: dict) -> Path:
    """The target metric over its population (or the first metric when there is no target)."""
    summary = json.loads(Path(iterations_json).read_text())
    target = summary.get("target_metric")
    if target:
        where = ", ".join(f"{k} in {v}" for k, v in (target.get("where") or {}).items())
        subtitle = f"DPO target, {summary['target'].get('direction', 'up')}" + (f"; {where}" if where else "")
        return plots.metric_per_iteration(target, target["metric"], out, subtitle, size=block["size"], dpi=block["dpi"])
    metrics = list(summary["metrics"])
    if not metrics:
        raise ValueError(f"{iterations_json}: no metric to plot (no scorers configured)")
    return plots.metric_per_iteration(
        summary["metrics"][metrics[0]], metrics[0], out, size=block["size"], dpi=block["dpi"]
    )


def probe_auroc(
    comparison_json: Path, branches: dict[str, list[str]], sae: str, metric: str, out: Path, block: dict, title: str
) -> Path:
    rows = [
        r for r in json.loads(Path(comparison_json).read_text())["auroc"] if r["sae"] == sae and r["metric"] == metric
    ]
    return plots.probe_auroc(rows, branches, out, title, size=block["size"], dpi=block["dpi"])


def probe_importance(probe_json: Path, out: Path, block: dict, title: str) -> Path:
    import pandas as pd

    summary = json.loads(Path(probe_json).read_text())
    table_path = Path(probe_json).with_suffix(".parquet")
    if not table_path.exists():  # the probe was skipped: say why instead of drawing nothing
        return plots.message(
            f"{title}\n\nno probe: {summary.get('skipped')}", out, size=block["size"], dpi=block["dpi"]
        )
    return plots.probe_importance(
        pd.read_parquet(table_path), summary["correlations"], out, title, size=block["size"], dpi=block["dpi"]
    )


def probe_overlap(
    comparison_json: Path, cells: list[str], sae: str, metric: str, out: Path, block: dict, title: str
) -> Path:
    rows = [
        r for r in json.loads(Path(comparison_json).read_text())["cells"] if r["sae"] == sae and r["metric"] == metric
    ]
    return plots.probe_overlap(rows, cells, out, title, cmap=block["cmap"], size=block["size"], dpi=block["dpi"])


def dose_response(effects_json: Path, out: Path, block: dict, title: str) -> Path:
    effects = json.loads(Path(effects_json).read_text())
    if "skipped" in effects:
        return plots.message(f"{title}\nnot run: {effects['skipped']}", out, size=block["size"], dpi=block["dpi"])
    return plots.dose_response(effects, out, title, size=block["size"], dpi=block["dpi"])


def training(train_log: Path, out: Path, block: dict, title: str) -> Path:
    rows = [json.loads(line) for line in Path(train_log).read_text().splitlines() if line.strip()]
    return plots.training_curves(rows, out, title, size=block["size"], dpi=block["dpi"])


def density(eval_json: Path, out: Path, block: dict, title: str) -> Path:
    result = json.loads(Path(eval_json).read_text())
    return plots.density_histogram(result["log_density_histogram"], out, title, size=block["size"], dpi=block["dpi"])


def loss_by_position(table_path: Path, eval_json: Path, out: Path, block: dict, title: str) -> Path:
    import pandas as pd

    table = pd.read_parquet(table_path)
    if table.empty:  # the spliced metrics were skipped: the figure says why
        reason = json.loads(Path(eval_json).read_text()).get("spliced_skipped", "no spliced evaluation")
        return plots.message(f"{title}\nnot measured: {reason}", out, size=block["size"], dpi=block["dpi"])
    return plots.loss_by_position(table, out, title, size=block["size"], dpi=block["dpi"])


def _samples(named: dict[str, str]):
    """The sample table a figure groups by (``samples=``), or None."""
    import pandas as pd

    return pd.read_parquet(named["samples"]) if "samples" in named else None


def _paths(named: dict[str, str], leave_out: tuple[str, ...] = ()) -> dict[str, Path]:
    """One panel per NAME=PATH, in the order given."""
    return {name: Path(path) for name, path in named.items() if name not in leave_out}


def diffing(named: dict, out: Path, block: dict, title: str) -> Path:
    """One same-token pair and layer: the record plus the tables of the methods that ran."""
    import pandas as pd

    def table(key):
        return pd.read_parquet(named[key]) if key in named else None

    record = json.loads(Path(named["record"]).read_text())
    if "crosscoder" in named:
        metrics = json.loads((Path(named["crosscoder"]).parent / "metrics.json").read_text())
        record["thresholds"] = metrics.get("thresholds")
    examples = None
    if "diff_sae" in named:  # written with latents.parquet by the diff_sae rule
        path = Path(named["diff_sae"]).parent / "features" / "examples.json"
        examples = json.loads(path.read_text()) if path.exists() else None
    return plots.same_token_diffing(
        record, table("crosscoder"), table("diff_sae"), table("kl"), out, title, size=block["size"], dpi=block["dpi"],
        diff_sae_examples=examples,
    )  # fmt: skip


# kind -> draw(named inputs {NAME: PATH}, spec, out, title); spec["figure"] is the kind's own config block
KINDS: dict[str, Callable[[dict[str, str], dict, Path, str], Path]] = {
    "statistics": lambda named, spec, out, title: statistics(Path(named["features"]), out, spec["figure"], title),
    "bias": lambda named, spec, out, title: bias(
        Path(named["features"]), _samples(named), spec["features"], out, spec["figure"], title
    ),
    "embeddings": lambda named, spec, out, title: embeddings(
        Path(named["features"]), _samples(named), spec["features"], out, spec["figure"], title
    ),
    "coactivation": lambda named, spec, out, title: coactivation(
        Path(named["features"]), spec["column"], out, spec["figure"], title, top=False
    ),
    "coactivation_top": lambda named, spec, out, title: coactivation(
        Path(named["features"]), spec["column"], out, spec["figure"], title, top=True
    ),
    "coactivation_layers": lambda named, spec, out, title: coactivation_layers(
        _paths(named), spec["column"], out, spec["figure"], title
    ),
    "evolution": lambda named, spec, out, title: evolution(Path(named["evolution"]), out, spec["figure"], title),
    "similarity": lambda named, spec, out, title: similarity(
        _paths(named, leave_out=("null", "thresholds")),
        Path(named["null"]),
        Path(named["thresholds"]),
        out,
        spec["figure"],
        title,
    ),
    "iterations": lambda named, spec, out, title: iterations(Path(named["iterations"]), out, spec["figure"]),
    "probe_auroc": lambda named, spec, out, title: probe_auroc(
        Path(named["comparison"]), spec["branches"], spec["sae"], spec["metric"], out, spec["figure"], title
    ),
    "probe_importance": lambda named, spec, out, title: probe_importance(
        Path(named["probe"]), out, spec["figure"], title
    ),
    "probe_overlap": lambda named, spec, out, title: probe_overlap(
        Path(named["comparison"]), spec["cells"], spec["sae"], spec["metric"], out, spec["figure"], title
    ),
    "dose_response": lambda named, spec, out, title: dose_response(Path(named["effects"]), out, spec["figure"], title),
    "training": lambda named, spec, out, title: training(Path(named["log"]), out, spec["figure"], title),
    "diffing": lambda named, spec, out, title: diffing(named, out, spec["figure"], title),
    "density": lambda named, spec, out, title: density(Path(named["eval"]), out, spec["figure"], title),
    "loss_by_position": lambda named, spec, out, title: loss_by_position(
        Path(named["table"]), Path(named["eval"]), out, spec["figure"], title
    ),
}


def draw(kind: str, named_inputs: dict[str, str], spec: dict, out: str | Path, title: str = "") -> Path:
    """Draw one figure of ``kind`` (a key of ``KINDS``) from its named input files into ``out``.

    ``spec`` is what the figure rule passes: ``spec["figure"]`` is the kind's config block, plus what
    the kind reads (``features``, ``column``, ``branches``, ``cells``, ``sae``, ``metric``)."""
    if kind not in KINDS:
        raise ValueError(f"figure kind {kind!r}: expected one of {', '.join(sorted(KINDS))}")
    return KINDS[kind](dict(named_inputs), spec, Path(out), title or "")
