"""Export an SAE's feature tables to the SAEDashboard / Neuronpedia upload layout.

SAEDashboard's ``NeuronpediaRunner`` (github.com/jbloomAus/SAEDashboard, PyPI ``sae-dashboard``;
``sae_dashboard/neuronpedia/neuronpedia_runner.py``, ``neuronpedia_converter.py`` and the
data classes of ``neuronpedia_dashboard.py``, matched at release 0.8.0, commit 37bb168f, and at
main, commit db4839a4) runs the model over a dataset and writes into its output folder

* ``run_settings.json``: its ``NeuronpediaRunnerConfig`` as a dict;
* ``skipped_indexes.json``: ``{model_id, layer (a string), sae_set, log_sparsity,
  skipped_indexes}``, the features Neuronpedia is to create as dead;
* ``batch-<i>.json``: ``{model_id, layer, sae_set, sae_id_suffix, features: [...]}``, the
  features split into ``ceil(n / n_features_at_a_time)`` near-equal batches (``np.array_split``),
  one dict per feature as ``NeuronpediaDashboardFeature.to_dict`` writes it.

Its ``neuronpedia_export`` (main) or Neuronpedia's own import scripts turn those batch files
into the bulk-import rows. ``neuronpedia`` below writes the same three kinds of file from the
tables the features stage already made, without running the model:

* ``stats.parquet`` -> ``frac_nonzero`` (``freq``: the fraction of eval tokens where the
  feature fires; the runner's is the same fraction over its prompts), the logit-lens tokens
  ``pos_str`` / ``pos_values`` (``promoted`` / ``promoted_logit``, largest first) and ``neg_str``
  / ``neg_values`` (``suppressed`` / ``suppressed_logit``, most negative first), both empty
  when the stage ran without the model;
* the token examples (``features.read_token_examples``) -> ``freq_hist_data_bar_heights`` (the histogram's counts) and
  ``freq_hist_data_bar_values`` (its bin midpoints; our bins span (0, max] where the
  runner's span [smallest nonzero, max]), and ``activations``: first the top examples as the
  runner's "TOP ACTIVATIONS" group (``bin_min`` = ``bin_contains`` = -1, ``bin_max`` = the
  feature's max activation), then each interval of the max activation, highest first as the
  runner orders its quantile groups, with ``bin_min`` / ``bin_max`` its bounds and
  ``bin_contains`` the fraction of eval tokens whose activation lies in it (the runner's lowest
  group also counts the tokens where the feature is 0; ours counts firings only). Each
  activation's ``tokens`` / ``values`` are the example's context window (± the stage's
  ``context_window``, not the whole prompt the runner shows) and ``qualifying_token_index``
  indexes its token;
* the SAE's decoder (``sae_weights.safetensors``) -> ``neuron_alignment_indices`` /
  ``_values`` / ``_l1``: the 3 largest entries of the feature's decoder row and their share of
  the row's L1 norm, as the runner's ``add_neuron_alignment_data`` computes them; ``cfg.json``'s
  hook name -> ``layer``.

Left as the converter leaves them when their data is absent: ``correlated_neurons_*`` and
``correlated_features_*`` (they need activations of the model's neurons and of all features
together) and ``logits_hist_data_*`` (the logits of the whole vocabulary) are empty lists;
``decoder_weights_dist`` (attention-head SAEs only) and ``vector`` (vector sets only) are
empty; each activation's DFA fields are ``dfa_values: []``, ``dfa_maxValue: 0``,
``dfa_targetIndex: -1``. ``n_prompts_total``, ``n_tokens_in_prompt`` and ``dataset`` are what
the caller passes (0, 0 and "" otherwise, the data classes' defaults). Lists of numbers are
rounded to 5 decimals as the converter's ``round_list`` does; single numbers are not.

Features that never fired on the eval tokens (``dead``) have no examples: they go into
``skipped_indexes.json`` rather than a batch, unless ``include_dead``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError
from .features import TOKEN_EXAMPLES, read_token_examples

RUN_SETTINGS = "run_settings.json"
SKIPPED = "skipped_indexes.json"
PROVENANCE = "sae_diff_export.json"
NEURON_ALIGNMENT_ROWS = 3  # the runner's FeatureTablesConfig(n_rows=3)
DEFAULT_SPARSITY_THRESHOLD = -6  # NeuronpediaRunnerConfig's default, recorded as the runner does
STATS_COLUMNS = ("feature", "fire_count", "freq", "max_act", "dead")
LOGIT_COLUMNS = {"pos": ("promoted", "promoted_logit"), "neg": ("suppressed", "suppressed_logit")}
EMPTY_FIELDS = (
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "decoder_weights_dist",
    "vector",
)


def _rounded(values) -> list:
    """The converter's ``round_list``: numpy rounding to 5 decimals (ints stay ints)."""
    array = np.asarray(list(values))
    if array.size == 0:
        return []
    if array.dtype.kind == "f":
        array = array.astype(np.float64)  # float32 values would print as 0.863290011882782
    return np.round(array, 5).tolist()


def _layer_of(hook_name: str, where: Path) -> int:
    found = re.match(r"^blocks\.(\d+)\.", hook_name or "")
    if found is None:
        raise DataError(
            f"{where}: hook name {hook_name!r} has no 'blocks.<layer>.' prefix to read the layer from; "
            "pass layer= explicitly"
        )
    return int(found.group(1))


def _read_stats(path: Path, d_sae: int) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (the features stage writes it; rerun rule feature_stats)")
    stats = pd.read_parquet(path)
    missing = [c for c in STATS_COLUMNS if c not in stats.columns]
    if missing:
        raise DataError(f"{path}: columns {missing} missing (found {list(stats.columns)}); rerun the features stage")
    if len(stats) != d_sae or not np.array_equal(np.sort(stats["feature"].to_numpy()), np.arange(d_sae)):
        raise DataError(
            f"{path}: {len(stats)} rows for features {stats['feature'].min()}..{stats['feature'].max()}, "
            f"but the SAE has d_sae={d_sae}: the tables are of another SAE; rerun the features stage"
        )
    return stats.set_index("feature", drop=False).sort_index()


def _field(view: dict, key: str, path: Path, feature: int):
    if key not in view:
        raise DataError(f"{path}: feature {feature!r} has no {key!r} (found {sorted(view)}); rerun the features stage")
    return view[key]


def _logit_lens(row: pd.Series, columns: tuple[str, str]) -> tuple[list[str], list[float]]:
    tokens, logits = columns
    if tokens not in row.index or logits not in row.index:
        return [], []
    names, values = row[tokens], row[logits]
    if names is None or values is None or (np.ndim(names) == 0 and pd.isna(names)):
        return [], []
    return [str(t) for t in names], _rounded(np.asarray(values, dtype=np.float64))


def _activation(example: dict, bin_min: float, bin_max: float, bin_contains: float, where: str) -> dict:
    missing = [k for k in ("tokens", "acts", "at") if k not in example]
    if missing:
        raise DataError(f"{where}: an example lacks {missing} (found {sorted(example)}); rerun the features stage")
    if len(example["tokens"]) != len(example["acts"]):
        raise DataError(f"{where}: an example has {len(example['tokens'])} tokens but {len(example['acts'])} acts")
    return {
        "bin_min": bin_min,
        "bin_max": bin_max,
        "bin_contains": bin_contains,
        "tokens": [str(t) for t in example["tokens"]],
        "values": _rounded(np.asarray(example["acts"], dtype=np.float64)),
        "qualifying_token_index": int(example["at"]),
        # what the converter writes for an example without DFA data
        "dfa_values": [],
        "dfa_maxValue": 0,
        "dfa_targetIndex": -1,
    }


def feature_dict(
    feature: int,
    row: pd.Series,
    view: dict | None,
    alignment: tuple[list[int], list[float], list[float]],
    *,
    examples_path: Path,
    dataset: str = "",
    n_prompts_total: int = 0,
    n_tokens_in_prompt: int = 0,
) -> dict:
    """One feature as ``NeuronpediaDashboardFeature.to_dict`` writes it (same keys, same order)."""
    pos_str, pos_values = _logit_lens(row, LOGIT_COLUMNS["pos"])
    neg_str, neg_values = _logit_lens(row, LOGIT_COLUMNS["neg"])
    heights, midpoints, activations = [], [], []
    fire_count, freq = int(row["fire_count"]), float(row["freq"])
    if view is not None:
        where = f"{examples_path} feature {feature}"
        histogram = _field(view, "histogram", examples_path, feature)
        edges = np.asarray(_field(histogram, "edges", examples_path, feature), dtype=np.float64)
        counts = np.asarray(_field(histogram, "counts", examples_path, feature), dtype=np.int64)
        if len(edges) != len(counts) + 1:
            raise DataError(f"{where}: histogram has {len(edges)} edges for {len(counts)} counts")
        if int(counts.sum()) != fire_count:
            raise DataError(
                f"{where}: histogram counts {int(counts.sum())} firings, stats.parquet {fire_count}: the two "
                "files are of different runs; rerun the features stage"
            )
        heights, midpoints = _rounded(counts), _rounded((edges[:-1] + edges[1:]) / 2)
        top = float(row["max_act"])
        activations = [_activation(e, -1, top, -1, where) for e in _field(view, "top", examples_path, feature)]
        intervals = _field(view, "intervals", examples_path, feature)
        n_tokens = fire_count / freq if freq > 0 else 0.0  # the eval tokens the frequencies are over
        for i in reversed(range(len(intervals))):  # highest interval first, as the runner's quantile groups
            interval = intervals[i]
            low, high = top * i / len(intervals), top * (i + 1) / len(intervals)
            examples = _field(interval, "examples", examples_path, feature)
            contains = int(_field(interval, "n", examples_path, feature)) / n_tokens if n_tokens else 0.0
            activations += [_activation(e, low, high, contains, where) for e in examples]
    indices, values, l1 = alignment
    return {
        "feature_index": int(feature),
        "neuron_alignment_indices": indices,
        "neuron_alignment_values": values,
        "neuron_alignment_l1": l1,
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        "neg_str": neg_str,
        "neg_values": neg_values,
        "pos_str": pos_str,
        "pos_values": pos_values,
        "frac_nonzero": freq,
        "freq_hist_data_bar_values": midpoints,
        "freq_hist_data_bar_heights": heights,
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "n_prompts_total": int(n_prompts_total),
        "n_tokens_in_prompt": int(n_tokens_in_prompt),
        "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": activations,
        "vector": [],
    }


def neuron_alignment(w_dec, n_rows: int = NEURON_ALIGNMENT_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per decoder row: the indices and values of its ``n_rows`` largest entries and their
    absolute values' share of the row's L1 norm (SAEDashboard's add_neuron_alignment_data)."""
    import torch

    w = torch.as_tensor(w_dec).float()
    top = w.topk(min(n_rows, w.shape[1]), dim=1, largest=True)
    l1 = top.values.abs() / w.abs().sum(dim=1, keepdim=True)
    return top.indices.numpy(), top.values.numpy(), l1.numpy()


def neuronpedia(
    features_folder: str | Path,
    sae_folder: str | Path,
    out_folder: str | Path,
    model_id: str,
    sae_id: str,
    features=None,
    batch_size: int = 128,
    *,
    layer: int | None = None,
    sae_id_suffix: str | None = None,
    dataset: str = "",
    n_prompts_total: int = 0,
    n_tokens_in_prompt: int = 0,
    include_dead: bool = False,
) -> dict:
    """Write ``out_folder`` (atomically) in SAEDashboard's Neuronpedia layout: ``batch-<i>.json``,
    ``run_settings.json``, ``skipped_indexes.json``, plus ``sae_diff_export.json`` (where the
    data came from, which fields are empty).

    features_folder: the features stage's folder of the SAE (``stats.parquet`` and the token
    examples, ``features.read_token_examples``); sae_folder: the SAE in SAELens layout. model_id: Neuronpedia's
    model id; sae_id: the source set name (``sae_set``; Neuronpedia's source id is then
    ``<layer>-<sae_id>``, with ``__<sae_id_suffix>`` when given). features: the feature indices
    to export (default: all); batch_size: the runner's ``n_features_at_a_time``. layer: read
    from the SAE's hook name unless given. Returns a short summary.
    """
    from .io import atomic_dir, check_replaceable, write_json
    from .sae import files

    features_folder, sae_folder, out_folder = Path(features_folder), Path(sae_folder), Path(out_folder)
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: expected at least 1")
    if not model_id or not sae_id:
        raise ValueError(f"model_id {model_id!r} and sae_id {sae_id!r}: both are needed (Neuronpedia's ids)")
    check_replaceable(out_folder)  # before any work, not after it
    if not sae_folder.is_dir():
        raise FileNotFoundError(f"{sae_folder}: missing (expected an SAE folder with cfg.json)")
    sae = files.load(sae_folder)
    d_sae = sae.cfg.d_sae
    if layer is None:
        layer = _layer_of(sae.cfg.hook_name, sae_folder / "cfg.json")
    stats = _read_stats(features_folder / "stats.parquet", d_sae)

    if features is None:
        wanted = np.arange(d_sae)
    else:
        wanted = np.unique(np.asarray(list(features), dtype=np.int64))
        outside = wanted[(wanted < 0) | (wanted >= d_sae)]
        if len(outside):
            raise ValueError(f"features {outside.tolist()[:10]}: outside the SAE's 0..{d_sae - 1}")
    dead = stats["dead"].to_numpy(bool) | (stats["fire_count"].to_numpy() == 0)
    skipped = np.flatnonzero(dead)
    exported = wanted if include_dead else wanted[~dead[wanted]]

    examples_path = features_folder / TOKEN_EXAMPLES
    live_exported = exported[~dead[exported]]
    examples = read_token_examples(features_folder, live_exported.tolist()) if len(live_exported) else {}
    for j in live_exported:
        if str(int(j)) not in examples:
            raise DataError(
                f"{examples_path}: feature {int(j)} (fired {int(stats.at[j, 'fire_count'])} times by stats.parquet) "
                "has no entry; the two files are of different runs: rerun the features stage"
            )

    w_dec = sae.W_dec.detach()[np.asarray(exported, dtype=np.int64)] if len(exported) else None
    idx, val, l1 = neuron_alignment(w_dec) if w_dec is not None else ([], [], [])
    rows = []
    for n, j in enumerate(exported.tolist()):
        alignment = (np.asarray(idx[n]).tolist(), _rounded(val[n]), _rounded(l1[n]))
        rows.append(
            feature_dict(
                j,
                stats.loc[j],
                None if dead[j] else examples[str(j)],
                alignment,
                examples_path=examples_path,
                dataset=dataset,
                n_prompts_total=n_prompts_total,
                n_tokens_in_prompt=n_tokens_in_prompt,
            )
        )
    n_batches = math.ceil(len(rows) / batch_size)
    batches = np.array_split(np.arange(len(rows)), n_batches) if n_batches else []

    views = [examples[str(int(j))] for j in live_exported]
    settings = {
        "sae_set": sae_id,
        "sae_path": str(sae_folder),
        "outputs_dir": str(out_folder),
        "np_sae_id_suffix": sae_id_suffix,
        "np_set_name": sae_id,
        "from_local_sae": True,
        "sparsity_threshold": DEFAULT_SPARSITY_THRESHOLD,
        "huggingface_dataset_path": dataset,
        "n_prompts_total": int(n_prompts_total),
        "n_tokens_in_prompt": int(n_tokens_in_prompt),
        "n_features_at_a_time": int(batch_size),
        "n_quantiles": max((len(v.get("intervals", [])) for v in views), default=0),
        "top_acts_group_size": max((len(v.get("top", [])) for v in views), default=0),
        "quantile_group_size": max(
            (len(i.get("examples", [])) for v in views for i in v.get("intervals", [])), default=0
        ),
        "use_dfa": False,
        "model_id": model_id,
        "layer": int(layer),
    }
    with atomic_dir(out_folder) as tmp:
        write_json(tmp / RUN_SETTINGS, settings)
        (tmp / SKIPPED).write_text(
            json.dumps(
                {
                    "model_id": model_id,
                    "layer": str(layer),
                    "sae_set": sae_id,
                    "log_sparsity": DEFAULT_SPARSITY_THRESHOLD,
                    "skipped_indexes": [] if include_dead else skipped.tolist(),
                }
            )
        )
        for b, members in enumerate(batches):
            batch = {
                "model_id": model_id,
                "layer": int(layer),
                "sae_set": sae_id,
                "sae_id_suffix": sae_id_suffix,
                "features": [rows[i] for i in members.tolist()],
            }
            try:
                text = json.dumps(batch, allow_nan=False)
            except ValueError as error:
                raise DataError(f"{features_folder}: a NaN or infinity in the exported fields ({error})") from error
            (tmp / f"batch-{b}.json").write_text(text)
        write_json(
            tmp / PROVENANCE,
            {
                "format": "SAEDashboard NeuronpediaRunner output (batch-<i>.json, run_settings.json, "
                "skipped_indexes.json)",
                "features_folder": str(features_folder),
                "sae_folder": str(sae_folder),
                "n_features": len(rows),
                "n_batches": len(batches),
                "n_skipped": 0 if include_dead else len(skipped),
                "empty_fields": list(EMPTY_FIELDS),
            },
        )
    return {"features": len(rows), "batches": len(batches), "skipped": 0 if include_dead else int(len(skipped))}
