"""Feature dashboards: a static site that shows one feature whole and its life across iterations.

``results/dashboard/index.html`` opens from disk and inside the Snakemake report (no server):
one self-contained page, script and style inline, with every SAE's document inline as a
non-executing JSON ``<script>`` block (browsers refuse ``fetch`` of local files). The same
documents are ``data/<cell>__layer<L>__<sae>.json``, in the schema documented in
``docs/dashboard.md``, for other tools.

A feature is addressed by its URL fragment ``#<cell>/layer<L>/<sae>/<feature>``.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_path, read_json

SCHEMA = "sae-diff.dashboard/1"
TEMPLATE = Path(__file__).parent / "templates" / "dashboard.html"


def sae_key(cell: str, layer: int, sae: str) -> str:
    """The SAE's address in the site (and the first three parts of a feature's fragment)."""
    return f"{cell}/layer{int(layer)}/{sae}"


def slug(key: str) -> str:
    """A file name for an SAE's key."""
    return key.replace("/", "__")


def _dumps(document: dict) -> str:
    # allow_nan=False: a NaN in the data is a bug upstream, and browsers reject it in JSON
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _document_entry(document: dict, json_name: str) -> dict:
    return {
        "key": document["key"],
        "cell": document["cell"],
        "layer": document["layer"],
        "sae": document["sae"],
        "json": f"data/{Path(json_name).name}",
        "n_features": len(document["rows"]),
        "n_pages": len(document["pages"]),
    }


def write_sae(document: dict, out_json: Path) -> None:
    """One SAE's document, in the documented schema (other tools read it)."""
    with atomic_path(out_json) as tmp:
        tmp.write_text(_dumps(document), encoding="utf-8")


# where write_index puts the data into the page template
DATA_MARKER = "<!--SAE_DIFF_DATA-->"


def _data_block(element_id: str, document: dict, key: str | None = None) -> str:
    """A non-executing <script type="application/json"> holding ``document``. Every ``<`` is written
    as its JSON escape: a string holding ``</script>`` or ``<!--<script>`` would otherwise end the
    block early or make the HTML parser swallow the rest of the page (JSON.parse reads it back)."""
    text = _dumps(document).replace("<", "\\u003c")
    key_attr = f' data-key="{html.escape(key, quote=True)}"' if key is not None else ""
    return f'<script type="application/json" id="{element_id}"{key_attr}>{text}</script>'


def write_index(folder: Path, sae_jsons: list[Path], title: str = "sae-diff features") -> dict:
    """``index.html``: the page template with the index and every per-SAE document inline, so that
    it opens from disk and inside the Snakemake report without any other file. Returns the index."""
    folder = Path(folder)
    entries, blocks = [], []
    for i, path in enumerate(map(Path, sae_jsons)):
        if path.parent.resolve() != (folder / "data").resolve():
            raise ValueError(f"{path}: the per-SAE documents must lie in {folder / 'data'} (the page loads them there)")
        document = read_json(path)
        entries.append(_document_entry(document, path.name))
        blocks.append(_data_block(f"sae-diff-doc-{i}", document, key=document["key"]))
    index = {"schema": SCHEMA, "title": title, "saes": entries}
    template = TEMPLATE.read_text(encoding="utf-8")
    if DATA_MARKER not in template:
        raise ValueError(f"{TEMPLATE}: the page template lacks its data marker {DATA_MARKER}")
    page = template.replace(DATA_MARKER, "\n".join([_data_block("sae-diff-index", index), *blocks]), 1)
    with atomic_path(folder / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index


def write_site(folder: Path, documents: list[dict], title: str = "sae-diff features") -> dict:
    """Every document and the index at once (tests and small sites; the workflow writes them per job)."""
    folder = Path(folder)
    paths = []
    for document in documents:
        path = folder / "data" / f"{slug(document['key'])}.json"
        write_sae(document, path)
        paths.append(path)
    return write_index(folder, paths, title)


# ---------------------------------------------------------------------------------------------
# One SAE's document from the stage tables

# the table's columns from stats.parquet: (column, label, type)
STAT_COLUMNS = (
    ("freq", "firing rate", "float"),
    ("mean_act", "mean act.", "float"),
    ("max_act", "max act.", "float"),
    ("prompt_fires", "prompt fires", "int"),
    ("completion_fires", "completion fires", "int"),
)
# labels of an evolution step that make a feature worth a page, most telling first
TELLING_LABELS = ("born", "reverted", "changed")


def _clean(value):
    """A JSON value: numpy scalars to Python, NaN / inf to null."""
    if value is None:
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if not math.isfinite(value) else float(f"{value:.6g}")  # 6 significant digits
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in value]
    return str(value)


def _trim(example: dict, window: int) -> dict:
    """The example with ``window`` tokens either side of its token."""
    at = example["at"]
    lo, hi = max(at - window, 0), at + window + 1
    return {**example, "tokens": example["tokens"][lo:hi], "acts": example["acts"][lo:hi], "at": at - lo}


def _lens(row: pd.Series, k: int = 10) -> dict:
    out = {}
    for side in ("promoted", "suppressed"):
        tokens, logits = row.get(side), row.get(f"{side}_logit")
        if tokens is None or logits is None or (isinstance(tokens, float) and math.isnan(tokens)):
            out[side] = []
            continue
        out[side] = [[str(t), _clean(v)] for t, v in list(zip(tokens, logits))[:k]]
    return out


def _step_labels(lineages: dict[str, pd.DataFrame], cell: str) -> dict[str, pd.DataFrame]:
    """branch -> the lineage rows that hold a feature of ``cell``, indexed by that feature."""
    out = {}
    for branch, table in lineages.items():
        column = f"feature_{cell}"
        if column not in table.columns:
            continue
        rows = table[table[column] >= 0]
        out[branch] = rows.set_index(rows[column].astype(int))
    return out


def _tested(effects: list[dict], cell: str, layer: int, sae: str) -> dict[int, list[str]]:
    """feature -> the causal tests it took part in (their reported result where it was reported)."""
    out: dict[int, list[str]] = {}
    for e in effects:
        if e.get("cell") != cell or int(e.get("layer", -1)) != int(layer) or e.get("sae") != sae:
            continue
        report = e.get("report") or {}
        reported = set(report.get("features") or [])
        for j in e.get("features") or []:
            line = f"{e['experiment']} candidate for {e['metric']} (select half)"
            if j in reported and report.get("effect") is not None:
                line = (
                    f"{e['experiment']} {e['metric']}: {report['effect']:+.2f} "
                    f"[{report.get('ci_low', float('nan')):+.2f}, {report.get('ci_high', float('nan')):+.2f}], "
                    f"p {report.get('p', float('nan')):.3g} (report half, α {report.get('alpha')})"
                )
            out.setdefault(int(j), []).append(line)
    return out


def _figure_title(path: str, cell: str) -> str:
    """A figure's link text: its place under figures/ without the cell and layer the page already
    names (``interventions / steering / topk_female_ratio``)."""
    parts = list(Path(path).with_suffix("").parts)
    if "figures" in parts:
        parts = parts[parts.index("figures") + 1 :]
    return " / ".join(p for p in parts if p != cell and not re.fullmatch(r"layer\d+", p))


def same_token_columns(sae_folder: Path, model_index: int, crosscoder: Path | None, diff_sae: Path | None) -> dict:
    """For every feature of the SAE in ``sae_folder``: the same-token latent whose decoder is
    nearest (largest |cos|) — the crosscoder's (its decoder for model ``model_index``: 0 the base
    M0, 1 the tuned Mi) with its class, and the diff-SAE's with its rank by the share of Mi − M0
    it carries. ``crosscoder`` / ``diff_sae``: the methods' folders of the cell's pair and layer."""
    from .diffing import best_by_abs_cosine
    from .sae import files

    w_dec = files.load(sae_folder).W_dec.detach().double().numpy()
    out = {}
    if crosscoder is not None:
        from . import crosscoder as cc_lib

        cc = cc_lib.load(Path(crosscoder) / "crosscoder")
        latents = pd.read_parquet(Path(crosscoder) / "latents.parquet").set_index("latent")
        index, cos = best_by_abs_cosine(w_dec, cc.W_dec.detach()[:, model_index].double().numpy())
        out["crosscoder_latent"] = index
        out["crosscoder_class"] = latents["class"].reindex(index).to_numpy()
        out["crosscoder_cos"] = np.abs(cos)
    if diff_sae is not None:
        index, cos = best_by_abs_cosine(w_dec, files.load(Path(diff_sae) / "sae").W_dec.detach().double().numpy())
        rank = pd.read_parquet(Path(diff_sae) / "latents.parquet").set_index("latent")["rank"]
        out["diff_sae_latent"] = index
        out["diff_sae_rank"] = (rank.reindex(index) + 1).to_numpy()
        out["diff_sae_cos"] = np.abs(cos)
    return out


SAME_TOKEN_COLUMNS = (
    ("crosscoder_latent", "nearest crosscoder latent", "int"),
    ("crosscoder_class", "its class", "str"),
    ("crosscoder_cos", "|cos| to it", "float"),
    ("diff_sae_latent", "nearest diff-SAE latent", "int"),
    ("diff_sae_rank", "its rank (share of Mi − M0)", "int"),
    ("diff_sae_cos", "|cos| to it", "float"),
)


def sae_document(
    cell: str,
    layer: int,
    sae: str,
    features_dir: Path,
    cell_features: dict[str, Path] | None = None,
    lineages: dict[str, Path] | None = None,
    probes: dict[str, Path] | None = None,
    attribution: dict[str, Path] | None = None,
    interventions: list[Path] | None = None,
    figure_links: list[str] | None = None,
    same_token: dict | None = None,
    max_pages: int = 150,
    n_top: int = 10,
    n_lineage_examples: int = 3,
    window: int = 6,
) -> dict:
    """The dashboard's document of one SAE (schema ``SCHEMA``, documented in docs/dashboard.md).

    features_dir: this SAE's feature folder (stats.parquet and the token examples,
    ``features.read_token_examples``);
    cell_features: cell -> that cell's feature folder of the same layer and SAE, for the lineages'
    examples; lineages: branch -> the evolution's lineage table of this layer and SAE; probes /
    attribution: metric -> per-feature table; interventions: effects.json of the causal tests;
    figure_links: the figures to link, as hrefs relative to the page (links only: the document
    does not read them, so a figure's restyle does not rebuild it);
    same_token: ``same_token_columns`` of this SAE, when its cell is in a same-token pair.

    Every feature is a row; a page (histogram, shaded examples, lineage) is written for the
    features that matter, at most ``max_pages``, in this order: tested causally, top ``n_top`` of a
    probe, top ``n_top`` of the attribution, labelled born / reverted / changed at this cell on a
    branch (smallest cosine to the previous step first), then the most frequent.
    """
    from .features import read_token_examples  # torch comes with it: not at import (the Snakefile's parse)

    features_dir = Path(features_dir)
    stats = pd.read_parquet(features_dir / "stats.parquet").set_index("feature").sort_index()
    model, data = cell.split("_")
    columns: list[dict] = [{"name": "feature", "label": "feature", "type": "int"}]
    columns.append({"name": "page", "label": "page", "type": "bool"})
    values: dict[str, np.ndarray | list] = {}
    for name, label, kind in STAT_COLUMNS:
        if name in stats.columns:
            columns.append({"name": name, "label": label, "type": kind})
            values[name] = stats[name].to_numpy()
    if "promoted" in stats.columns:
        columns.append({"name": "promoted", "label": "logit lens: promotes", "type": "str"})
        values["promoted"] = [
            " | ".join(map(str, list(t)[:3])) if t is not None and not isinstance(t, float) else None
            for t in stats["promoted"]
        ]
    d_sae = len(stats)
    reasons: dict[int, list[str]] = {}
    order: list[int] = []

    def want(j: int, why: str) -> None:
        if j not in reasons:
            reasons[j] = []
            order.append(j)
        reasons[j].append(why)

    tested = _tested([read_json(p) for p in interventions or []], cell, layer, sae)
    for j, lines in sorted(tested.items()):
        for line in lines:
            want(j, line)
    if tested:
        columns.append({"name": "causal_tests", "label": "causal tests", "type": "str"})
        values["causal_tests"] = ["; ".join(tested.get(int(j), [])) or None for j in stats.index]
    for metric, path in sorted((probes or {}).items()):
        path = Path(path).with_suffix(".parquet")  # beside the probe's JSON, unless the probe was skipped
        if not path.exists():
            continue
        table = pd.read_parquet(path).set_index("feature").reindex(stats.index)
        rank = table["rank"].where(table["rank"] >= 0)
        columns += [
            {"name": f"probe_rank_{metric}", "label": f"probe rank ({metric})", "type": "int"},
            {"name": f"smd_{metric}", "label": f"SMD ({metric})", "type": "float"},
        ]
        values[f"probe_rank_{metric}"] = (rank + 1).to_numpy()  # 1 = the probe's first feature, as on the pages
        values[f"smd_{metric}"] = table["smd"].to_numpy()
        if "importance" in table.columns:  # 1 / (1 + the step where it enters the L1 path); 0: never
            columns.append({"name": f"importance_{metric}", "label": f"L1-path importance ({metric})", "type": "float"})
            values[f"importance_{metric}"] = table["importance"].to_numpy()
        for j in rank.dropna().sort_values().index[:n_top]:
            want(int(j), f"probe rank {int(rank[j]) + 1} ({metric})")
    for metric, path in sorted((attribution or {}).items()):
        table = pd.read_parquet(path).set_index("feature").reindex(stats.index)
        columns += [
            {"name": f"attribution_{metric}", "label": f"attribution ({metric})", "type": "float"},
            {"name": f"attribution_rank_{metric}", "label": f"attribution rank ({metric})", "type": "int"},
        ]
        values[f"attribution_{metric}"] = table["attribution"].to_numpy()
        values[f"attribution_rank_{metric}"] = (table["rank"] + 1).to_numpy()
        for j in table["rank"].dropna().sort_values().index[:n_top]:
            want(int(j), f"attribution rank {int(table['rank'][j]) + 1} ({metric})")
    for name, label, kind in SAME_TOKEN_COLUMNS:
        if name in (same_token or {}):
            columns.append({"name": name, "label": label, "type": kind})
            values[name] = same_token[name]
    lineage_tables = {b: pd.read_parquet(p) for b, p in sorted((lineages or {}).items())}
    at_cell = _step_labels(lineage_tables, cell)
    for branch, rows in at_cell.items():
        rows = rows[~rows.index.duplicated()].reindex(stats.index)
        label, cos_prev = rows[f"label_{cell}"], rows[f"cos_prev_{cell}"]
        columns += [
            {"name": f"label_{branch}", "label": f"{branch} label", "type": "str"},
            {"name": f"cos_prev_{branch}", "label": f"{branch} cos to previous", "type": "float"},
        ]
        values[f"label_{branch}"] = [None if isinstance(v, float) else v for v in label.tolist()]
        values[f"cos_prev_{branch}"] = cos_prev.to_numpy()
        for wanted in TELLING_LABELS:
            picked = cos_prev[label == wanted].sort_values(na_position="first")
            for j in picked.index[:n_top]:
                want(int(j), f"{wanted} at {cell} ({branch})")
    for j in stats["freq"].sort_values(ascending=False).index[:n_top]:
        want(int(j), "among the most frequent")
    # a page needs examples: a feature that never fired on eval has none to show
    live = set(stats.index[stats["fire_count"] > 0].tolist()) if "fire_count" in stats.columns else set(stats.index)
    paged = [j for j in order if j in live][:max_pages]
    examples = read_token_examples(features_dir, paged)
    # the lineages' other cells: only the matched features of the paged ones are read
    folders = {c: Path(f) for c, f in (cell_features or {}).items()}
    needed: dict[str, set[int]] = {c: set() for c in folders}
    for rows in at_cell.values():
        for j in paged:
            if j in rows.index:
                line = rows.loc[[j]].iloc[0]
                for c in needed:
                    f = line.get(f"feature_{c}")
                    if f is not None and np.isfinite(f) and f >= 0:
                        needed[c].add(int(f))
    step_examples = {cell: examples}
    step_examples.update({c: read_token_examples(folders[c], needed[c]) for c in folders if needed[c]})

    links = [{"title": _figure_title(href, cell), "href": href} for href in figure_links or []]
    pages = {}
    for j in paged:
        view = examples[str(j)]
        row = stats.loc[j]
        lineage_blocks = []
        for branch, rows in at_cell.items():
            if j not in rows.index:
                continue
            line = rows.loc[[j]].iloc[0]
            table = lineage_tables[branch]
            chain = [c.removeprefix("feature_") for c in table.columns if c.startswith("feature_")]
            steps = []
            for c in chain:
                f = line[f"feature_{c}"]
                has = bool(np.isfinite(f) and f >= 0)
                cell_examples = step_examples.get(c, {}) if has else {}
                steps.append(
                    {
                        "cell": c,
                        "key": sae_key(c, layer, sae),
                        "feature": int(f) if has else None,
                        "label": _clean(line[f"label_{c}"]),
                        "freq": _clean(line[f"freq_{c}"]),
                        "cos_prev": _clean(line[f"cos_prev_{c}"]),
                        "cos_origin": _clean(line[f"cos_origin_{c}"]),
                        "top": [
                            _trim(e, window)
                            for e in cell_examples.get(str(int(f)) if has else "", {}).get("top", [])[
                                :n_lineage_examples
                            ]
                        ],
                    }
                )
            lineage_blocks.append({"branch": branch, "lineage": int(line["lineage"]), "steps": steps})
        pages[str(j)] = {
            "feature": int(j),
            "why": reasons[j],
            "stats": {
                name: _clean(row[name])
                for name in (
                    "freq",
                    "seq_freq",
                    "fire_count",
                    "mean_act",
                    "max_act",
                    "act_q50",
                    "act_q90",
                    "mean_position",
                )
                if name in row
            },
            "histogram": view["histogram"],
            "top": [_trim(e, window) for e in view["top"]],
            "quantiles": [
                {"label": i["label"], "n": i["n"], "examples": [_trim(e, window) for e in i["examples"]]}
                for i in view["intervals"]
            ],
            "logit_lens": _lens(row),
            "lineages": lineage_blocks,
            "figures": links,
        }
    page_set = set(int(j) for j in pages)
    names = [c["name"] for c in columns]
    kinds = [c["type"] for c in columns]

    def cell_value(name: str, kind: str, i: int):
        value = _clean(values[name][i])
        return int(value) if kind == "int" and value is not None else value  # a rank read as float (NaN)

    rows_out = []
    for i, j in enumerate(stats.index):
        rows_out.append([int(j), int(j) in page_set] + [cell_value(n, k, i) for n, k in zip(names[2:], kinds[2:])])
    notes = []
    if lineage_tables:
        notes.append(
            "Evolution labels use thresholds from a data-resampling null (the same model's SAEs on disjoint "
            "prompt halves of D0). One feature's label is not a finding: whether a step's counts exceed the "
            "null, and whether the layer's SAEs converged, is in the evolution figure and headline.evolution."
        )
    return {
        "schema": SCHEMA,
        "key": sae_key(cell, layer, sae),
        "cell": cell,
        "model": model,
        "data": data,
        "layer": int(layer),
        "sae": sae,
        "d_sae": int(d_sae),
        "columns": columns,
        "rows": rows_out,
        "pages": pages,
        "figures": links,
        "notes": notes,
    }
