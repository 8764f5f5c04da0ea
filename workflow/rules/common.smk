# Config validation, the grid's id lists, and the named input functions of the rule files.
# Every results path comes from sae_diff.grid (one home for the layout).
import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # parse-time helpers, even before install
from sae_diff import config as cfglib  # noqa: E402
from sae_diff import grid  # noqa: E402  (the grid and every results path)
from sae_diff import scorers as scorerlib  # noqa: E402

try:
    # our validator first: it stops with one line naming the key, the value and what was expected
    cfglib.validate(config)
    validate(config, "../../src/sae_diff/schemas/config.schema.yaml")  # the same schema and defaults
    cfglib.check(config, [Path.cwd(), Path(workflow.basedir)])
    INTERVENTION_RUNS = grid.intervention_runs(config)
except cfglib.ConfigError as error:
    sys.exit(str(error))

MODELS = grid.model_ids(config)
DPO_MODELS = [m for m in MODELS if config["models"][m]["source"] == "dpo"]
PREPARED_MODELS = [m for m in MODELS if m not in DPO_MODELS]
DATA = grid.data_ids(config)
CELLS = grid.cells(config)
SITES = [grid.site_dir(layer, hook) for layer, hook in grid.sites(config)]
SAES = list(config["saes"])
TRAINED_SAES = [n for n, s in config["saes"].items() if s["source"] == "train"]
PRETRAINED_SAES = [n for n, s in config["saes"].items() if s["source"] == "pretrained"]
PROBE_METRICS = grid.probe_metrics(config)
METRIC_NAMES = scorerlib.metric_columns(config["scorers"], config["data"])


wildcard_constraints:
    # names joined by "_" in file names (e.g. {sae}_{metric}_auroc.png) must not swallow each other
    sae="|".join(map(re.escape, SAES)) or "(?!x)x",
    metric="|".join(map(re.escape, PROBE_METRICS)) or "(?!x)x",


# diffs need a seed-pair calibration, so only SAEs trained here are diffed
DIFF_SAES = TRAINED_SAES if config["diff"]["enabled"] else []
DIFFING_METHODS = grid.diffing_methods(config)
DIFFING_LAYERS = grid.diffing_layers(config)
ALL_ITERATIONS = grid.all_iterations_cells(config)  # M0..MX on DX, for one crosscoder over them all
# timed same-token rules: (rule, the method it serves, one job per layer or per pair)
DIFFING_BENCHMARKS = [
    ("crosscoder", "crosscoder", True),
    ("diff_sae", "diff_sae", True),
    ("adl", "adl", False),
    ("token_kl", "kl", False),
    ("kl_recovery", "kl", True),
]


wildcard_constraints:
    model=r"M\d+",
    data=r"D\d+",
    layer=r"\d+",
    cell=r"M\d+_D\d+",
    branch=r"MXDX|M0DX",
    column=r"[A-Za-z0-9_]+",
    i=r"\d+",


def spec(**parts):
    """The part of the config a job depends on, as JSON: its params change exactly when it must rerun.

    Rules call it inside a lambda: Snakemake would otherwise expand {...} in string params
    (a pretrained SAE's path template) as wildcards.
    """
    return json.dumps(parts, sort_keys=True)


def placement():
    """Where and in what precision a model-running job computes (models.placement reads it)."""
    return dict(device=config["device"], device_map=config["device_map"], autocast=config["autocast"])


def streaming_inputs(w, model=None, data=None):
    """The model and samples a job computes uncached activations from (activations.cache: false)."""
    if config["activations"]["cache"]:
        return {}
    model, data = model or w.model, data or w.data
    return {"stream_model": grid.model_dir(model), "stream_samples": grid.samples(data)}


def streaming_args(w, model=None, data=None):
    files = streaming_inputs(w, model, data)
    if not files:
        return ""
    return f"--model-dir {shlex.quote(files['stream_model'])} --samples {shlex.quote(files['stream_samples'])}"


def source_fingerprint(path):
    """What the user brought (a model folder, a data table), as (name, size, mtime) of every file:
    an in-place edit changes the job's params and reruns it. Snakemake compares a folder input's
    own mtime, which a changed file inside does not touch; hashing contents would read every
    checkpoint at every parse."""
    import hashlib

    from sae_diff.io import file_stamps

    if not Path(path).exists():
        return None  # a hub id resolved from the local cache: its revision is in the spec
    return hashlib.sha256("\n".join(file_stamps(path)).encode()).hexdigest()[:16]


def model_source(w):
    block = config["models"][w.model]
    return source_fingerprint(block["path"]) if block["source"] == "hf" else None


def data_source(w):
    block = config["data"][w.data]
    return source_fingerprint(block["path"]) if block["source"] == "table" else None


def input_args(named_paths):
    """`--input NAME=PATH` flags for a figure verb, each NAME=PATH quoted as one argument."""
    return " ".join(f"--input {shlex.quote(f'{name}={path}')}" for name, path in named_paths)


def one_of(ids):
    """A wildcard constraint matching exactly these ids (nothing when empty)."""
    return "|".join(ids) if ids else "(?!x)x"


def bench(rule_name, pattern):
    return grid.benchmark(rule_name, pattern)


def manifests(cell_name):
    return [grid.manifest(cell_name, site) for site in SITES]


# ----- named input functions of the rule files; w is the job's wildcards


def init_model_input(w):
    source = config["models"][w.model].get("init_from")
    return [grid.model_dir(source)] if source else []


def dpo_inputs(w):
    model = config["models"][w.model]
    return {
        "parent": grid.model_dir(model["parent"]),
        "reference": grid.model_dir(model["reference"]),
        "samples": grid.samples(model["pairs_from"]),
    }


def data_model_input(w):
    block = config["data"][w.data]
    return [grid.model_dir(block["model"])] if block["source"] == "generate" else []


def cell_manifests(w):
    """The activation stores of the job's cell (wildcards model and data)."""
    return manifests(f"{w.model}_{w.data}")


def cell_sae_weights(w, names=None):
    """The SAEs of the job's (cell, layer): wildcards model, data, layer; every SAE unless named."""
    return [grid.sae_weights(f"{w.model}_{w.data}", w.layer, n) for n in (SAES if names is None else names)]


def base_sae_weights(w, names=None):
    """The base cell's SAEs of the job's layer: probes measure decoder cosines to them."""
    return [grid.sae_weights("M0_D0", w.layer, n) for n in (SAES if names is None else names)]


def pretrained_sae_source(w):
    return config["saes"][w.sae]["path"].format(model=w.model, data=w.data, layer=w.layer)


def sae_outputs():
    return [grid.sae_weights(cell, layer, name) for cell in CELLS for layer in config["layers"] for name in SAES]


def warm_start_dirs(w):
    """SAE name -> folder it starts from, for the configs that warm-start."""
    cell = grid.Cell(w.model, w.data)
    out = {}
    for name, block in config["saes"].items():
        if block["source"] != "train":
            continue
        source = grid.warm_start_source(config, cell, block["warm_start"])
        if source is not None:
            out[name] = grid.sae_dir(source, int(w.layer), name)
    return out


def warm_start_inputs(w):
    return [f"{folder}/sae_weights.safetensors" for folder in warm_start_dirs(w).values()]


def seed_pair_saes():
    """The trained SAE configs as calibration partners: no warm start, and another init seed when
    `diff.vary` asks for it (the data-order seed always changes, in seed_pair_training). With
    `vary: shuffle` each config also gets a partner from another init for the convergence check
    (grid.cross_init_sae_dir), trained in the same pass."""
    vary, offset = config["diff"]["vary"], config["diff"]["seed_offset"]
    out = {}
    for n in DIFF_SAES:
        block = {**config["saes"][n], "warm_start": "none"}
        out[n] = {**block, "seed": block["seed"] + (offset if vary == "init_and_shuffle" else 0)}
        if vary != "init_and_shuffle":
            out[Path(grid.cross_init_sae_dir(0, n, vary)).name] = {**block, "seed": block["seed"] + offset}
    return out


def seed_pair_outputs(layer):
    """The calibration partners and the cross-init partners of one layer (the same folders when vary
    is init_and_shuffle)."""
    vary = config["diff"]["vary"]
    folders = [grid.seed_sae_weights(layer, n) for n in DIFF_SAES]
    folders += [f"{grid.cross_init_sae_dir(layer, n, vary)}/sae_weights.safetensors" for n in DIFF_SAES]
    return list(dict.fromkeys(folders))


def null_saes(w):
    """The diffed SAE configs as the null trains them: the cells' settings and init seed; a config
    that warm-starts starts both halves from the base cell's SAE (as the first step's cell does)."""
    return {n: config["saes"][n] for n in DIFF_SAES}


def null_warm_start(w):
    return {n: grid.sae_dir("M0_D0", int(w.layer), n) for n in DIFF_SAES if config["saes"][n]["warm_start"] != "none"}


THRESHOLDS_FROM_RESAMPLING = config["diff"]["thresholds_from"] == "resampling"


def null_cosines(layer):
    """The null pairs' matched cosines per diffed config (the thresholds' null when they come from resampling)."""
    return [grid.null_cosines(layer, n) for n in DIFF_SAES]


def null_sae_outputs(layer):
    """Every null pair's SAEs of one layer, and the record of the prompt splits behind them."""
    from sae_diff import nulls

    pairs = config["diff"]["resampling"]["pairs"]
    saes = [grid.null_sae_weights(layer, k, side, n) for k in range(pairs) for side in "ab" for n in DIFF_SAES]
    return saes + [str(nulls.splits_json(grid.null_dir(layer)))]


def seed_pair_training():
    return {**config["training"], "seed": config["training"]["seed"] + config["diff"]["seed_offset"]}


def pair_inputs(w):
    """A diff's two cells (wildcards a and b) at one layer: SAEs, calibration, and each cell's
    activations and samples (the presence test reads their eval splits, on disk whatever
    activations.cache says)."""
    files = {
        "saes": [grid.sae_weights(cell, w.layer, n) for cell in (w.a, w.b) for n in DIFF_SAES],
        "calibration": [grid.calibration_json(w.layer, n) for n in DIFF_SAES],
    }
    for side in ("a", "b"):
        cell = grid.Cell.parse(getattr(w, side))
        files[f"{side}_acts"] = manifests(cell.name)
        files[f"{side}_samples"] = grid.samples(cell.data)
    return files


def pair_args(w):
    """pair_inputs's cells as diff's --a-... / --b-... arguments."""
    args = []
    for side in ("a", "b"):
        cell = grid.Cell.parse(getattr(w, side))
        args += [f"--{side}-acts", grid.activations_dir(cell.name), f"--{side}-samples", grid.samples(cell.data)]
    return shlex.join(args)


def same_token_inputs(w):
    """Iteration i's same-token pair at one layer (wildcards i, layer): both cells' resid_post stores,
    both models (logit lens of each model's decoder; streamed activations) and the samples both ran on."""
    site = grid.site_dir(int(w.layer), "resid_post")
    return {
        "base_acts": grid.manifest(f"M0_D{w.i}", site),
        "tuned_acts": grid.manifest(f"M{w.i}_D{w.i}", site),
        "base_model": grid.model_dir("M0"),
        "tuned_model": grid.model_dir(f"M{w.i}"),
        "samples": grid.samples(f"D{w.i}"),
    }


def intervention_comparison_input(method, files):
    """An input function: the same-token ``method``'s ``files(pair, layer)`` for the run's cell's
    iteration at its layer, when the method ran there (cells on D0 have no iteration to diff;
    interventions.baselines.<method> turns the comparison off)."""

    def inputs(w):
        i = int(w.cell.split("_D")[1])
        wanted = config["interventions"]["baselines"].get(method, True)
        if i == 0 or not wanted or method not in DIFFING_METHODS or int(w.layer) not in DIFFING_LAYERS:
            return []
        if f"M{i}" not in MODELS:
            return []
        return files(grid.same_token_pair(i), w.layer)

    return inputs


# the lens's directions file; the crosscoder's weights and latents table
intervention_adl_input = intervention_comparison_input("adl", lambda pair, layer: grid.adl_files(pair, layer)[0])
intervention_crosscoder_input = intervention_comparison_input(
    "crosscoder", lambda pair, layer: grid.crosscoder_files(pair, layer)[:2]
)
# the diff-SAE (its weights and feature stats, written with metrics.json) and its latents behind the metric
intervention_diff_sae_input = intervention_comparison_input(
    "diff_sae", lambda pair, layer: [grid.diff_sae_metrics(pair, layer), grid.diff_sae_metric_latents(pair, layer)]
)


def diffing_record_inputs(w):
    """The outputs of every same-token method of iteration i at one layer (wildcards i, layer)."""
    pair = grid.same_token_pair(w.i)
    files = {}
    if "crosscoder" in DIFFING_METHODS:
        files["crosscoder"] = grid.crosscoder_files(pair, w.layer)[1:]
    if "diff_sae" in DIFFING_METHODS:
        files["diff_sae"] = [grid.diff_sae_latents(pair, w.layer), grid.diff_sae_metrics(pair, w.layer)]
        if PROBE_METRICS:
            files["metric_latents"] = grid.diff_sae_metric_latents(pair, w.layer)
    if "adl" in DIFFING_METHODS:
        files["adl"] = grid.adl_files(pair, w.layer)
    if "kl" in DIFFING_METHODS:
        files["kl"] = grid.kl_files(pair)
        if {"crosscoder", "diff_sae", "adl"} & set(DIFFING_METHODS):
            files["kl_recovery"] = grid.kl_recovery(pair, w.layer)
    return files


def diffing_training():
    """The training block for the same-token dictionaries (crosscoders, diff-SAEs): the training
    block with diffing.training's keys laid over it."""
    return {**config["training"], **config["diffing"]["training"]}


def crosscoder_spec(w):
    return spec(
        crosscoder=config["diffing"]["crosscoder"],
        training=diffing_training(),
        features=config["features"],
        **placement(),
    )


def method_folder_args(input, methods):
    """--<method> <folder> for each method listed as input, the folder holding its files."""
    return " ".join(
        f"--{method.replace('_', '-')} {shlex.quote(os.path.dirname(input[method][0]))}"
        for method in methods
        if method in input.keys()
    )


def kl_recovery_inputs(w):
    """Both models, the data, and the directions of every method that has them (wildcards i, layer)."""
    files = {k: v for k, v in diffing_record_inputs(w).items() if k in ("crosscoder", "diff_sae", "adl")}
    return {
        **files,
        "base_model": grid.model_dir("M0"),
        "tuned_model": grid.model_dir(f"M{w.i}"),
        "samples": grid.samples(f"D{w.i}"),
    }


def diffing_figure_inputs(w):
    """The record and each method's table the diffing figure reads (wildcards i, layer)."""
    pair = grid.same_token_pair(w.i)
    files = {"record": grid.diffing_record(pair, w.layer)}
    if "crosscoder" in DIFFING_METHODS:
        files["crosscoder"] = grid.crosscoder_files(pair, w.layer)[1]  # latents.parquet
    if "diff_sae" in DIFFING_METHODS:
        files["diff_sae"] = grid.diff_sae_latents(pair, w.layer)
    if "kl" in DIFFING_METHODS:
        files["kl"] = grid.kl_files(pair)[0]  # tokens.parquet
    return files


def diffing_targets():
    """The same-token records, one per iteration and layer (each lists its methods' files), and the
    all-iterations crosscoder's, one per layer."""
    records = [
        grid.diffing_record(grid.same_token_pair(tuned.data[1:]), layer)
        for _, tuned in grid.same_token_pairs(config)
        for layer in grid.diffing_layers(config)
        if DIFFING_METHODS
    ]
    if ALL_ITERATIONS:
        records += [grid.diffing_record(grid.all_iterations_name(config), layer) for layer in DIFFING_LAYERS]
    return records


def layer_diff_jsons(w):
    """Every diff of the job's layer (both branches' steps and the intra pairs)."""
    return [grid.diff_json(a, b, w.layer, n) for a, b, _ in grid.diff_pairs(config) for n in DIFF_SAES]


def evolution_inputs(w):
    """What the evolution of one layer reads: its diffs, and the SAEs, statistics and calibration behind them."""
    return {
        "diffs": layer_diff_jsons(w),
        "calibration": [grid.calibration_json(w.layer, n) for n in DIFF_SAES],
        "saes": [grid.sae_weights(c, w.layer, n) for c in CELLS for n in DIFF_SAES],
        "stats": [grid.feature_stats(c, w.layer, n) for c in CELLS for n in DIFF_SAES],
        "nulls": [grid.null_json(w.layer, n) for n in DIFF_SAES],
    }


def probe_inputs(w):
    """A (cell, layer)'s probes: its SAEs and their pooled statistics, the base cell's SAEs, the
    activation stores (raw baseline), the scored samples, the model when nothing is cached, and
    the prompt split when causal tests run (probes fit on the feature-selection prompts only)."""
    cell = f"{w.model}_{w.data}"
    return {
        "saes": cell_sae_weights(w),
        "stats": [grid.feature_stats(cell, w.layer, n) for n in SAES],
        "base": base_sae_weights(w),
        "acts": cell_manifests(w),
        "samples": grid.samples(w.data),
        **({} if config["activations"]["cache"] else {"model": grid.model_dir(w.model)}),
        **({"split": grid.prompt_split()} if INTERVENTION_RUNS else {}),
    }


def prompt_files(w):
    """The prompt files the prompt split reads: the data's and the interventions' (one when they are one)."""
    sources = grid.split_sources(config)
    files = [sources["interventions"][0]] + ([sources["data"][0]] if sources["data"] else [])
    return sorted(set(files))


def prompt_split_arg(w, input):
    """``--prompt-split FILE`` when the job reads the prompt split (causal tests run), else nothing."""
    return f"--prompt-split {shlex.quote(str(input.split))}" if "split" in input.keys() else ""


def layer_probe_jsons(w):
    return [grid.probe_json(c, w.layer, n, m) for c in CELLS for n in SAES for m in PROBE_METRICS]


def cell_model(w):
    """The model of the job's cell (wildcard cell, e.g. M2_D2)."""
    return grid.model_dir(grid.Cell.parse(w.cell).model)


def cell_samples(w):
    """The scored samples of the job's cell (wildcard cell)."""
    return grid.samples(grid.Cell.parse(w.cell).data)


def figure_spec(kind):
    """A figure rule's params: its own `figures.<kind>` block only."""
    return lambda w: spec(figure=config["figures"][kind])


def branch_steps(branch):
    chain = grid.branch_cells(config, branch)
    return list(zip(chain, chain[1:]))


def branch_diff_jsons(w):
    return [grid.diff_json(a, b, w.layer, w.sae) for a, b in branch_steps(w.branch)]


def layer_panels(w, input):
    """One panel per layer: the folder of that layer's feature statistics."""
    return input_args((f"layer{layer}", Path(path).parent) for layer, path in zip(config["layers"], input))


def step_panels(w, input):
    """One panel per step of the branch: the step's diff table (beside its summary)."""
    steps = zip(branch_steps(w.branch), input.diffs)
    return input_args((f"{a.name}→{b.name}", Path(path).with_suffix(".parquet")) for (a, b), path in steps)


def figure_targets():
    """Every figure file of the run, by kind (the summary lists them; the report shows them)."""
    features, layers = config["features"], config["layers"]
    per_sae = [dict(cell=c, layer=l, sae=n) for c in CELLS for l in layers for n in SAES]
    out = {"iterations": [grid.figure("iterations")]}
    out["training"] = [grid.figure("training", **ids) for ids in per_sae if ids["sae"] in TRAINED_SAES]
    for kind in ("density", "loss_by_position", "statistics", "embeddings") + (
        ("bias",) if features.get("bias") else ()
    ):
        out[kind] = [grid.figure(kind, **ids) for ids in per_sae]
    out["coactivation"] = [
        grid.figure(kind, column=col, **ids)
        for ids in per_sae
        for col in features["coactivation_columns"]
        for kind in ("coactivation", "coactivation_top")
    ]
    if len(layers) > 1:
        out["coactivation_layers"] = [
            grid.figure("coactivation_layers", cell=c, sae=n, column=col)
            for c in CELLS
            for n in SAES
            for col in features["coactivation_columns"]
        ]
    out["evolution"] = [grid.figure("evolution", layer=l, sae=n) for l in layers for n in DIFF_SAES]
    if PROBE_METRICS:
        out["probe_auroc"] = [
            grid.figure("probe_auroc", layer=l, sae=n, metric=m) for l in layers for n in SAES for m in PROBE_METRICS
        ]
        out["probe_importance"] = [
            grid.figure("probe_importance", metric=m, **ids) for ids in per_sae for m in PROBE_METRICS
        ]
        out["probe_overlap"] = [
            grid.figure("probe_overlap", layer=l, sae=n, metric=m)
            for l in layers
            for n in DIFF_SAES
            for m in PROBE_METRICS
        ]
    out["diffing"] = [
        grid.figure("diffing", pair=grid.same_token_pair(tuned.data[1:]), layer=layer)
        for _, tuned in grid.same_token_pairs(config)
        for layer in DIFFING_LAYERS
        if DIFFING_METHODS
    ]
    out["dose_response"] = [
        grid.figure("dose_response", experiment=r.experiment, cell=r.cell, layer=r.layer, sae=r.sae, metric=r.metric)
        for r in INTERVENTION_RUNS
    ]
    out["similarity"] = [
        grid.figure("similarity", layer=l, sae=n, branch=b)
        for l in layers
        for n in DIFF_SAES
        for b in config["grid"]["branches"]
        if branch_steps(b)
    ]
    return out


def dashboard_sae_inputs(w):
    """What one SAE's dashboard document reads (wildcards model, data, layer, sae): its features;
    the lineage tables of the branches its cell is on, with the other cells' features for their
    examples; its probes, attribution and causal tests where the run has them."""
    cell, layer, name = f"{w.model}_{w.data}", int(w.layer), w.sae
    files = {"features": grid.feature_stats(cell, layer, name)}
    if name in DIFF_SAES:
        branches = [b for b in config["grid"]["branches"] if cell in [c.name for c in grid.branch_cells(config, b)]]
        files["lineages"] = [grid.evolution_lineages(layer, name, b) for b in branches]
        chain = {c.name for b in branches for c in grid.branch_cells(config, b)} - {cell}
        files["cell_features"] = [grid.feature_stats(c, layer, name) for c in sorted(chain)]
    files["probes"] = [grid.probe_json(cell, layer, name, metric) for metric in PROBE_METRICS]
    runs = [r for r in INTERVENTION_RUNS if (r.cell.name, r.layer, r.sae) == (cell, layer, name)]
    files["interventions"] = [f"{r.out_dir}/effects.json" for r in runs]
    files["attribution"] = list(
        dict.fromkeys(
            grid.attribution_table(cell, layer, name, r.metric)
            for r in runs
            if selected_by(r.experiment) == "attribution"
        )
    )
    pair = next((p for p in same_token_pair_names() if cell in p.split("__")), None)
    if pair and layer in DIFFING_LAYERS and {"crosscoder", "diff_sae"} & set(DIFFING_METHODS):
        files["sae"] = grid.sae_weights(cell, layer, name)
        if "crosscoder" in DIFFING_METHODS:
            files["crosscoder"] = grid.crosscoder_files(pair, layer)
        if "diff_sae" in DIFFING_METHODS:
            files["diff_sae"] = grid.diff_sae_latents(pair, layer)
    return files


def same_token_pair_names():
    return [grid.pair_name(base, tuned) for base, tuned in grid.same_token_pairs(config)]


def dashboard_figure_links(w):
    """The figures an SAE's pages link to, relative to the page: those of its cell, layer and SAE,
    and its layer's cross-cell figures (evolution, probe comparison). Links, not inputs: a
    figure's restyle does not rebuild the dashboard (the run that builds the page builds them)."""
    cell, mark = f"{w.model}_{w.data}", f"layer{w.layer}/{w.sae}"
    paths = [p for kind in figure_targets().values() for p in kind]
    chosen = [p for p in paths if mark in p and (cell in p or not re.search(r"M\d+_D\d+", p))]
    return [os.path.relpath(p, grid.dashboard_dir()) for p in chosen]


def dashboard_named_args(input):
    """The dashboard-sae verb's NAME=PATH arguments from its rule's inputs."""
    args = []
    for path in input.get("cell_features", []):
        args += ["--cell-features", f"{grid.cell_layer_name(path)[0]}={os.path.dirname(path)}"]
    for path in input.get("lineages", []):
        args += ["--lineages", f"{Path(path).stem.rsplit('_', 1)[1]}={path}"]
    for key in ("probes", "attribution"):
        for path in input.get(key, []):
            args += [f"--{key}", f"{Path(path).stem}={path}"]
    for path in input.get("interventions", []):
        args += ["--interventions", path]
    if "sae" in input.keys():
        args += ["--sae-dir", os.path.dirname(input.sae)]
    if "crosscoder" in input.keys():
        args += ["--crosscoder", os.path.dirname(input.crosscoder[1])]  # latents.parquet's folder
    if "diff_sae" in input.keys():
        args += ["--diff-sae", os.path.dirname(input.diff_sae)]
    return " ".join(shlex.quote(a) for a in args)


def dashboard_targets():
    """Every SAE's dashboard document (empty when the dashboard is off)."""
    if not config["dashboard"]["enabled"]:
        return []
    return [grid.dashboard_data(c, layer, name) for c in CELLS for layer in config["layers"] for name in SAES]


def intervention_run(w):
    """The configured run behind these wildcards (its generating model)."""
    for run in INTERVENTION_RUNS:
        if (run.experiment, run.cell.name, str(run.layer), run.sae, run.metric) == (
            w.experiment,
            w.cell,
            w.layer,
            w.sae,
            w.metric,
        ):
            return run
    raise ValueError(f"no configured intervention {w.experiment} {w.cell} layer{w.layer} {w.sae} {w.metric}")


def selected_by(experiment):
    """probe or attribution: how this experiment picks its features."""
    from sae_diff.experiments import selection_method

    return selection_method(config["interventions"], experiment)


def intervention_model(w):
    """The model that generates: the iteration's for ablation, the base model for steering."""
    return grid.model_dir(intervention_run(w).model)


def attribution_input(w):
    """The fork attribution table, for experiments that pick their features by attribution."""
    if selected_by(w.experiment) != "attribution":
        return []
    return [grid.attribution_table(w.cell, w.layer, w.sae, w.metric)]


def intervention_spec(w):
    run = intervention_run(w)
    path, wheres = grid.intervention_prompts(config)
    return spec(
        interventions=config["interventions"],
        scorers=config["scorers"],
        prompts=path,
        wheres=wheres,
        separate=grid.split_sources(config)["separate"],
        direction=grid.metric_direction(config, run.metric),
        metrics=METRIC_NAMES,
        hook_point=config["saes"][run.sae].get("hook_point", "resid_post"),
        **placement(),
    )


def summary_inputs(w):
    per_sae = [(cell, layer, name) for cell in CELLS for layer in config["layers"] for name in SAES]
    return {
        "models": [grid.model_dir(m) for m in MODELS],
        "samples": [grid.samples(d) for d in DATA],
        "iterations": grid.iterations_json(),
        "features": [grid.feature_stats(*ids) for ids in per_sae],
        "evolution": [grid.evolution_json(layer, name) for layer in config["layers"] for name in DIFF_SAES],
        "probes": [grid.probe_json(*ids, metric) for ids in per_sae for metric in PROBE_METRICS],
        "probe_comparisons": [grid.probe_comparison(layer) for layer in config["layers"]] if PROBE_METRICS else [],
        "interventions": [f"{run.out_dir}/effects.json" for run in INTERVENTION_RUNS],
        "figures": [path for paths in figure_targets().values() for path in paths],
        "manifests": [m for cell in CELLS for m in manifests(cell.name)],
        "saes": sae_outputs(),
        "evals": [grid.eval_json(*ids) for ids in per_sae],
        "diffing": diffing_targets(),
    }


BENCHMARKS = (
    [bench("prepare_model", m) for m in PREPARED_MODELS]
    + [bench("finetune_dpo", m) for m in DPO_MODELS]
    + [bench("make_data", d) for d in DATA]
    + [bench("score_data", d) for d in DATA]
    + [bench("extract_activations", c.name) for c in CELLS]
    + (
        [bench("train_sae", f"{c.name}_layer{layer}") for c in CELLS for layer in config["layers"]]
        if TRAINED_SAES
        else []
    )
    + ([bench("evaluate_saes", f"{c.name}_layer{layer}") for c in CELLS for layer in config["layers"]] if SAES else [])
    + ([bench("feature_stats", f"{c.name}_layer{layer}") for c in CELLS for layer in config["layers"]] if SAES else [])
    + [bench("train_seed_sae", f"layer{layer}") for layer in config["layers"] if DIFF_SAES]
    + [
        bench(rule, f"layer{layer}")
        for rule in ("train_null_saes", "null_diffs")
        for layer in config["layers"]
        if DIFF_SAES
    ]
    + (
        [bench("probes", f"{c.name}_layer{layer}") for c in CELLS for layer in config["layers"]]
        if SAES and PROBE_METRICS
        else []
    )
    + [bench("intervene", f"{r.experiment}_{r.cell.name}_layer{r.layer}_{r.sae}_{r.metric}") for r in INTERVENTION_RUNS]
    + list(
        dict.fromkeys(  # one attribution per (cell, layer, SAE, metric), shared by the experiments that use it
            bench("attribute", f"{r.cell.name}_layer{r.layer}_{r.sae}_{r.metric}")
            for r in INTERVENTION_RUNS
            if selected_by(r.experiment) == "attribution"
        )
    )
    + [
        bench("diff_saes", f"{grid.pair_name(a, b)}_layer{layer}")
        for a, b, _ in grid.diff_pairs(config)
        for layer in config["layers"]
        if DIFF_SAES
    ]
    + [bench("crosscoder", f"all_layer{layer}") for layer in DIFFING_LAYERS if ALL_ITERATIONS]
    + [
        bench(rule, f"{tuned.model}_layer{layer}" if per_layer else tuned.model)
        for _, tuned in grid.same_token_pairs(config)
        for rule, method, per_layer in DIFFING_BENCHMARKS
        for layer in (DIFFING_LAYERS if per_layer else [None])
        if method in DIFFING_METHODS and (rule != "kl_recovery" or set(DIFFING_METHODS) - {"kl"})
    ]
)
