"""The grid of a run and where each of its results lives.

One home for two facts every stage shares:

- the grid: cells (model, data), the branches MXDX / M0DX, the diff pairs, the intervention
  runs, the sites (layer, hook point) and the metrics probed;
- the results layout: one function per artifact, returning its path relative to the run
  folder. The rule files, the CLI and the library all call these, so moving an artifact is
  one edit here.

Path functions take ids as strings (or a ``Cell``) and format them into the path, so a rule
can pass wildcard placeholders (``feature_stats("{cell}", "{layer}", "{sae}")``) and get the
rule's pattern. Nothing here reads the file system or imports torch: the Snakefile imports
this module at every parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

RESULTS = "results"


@dataclass(frozen=True)
class Cell:
    """One (model, data) pair of the grid."""

    model: str
    data: str

    @property
    def name(self) -> str:
        return f"{self.model}_{self.data}"

    @classmethod
    def parse(cls, name: str) -> "Cell":
        match = re.fullmatch(r"(M\d+)_(D\d+)", name)
        if not match:
            raise ValueError(f"cell {name!r}: expected the form M<i>_D<j>")
        return cls(*match.groups())


def model_ids(cfg: dict) -> list[str]:
    return sorted(cfg["models"], key=lambda m: int(m[1:]))


def data_ids(cfg: dict) -> list[str]:
    return sorted(cfg["data"], key=lambda d: int(d[1:]))


def branch_cells(cfg: dict, branch: str) -> list[Cell]:
    """MXDX: each model on its own data; M0DX: the base model on each iteration's data."""
    datas = data_ids(cfg)
    if branch == "MXDX":
        return [Cell("M" + d[1:], d) for d in datas]
    if branch == "M0DX":
        return [Cell("M0", d) for d in datas]
    raise ValueError(f"branch {branch!r}: expected MXDX or M0DX")


def cells(cfg: dict) -> list[Cell]:
    """Every cell of the configured branches, each once, base cells first."""
    seen: dict[str, Cell] = {}
    for branch in cfg["grid"]["branches"]:
        for cell in branch_cells(cfg, branch):
            seen.setdefault(cell.name, cell)
    return sorted(seen.values(), key=lambda c: (int(c.data[1:]), int(c.model[1:])))


def warm_start_source(cfg: dict, cell: Cell, mode: str) -> Cell | None:
    """The cell an SAE of ``cell`` starts from: the previous one of its branch, or the base cell."""
    if mode == "none" or cell == Cell("M0", "D0"):
        return None
    if mode == "base":
        return Cell("M0", "D0")
    j = int(cell.data[1:])
    if cell.model == "M0":
        return Cell("M0", f"D{j - 1}")
    return Cell(f"M{int(cell.model[1:]) - 1}", f"D{j - 1}")


def site_dir(layer: int, hook: str) -> str:
    """Folder of one hook site inside a cell: resid_post at layer{L}/, others below it."""
    return f"layer{layer}" if hook == "resid_post" else f"layer{layer}/{hook}"


def sites(cfg: dict) -> list[tuple[int, str]]:
    return [(layer, hook) for layer in cfg["layers"] for hook in cfg["hook_points"]]


def diff_pairs(cfg: dict) -> list[tuple[Cell, Cell, str]]:
    """SAE pairs to diff: each step of each branch ('step': MiDi → Mi+1Di+1, M0Di → M0Di+1), with
    both branches each iteration against the base model on its data ('intra': M0Di vs MiDi, the
    model effect), and the base model on each iteration's data against its own ('data': M0D0 vs
    M0Di, the data effect; for i = 1 that pair is a step of M0DX)."""
    pairs: dict[tuple[Cell, Cell], str] = {}
    branches = cfg["grid"]["branches"]
    for branch in branches:
        chain = branch_cells(cfg, branch)
        for a, b in zip(chain, chain[1:]):
            pairs.setdefault((a, b), "step")
    for a, b in model_effect_pairs(cfg):
        pairs.setdefault((a, b), "intra")
    for a, b in data_effect_pairs(cfg):
        pairs.setdefault((a, b), "data")
    return [(a, b, kind) for (a, b), kind in pairs.items()]


def model_effect_pairs(cfg: dict) -> list[tuple[Cell, Cell]]:
    """(M0Di, MiDi) for i ≥ 1: same data, other model, i.e. the model's change (both branches needed)."""
    if not {"MXDX", "M0DX"} <= set(cfg["grid"]["branches"]):
        return []
    return [(Cell("M0", d), Cell("M" + d[1:], d)) for d in data_ids(cfg)[1:]]


def data_effect_pairs(cfg: dict) -> list[tuple[Cell, Cell]]:
    """(M0D0, M0Di) for i ≥ 1: same model, other data, i.e. the data's change (needs the M0DX branch)."""
    if "M0DX" not in cfg["grid"]["branches"]:
        return []
    return [(Cell("M0", "D0"), Cell("M0", d)) for d in data_ids(cfg)[1:]]


def pair_name(a: Cell, b: Cell) -> str:
    return f"{a.name}__{b.name}"


DIFFING_METHODS = ("crosscoder", "diff_sae", "adl", "kl")


def same_token_pairs(cfg: dict) -> list[tuple[Cell, Cell]]:
    """(M0Di, MiDi) for every iteration i ≥ 1: the base and the tuned model on the same texts of Di.

    Both cells are extracted only when both branches are configured (M0DX holds M0Di); without
    M0DX there is no same-token pair and the same-token methods have nothing to run on."""
    have = {c.name for c in cells(cfg)}
    pairs = []
    for d in data_ids(cfg)[1:]:
        base, tuned = Cell("M0", d), Cell("M" + d[1:], d)
        if base.name in have and tuned.name in have:
            pairs.append((base, tuned))
    return pairs


def all_iterations_cells(cfg: dict) -> list[Cell]:
    """M0..MX on the last iteration's data DX, for one crosscoder over every model at once: the
    same tokens under each model (cells MjDX with 0 < j < X are extracted for it alone). Empty
    unless the crosscoder runs with ``diffing.crosscoder.all_iterations`` and there are 2+ iterations."""
    block = cfg["diffing"]
    if "crosscoder" not in diffing_methods(cfg) or not block["crosscoder"].get("all_iterations", True):
        return []
    last = data_ids(cfg)[-1]
    models = [f"M{j}" for j in range(int(last[1:]) + 1)]
    if len(models) < 3 or not set(models) <= set(cfg["models"]):
        return []
    return [Cell(m, last) for m in models]


def all_iterations_name(cfg: dict) -> str:
    """The all-iterations crosscoder's name in the results: ``all_D{X}``."""
    return f"all_{data_ids(cfg)[-1]}"


def diffing_methods(cfg: dict) -> list[str]:
    """The same-token methods that run: the configured ones, when there is a same-token pair."""
    return list(cfg["diffing"]["methods"]) if same_token_pairs(cfg) else []


def diffing_layers(cfg: dict) -> list[int]:
    return list(cfg["diffing"].get("layers") or cfg["layers"])


def probe_metrics(cfg: dict) -> list[str]:
    """The metrics probed: ``probes.metrics``, else the iterations' target metric."""
    target = (cfg.get("iterations") or {}).get("target")
    return list(cfg["probes"].get("metrics") or ([target["metric"]] if target else []))


def probe_metric_filters(cfg: dict) -> dict[str, dict | None]:
    """Each probed metric and the samples it is read on: the iterations target's ``where`` for the
    target's metric (the change was planted there), every sample for the others."""
    target = (cfg.get("iterations") or {}).get("target") or {}
    return {m: (target.get("where") if m == target.get("metric") else None) for m in probe_metrics(cfg)}


def metric_direction(cfg: dict, metric: str) -> str:
    """Which way a metric should go: ``interventions.directions``, else the iterations target's
    direction for its metric, else up."""
    given = cfg["interventions"]["directions"].get(metric)
    if given:
        return given
    target = (cfg.get("iterations") or {}).get("target") or {}
    return target.get("direction", "up") if target.get("metric") == metric else "up"


@dataclass(frozen=True)
class InterventionRun:
    """One causal experiment: which features (the probe of ``cell``'s SAE) are edited in which model."""

    experiment: str
    cell: Cell
    layer: int
    sae: str
    metric: str
    model: str  # the model generating: Mi for ablation, M0 for steering

    @property
    def out_dir(self) -> str:
        return intervention_dir(self.experiment, self.cell, self.layer, self.sae, self.metric)


def intervention_runs(cfg: dict) -> list[InterventionRun]:
    """Every experiment x iteration x branch x layer x SAE x metric the ``interventions`` block asks for.

    Iteration i's cell is MiDi (branch MXDX) or M0Di (M0DX); ablation runs in Mi, steering and
    clamping in M0. Iteration 0 (the base cell) has nothing to compare and is skipped.
    """
    from .experiments import EXPERIMENTS

    block = cfg["interventions"]
    probed = probe_metrics(cfg)
    metrics = block.get("metrics") or probed
    if not block["enabled"] or not metrics:
        return []
    unprobed = [m for m in metrics if m not in probed]
    if unprobed:
        raise ConfigError(
            f"interventions.metrics: {unprobed} are not probed (probes.metrics: {probed}); "
            "the features to test come from the probes"
        )
    datas = [d for d in data_ids(cfg) if int(d[1:]) > 0]
    wanted = block.get("iterations")
    if wanted is not None:
        missing = [i for i in wanted if f"D{i}" not in datas]
        if missing:
            raise ConfigError(f"interventions.iterations: {missing} have no data D<i> (have {datas})")
        datas = [d for d in datas if int(d[1:]) in wanted]
    layers = block.get("layers") or cfg["layers"]
    bad = [layer for layer in layers if layer not in cfg["layers"]]
    if bad:
        raise ConfigError(f"interventions.layers: {bad} are not among layers {cfg['layers']}")
    saes = block.get("saes") or list(cfg["saes"])
    bad = [name for name in saes if name not in cfg["saes"]]
    if bad:
        raise ConfigError(f"interventions.saes: {bad} are not configured SAEs ({list(cfg['saes'])})")
    branches = block.get("branches") or cfg["grid"]["branches"]
    runs = []
    models = set(cfg["models"])
    for experiment in block["experiments"]:
        edit, runs_in = EXPERIMENTS[experiment]
        for d in datas:
            i = d[1:]
            for branch in branches:
                cell = Cell(f"M{i}", d) if branch == "MXDX" else Cell("M0", d)
                model = f"M{i}" if runs_in == "iteration" else "M0"
                if cell.model not in models or model not in models:
                    continue
                for layer in layers:
                    for name in saes:
                        for metric in metrics:
                            runs.append(InterventionRun(experiment, cell, layer, name, metric, model))
    return list(dict.fromkeys(runs))


def unscored_metric_reason(scorers: list[dict], metric: str) -> str | None:
    """Why an intervention on ``metric`` cannot be measured, or None when a scorer computes it.

    An intervention scores the texts it generates; a metric that only the user's tables carry
    has no value on them.
    """
    from .scorers import metric_names

    scored = metric_names(scorers)
    if metric in scored:
        return None
    return (
        f"metric {metric!r} comes only from the data tables: no configured scorer computes it on new "
        f"generations (scorers compute: {', '.join(scored) or 'nothing'}); add a scorer that does "
        "(the `command` scorer runs your own program)"
    )


def intervention_prompts(cfg: dict) -> tuple[str, list[dict | None]]:
    """The interventions' prompt file and the row filters applied to it, in order: its own
    ``prompts`` and ``where``, else the iterations' prompts, their ``where`` and the target's."""
    block, it = cfg["interventions"], cfg.get("iterations") or {}
    if block.get("prompts"):
        return block["prompts"], [block.get("where")]
    if not it.get("prompts"):
        raise ConfigError(
            "config error: interventions.prompts: required when no iterations block names the "
            "prompts (method given): the prompts the edited models generate from, one per line "
            "or a YAML prompt set"
        )
    return it["prompts"], [it.get("where"), block.get("where", (it.get("target") or {}).get("where"))]


def split_sources(cfg: dict) -> dict:
    """What the prompt split divides (``sae_diff.splits``): ``data`` — the prompt file the cells'
    data was generated from and its filter (None when the data came as given samples);
    ``interventions`` — the interventions' prompt file and filters (``intervention_prompts``);
    ``separate`` — whether the interventions' prompts are a set of their own (then every data
    prompt selects features and the separate set is split between condition and report)."""
    it = cfg.get("iterations") or {}
    path, wheres = intervention_prompts(cfg)
    data = (it["prompts"], it.get("where")) if it.get("prompts") else None
    return {"data": data, "interventions": (path, wheres), "separate": data is None or path != data[0]}


# --------------------------------------------------------------------------- results layout


def _cell_name(cell) -> str:
    return cell.name if isinstance(cell, Cell) else str(cell)


def model_dir(model: str) -> str:
    """A model as a safetensors HF folder (converted, or made by a DPO round)."""
    return f"{RESULTS}/models/{model}"


def raw_samples(data: str) -> str:
    """A data set as generated or read, with its train/eval split, before scoring."""
    return f"{RESULTS}/data/{data}/raw.parquet"


def samples(data: str) -> str:
    """A data set with the scorers' metric columns."""
    return f"{RESULTS}/data/{data}/samples.parquet"


def iterations_json() -> str:
    return f"{RESULTS}/iterations.json"


def iterations_examples() -> str:
    return f"{RESULTS}/iterations_examples.csv"


def activations_dir(cell) -> str:
    """A cell's activation stores, one folder per site (``site_dir``)."""
    return f"{RESULTS}/activations/{_cell_name(cell)}"


def manifest(cell, site: str) -> str:
    return f"{activations_dir(cell)}/{site}/manifest.json"


def saes_dir(cell, layer) -> str:
    """The SAEs of one (cell, layer), one folder per SAE config."""
    return f"{RESULTS}/saes/{_cell_name(cell)}/layer{layer}"


def sae_dir(cell, layer, name: str) -> str:
    return f"{saes_dir(cell, layer)}/{name}"


def sae_weights(cell, layer, name: str) -> str:
    """The file that stands for an SAE folder in the DAG (written last, so the folder is whole)."""
    return f"{sae_dir(cell, layer, name)}/sae_weights.safetensors"


def cell_layer_name(path, per_sae_folder: bool = True) -> tuple[str, int, str]:
    """(cell, layer, SAE name) of a file from its place in the layout, for library code handed a
    list of files by its rule: a file inside a per-SAE folder (``sae_weights``, ``feature_stats``:
    ``<cell>/layer<L>/<sae>/<file>``), or with ``per_sae_folder=False`` a per-SAE file
    (``eval_json``: ``<cell>/layer<L>/<sae>.json``)."""
    from pathlib import PurePath

    path = PurePath(path)
    folder, name = (path.parent, path.parent.name) if per_sae_folder else (path, path.name.split(".")[0])
    cell, layer = folder.parent.parent.name, folder.parent.name
    if not re.fullmatch(r"layer\d+", layer) or not re.fullmatch(r"M\d+_D\d+", cell):
        raise ValueError(f"{path}: expected <cell>/layer<L>/<sae>{'/<file>' if per_sae_folder else '.json'}")
    return cell, int(layer[5:]), name


def seed_saes_dir(layer) -> str:
    """The calibration partners of the base cell's SAEs (same config and data, other seeds)."""
    return f"{RESULTS}/calibration/seed_saes/M0_D0/layer{layer}"


def seed_sae_weights(layer, name: str) -> str:
    return f"{seed_saes_dir(layer)}/{name}/sae_weights.safetensors"


def cross_init_sae_dir(layer, name: str, vary: str) -> str:
    """The base cell's SAE from another init (its convergence check): the calibration partner itself
    when that already varies the init (``diff.vary: init_and_shuffle``), else one trained beside it."""
    return f"{seed_saes_dir(layer)}/{name if vary == 'init_and_shuffle' else name + '-cross-init'}"


def null_dir(layer) -> str:
    """The data-resampling null of one layer: SAEs of each prompt-split pair, and their label counts."""
    return f"{RESULTS}/nulls/layer{layer}"


def null_sae_weights(layer, pair: int, side: str, name: str) -> str:
    return f"{null_dir(layer)}/pair{pair}/{side}/{name}/sae_weights.safetensors"


def null_json(layer, name: str) -> str:
    return f"{null_dir(layer)}/{name}.json"


def null_cosines(layer, name: str) -> str:
    """The null pairs' matched decoder cosines, the pool the same / new thresholds are quantiles of."""
    return f"{null_dir(layer)}/{name}_cosines.parquet"


def calibration_dir(layer) -> str:
    return f"{RESULTS}/calibration/layer{layer}"


def calibration_json(layer, name: str) -> str:
    return f"{calibration_dir(layer)}/{name}.json"


def eval_dir(cell, layer) -> str:
    return f"{RESULTS}/eval/{_cell_name(cell)}/layer{layer}"


def eval_json(cell, layer, name: str) -> str:
    return f"{eval_dir(cell, layer)}/{name}.json"


def eval_loss_by_position(cell, layer, name: str) -> str:
    return f"{eval_dir(cell, layer)}/{name}.loss_by_position.parquet"


def features_dir(cell, layer) -> str:
    """Feature statistics of the SAEs of one (cell, layer), one folder per SAE config."""
    return f"{RESULTS}/features/{_cell_name(cell)}/layer{layer}"


def feature_stats(cell, layer, name: str) -> str:
    return f"{features_dir(cell, layer)}/{name}/stats.parquet"


def diff_dir(a, b, layer) -> str:
    return f"{RESULTS}/diff/{_cell_name(a)}__{_cell_name(b)}/layer{layer}"


def diff_json(a, b, layer, name: str) -> str:
    """A labelled diff's summary; its per-feature table is beside it (``.parquet``)."""
    return f"{diff_dir(a, b, layer)}/{name}.json"


def evolution_dir(layer) -> str:
    return f"{RESULTS}/evolution/layer{layer}"


def evolution_json(layer, name: str) -> str:
    return f"{evolution_dir(layer)}/{name}.json"


def evolution_lineages(layer, name: str, branch: str) -> str:
    """One branch's lineage table of a layer and SAE, beside the evolution's JSON."""
    return f"{evolution_dir(layer)}/{name}_lineages_{branch}.parquet"


def probes_dir(cell, layer) -> str:
    return f"{RESULTS}/probes/{_cell_name(cell)}/layer{layer}"


def probe_json(cell, layer, name: str, metric: str) -> str:
    """A probe's summary; its per-feature table is beside it (``.parquet``) unless it was skipped."""
    return f"{probes_dir(cell, layer)}/{name}/{metric}.json"


def probe_comparison(layer) -> str:
    return f"{RESULTS}/probes/comparison_layer{layer}.json"


def attribution_table(cell, layer, name: str, metric: str) -> str:
    """Fork attribution per feature; its summary is beside it (``.json``)."""
    return f"{RESULTS}/attribution/{_cell_name(cell)}/layer{layer}/{name}/{metric}.parquet"


def attribution_summary(cell, layer, name: str, metric: str) -> str:
    return attribution_table(cell, layer, name, metric).removesuffix(".parquet") + ".json"


def probe_diffmean(cell, layer, name: str, metric: str) -> str:
    """The difference-in-means direction of a probe's high and low samples' raw activations
    (float32 .npy; zeros when the probe was skipped): a comparison method of the interventions."""
    return probe_json(cell, layer, name, metric).removesuffix(".json") + ".diffmean.npy"


def prompt_split() -> str:
    """The causal tests' prompt split (``sae_diff.splits``): which prompts select features, which
    pick the condition and which report it."""
    return f"{RESULTS}/interventions/prompt_split.csv"


def intervention_dir(experiment: str, cell, layer, name: str, metric: str) -> str:
    """generations.parquet, scores.parquet and effects.json of one causal experiment."""
    return f"{RESULTS}/interventions/{experiment}/{_cell_name(cell)}/layer{layer}/{name}/{metric}"


def same_token_pair(i) -> str:
    """The name of iteration i's same-token pair: ``M0_D{i}__M{i}_D{i}`` (``i`` may be ``"{i}"``)."""
    return f"M0_D{i}__M{i}_D{i}"


def diffing_dir(method: str, pair: str, layer=None) -> str:
    """One same-token method's results for a pair ``M0_Di__Mi_Di`` (per layer, except per-token KL)."""
    base = f"{RESULTS}/diffing/{method}/{pair}"
    return base if layer is None else f"{base}/layer{layer}"


def crosscoder_files(pair: str, layer) -> list[str]:
    """The crosscoder of one pair and layer (its folder ``crosscoder/`` beside): latents, examples, metrics."""
    folder = diffing_dir("crosscoder", pair, layer)
    return [f"{folder}/crosscoder/crosscoder_weights.safetensors"] + [
        f"{folder}/{name}" for name in ("latents.parquet", "examples.json", "metrics.json")
    ]


def diff_sae_latents(pair: str, layer) -> str:
    """The diff-SAE's latents ranked by the share of Mi − M0 they carry (sae/, features/ beside it)."""
    return f"{diffing_dir('diff_sae', pair, layer)}/latents.parquet"


def diff_sae_metrics(pair: str, layer) -> str:
    return f"{diffing_dir('diff_sae', pair, layer)}/metrics.json"


def diff_sae_metric_latents(pair: str, layer) -> str:
    """The diff-SAE latents behind each probed metric, chosen on train and reported on eval (``metric_latents``)."""
    return f"{diffing_dir('diff_sae', pair, layer)}/metric_latents.json"


def adl_files(pair: str, layer) -> list[str]:
    """The activation-difference lens of one pair and layer: directions (safetensors) and readout (JSON)."""
    folder = diffing_dir("adl", pair, layer)
    return [f"{folder}/adl.safetensors", f"{folder}/adl.json"]


def kl_files(pair: str) -> list[str]:
    """Per-token KL of one pair on its data's eval split: every token, the top tokens, the means."""
    folder = diffing_dir("kl", pair)
    return [f"{folder}/tokens.parquet", f"{folder}/top.parquet", f"{folder}/kl.json"]


def kl_recovery(pair: str, layer) -> str:
    """How much of KL(Mi ‖ M0) each method's directions close when added into M0 at the layer, beside random latents."""
    return f"{diffing_dir('kl', pair, layer)}/recovery.json"


def diffing_record(pair: str, layer) -> str:
    """Every same-token method's top findings for one pair and layer, and where they agree."""
    return f"{RESULTS}/diffing/records/{pair}/layer{layer}.json"


def diffing_matches(pair: str, layer) -> str:
    """Beside the record (when the crosscoder and the diff-SAE both ran): every diff-SAE latent's
    best-matching crosscoder latent by |cosine| with the crosscoder's Mi decoder (Mi-only, and any class)."""
    return f"{RESULTS}/diffing/records/{pair}/layer{layer}.diff_sae_matches.parquet"


def dashboard_dir() -> str:
    """The static feature dashboard: ``index.html`` opens from disk."""
    return f"{RESULTS}/dashboard"


def dashboard_index() -> str:
    return f"{dashboard_dir()}/index.html"


def dashboard_data(cell, layer, name: str) -> str:
    """One SAE's dashboard document (JSON; the page loads the ``.js`` beside it). The name is
    ``sae_diff.dashboard.slug`` of the SAE's key ``<cell>/layer<L>/<name>``."""
    return f"{dashboard_dir()}/data/{_cell_name(cell)}__layer{layer}__{name}.json"


def summary_json() -> str:
    return f"{RESULTS}/summary.json"


def summary_table() -> str:
    return f"{RESULTS}/summary_table.csv"


def wandb_record() -> str:
    return f"{RESULTS}/wandb/run.json"


def benchmark(rule: str, job: str) -> str:
    """Snakemake's benchmark TSV of one job (summed per stage in headline.timings)."""
    return f"{RESULTS}/benchmarks/{rule}/{job}.tsv"


# every figure of a run, by kind: the figure rules' outputs and the summary's list both come from here
FIGURES = {
    "iterations": "figures/iterations/target_metric.png",
    "training": "figures/saes/{cell}/layer{layer}/{sae}_training.png",
    "density": "figures/eval/{cell}/layer{layer}/{sae}_density.png",
    "loss_by_position": "figures/eval/{cell}/layer{layer}/{sae}_loss_by_position.png",
    "statistics": "figures/features/{cell}/layer{layer}/{sae}/statistics.png",
    "embeddings": "figures/features/{cell}/layer{layer}/{sae}/embeddings.png",
    "bias": "figures/features/{cell}/layer{layer}/{sae}/bias.png",
    "coactivation": "figures/features/{cell}/layer{layer}/{sae}/coactivation_{column}.png",
    "coactivation_top": "figures/features/{cell}/layer{layer}/{sae}/coactivation_{column}_top.png",
    "coactivation_layers": "figures/features/{cell}/{sae}_coactivation_{column}_layers.png",
    "evolution": "figures/evolution/layer{layer}/{sae}_counts.png",
    "similarity": "figures/evolution/layer{layer}/{sae}_similarity_{branch}.png",
    "probe_auroc": "figures/probes/layer{layer}/{sae}_{metric}_auroc.png",
    "probe_importance": "figures/probes/{cell}/layer{layer}/{sae}_{metric}_importance.png",
    "probe_overlap": "figures/probes/layer{layer}/{sae}_{metric}_overlap.png",
    "dose_response": "figures/interventions/{experiment}/{cell}/layer{layer}/{sae}_{metric}.png",
    "diffing": "figures/diffing/{pair}/layer{layer}.png",
}


class _KeepMissing(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def figure(kind: str, **ids) -> str:
    """A figure's path; ids not given stay as ``{wildcards}``, so ``figure("statistics")`` is the
    rule's output pattern."""
    ids = {key: _cell_name(value) for key, value in ids.items()}
    return f"{RESULTS}/" + FIGURES[kind].format_map(_KeepMissing(ids))
