# Config validation, the grid of cells, and the target lists every other rule file uses.
import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # parse-time helpers, even before install
from sae_diff import config as cfglib  # noqa: E402
from sae_diff import scorers as scorerlib  # noqa: E402

try:
    # our validator first: it stops with one line naming the key, the value and what was expected
    cfglib.validate(config)
    validate(config, "../../src/sae_diff/schemas/config.schema.yaml")  # the same schema and defaults
    cfglib.check(config, [Path.cwd(), Path(workflow.basedir)])
    INTERVENTION_RUNS = cfglib.intervention_runs(config)
except cfglib.ConfigError as error:
    sys.exit(str(error))

MODELS = cfglib.model_ids(config)
DPO_MODELS = [m for m in MODELS if config["models"][m]["source"] == "dpo"]
PREPARED_MODELS = [m for m in MODELS if m not in DPO_MODELS]
DATA = cfglib.data_ids(config)
CELLS = cfglib.cells(config)
SITES = [cfglib.site_dir(layer, hook) for layer, hook in cfglib.sites(config)]
SAES = list(config["saes"])
TRAINED_SAES = [n for n, s in config["saes"].items() if s["source"] == "train"]
PRETRAINED_SAES = [n for n, s in config["saes"].items() if s["source"] == "pretrained"]
PROBE_METRICS = cfglib.probe_metrics(config)
METRIC_NAMES = scorerlib.metric_columns(config["scorers"], config["data"])


wildcard_constraints:
    # names joined by "_" in file names (e.g. {sae}_{metric}_auroc.png) must not swallow each other
    sae="|".join(map(re.escape, SAES)) or "(?!x)x",
    metric="|".join(map(re.escape, PROBE_METRICS)) or "(?!x)x",


# diffs need a seed-pair calibration, so only SAEs trained here are diffed
DIFF_SAES = TRAINED_SAES if config["diff"]["enabled"] else []


wildcard_constraints:
    model=r"M\d+",
    data=r"D\d+",
    layer=r"\d+",
    cell=r"M\d+_D\d+",
    branch=r"MXDX|M0DX",
    column=r"[A-Za-z0-9_]+",


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
    return {"stream_model": f"results/models/{model}", "stream_samples": f"results/data/{data}/samples.parquet"}


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
    return f"results/benchmarks/{rule_name}/{pattern}.tsv"


def manifests(cell_name):
    return [f"results/activations/{cell_name}/{site}/manifest.json" for site in SITES]


# ----- input functions of the rule files


def init_model_input(wildcards):
    source = config["models"][wildcards.model].get("init_from")
    return [f"results/models/{source}"] if source else []


def dpo_inputs(wildcards):
    model = config["models"][wildcards.model]
    return {
        "parent": f"results/models/{model['parent']}",
        "reference": f"results/models/{model['reference']}",
        "samples": f"results/data/{model['pairs_from']}/samples.parquet",
    }


def data_model_input(wildcards):
    spec_ = config["data"][wildcards.data]
    return [f"results/models/{spec_['model']}"] if spec_["source"] == "generate" else []


def sae_outputs():
    return [
        f"{cfglib.sae_dir(cell, layer, name)}/sae_weights.safetensors"
        for cell in CELLS
        for layer in config["layers"]
        for name in SAES
    ]


def warm_start_dirs(wildcards):
    """SAE name -> folder it starts from, for the configs that warm-start."""
    cell = cfglib.Cell(wildcards.model, wildcards.data)
    out = {}
    for name, block in config["saes"].items():
        if block["source"] != "train":
            continue
        source = cfglib.warm_start_source(config, cell, block["warm_start"])
        if source is not None:
            out[name] = cfglib.sae_dir(source, int(wildcards.layer), name)
    return out


def warm_start_inputs(wildcards):
    return [f"{folder}/sae_weights.safetensors" for folder in warm_start_dirs(wildcards).values()]


def seed_pair_saes():
    """The trained SAE configs as calibration partners: no warm start, and another init seed when
    `diff.vary` asks for it (the data-order seed always changes, in seed_pair_training)."""
    offset = config["diff"]["seed_offset"] if config["diff"]["vary"] == "init_and_shuffle" else 0
    return {
        n: {**config["saes"][n], "seed": config["saes"][n]["seed"] + offset, "warm_start": "none"} for n in DIFF_SAES
    }


def seed_pair_training():
    return {**config["training"], "seed": config["training"]["seed"] + config["diff"]["seed_offset"]}


def figure_spec(kind):
    """A figure rule's params: its own `figures.<kind>` block only."""
    return lambda w: spec(figure=config["figures"][kind])


def branch_steps(branch):
    chain = cfglib.branch_cells(config, branch)
    return list(zip(chain, chain[1:]))


def figure_targets():
    """Every figure file of the run, by kind (the summary lists them; the report shows them)."""
    features = config["features"]
    out = {"iterations": ["results/figures/iterations/target_metric.png"]}
    per_sae = [(cell.name, layer, name) for cell in CELLS for layer in config["layers"] for name in SAES]
    out["training"] = [
        f"results/figures/saes/{c}/layer{l}/{n}_training.png" for c, l, n in per_sae if n in TRAINED_SAES
    ]
    out["density"] = [f"results/figures/eval/{c}/layer{l}/{n}_density.png" for c, l, n in per_sae]
    out["loss_by_position"] = [f"results/figures/eval/{c}/layer{l}/{n}_loss_by_position.png" for c, l, n in per_sae]
    out["statistics"] = [f"results/figures/features/{c}/layer{l}/{n}/statistics.png" for c, l, n in per_sae]
    out["embeddings"] = [f"results/figures/features/{c}/layer{l}/{n}/embeddings.png" for c, l, n in per_sae]
    if features.get("bias"):
        out["bias"] = [f"results/figures/features/{c}/layer{l}/{n}/bias.png" for c, l, n in per_sae]
    out["coactivation"] = [
        f"results/figures/features/{c}/layer{l}/{n}/coactivation_{col}{suffix}.png"
        for c, l, n in per_sae
        for col in features["coactivation_columns"]
        for suffix in ("", "_top")
    ]
    if len(config["layers"]) > 1:
        out["coactivation_layers"] = [
            f"results/figures/features/{cell.name}/{n}_coactivation_{col}_layers.png"
            for cell in CELLS
            for n in SAES
            for col in features["coactivation_columns"]
        ]
    out["evolution"] = [
        f"results/figures/evolution/layer{l}/{n}_counts.png" for l in config["layers"] for n in DIFF_SAES
    ]
    if PROBE_METRICS:
        out["probe_auroc"] = [
            f"results/figures/probes/layer{l}/{n}_{m}_auroc.png"
            for l in config["layers"]
            for n in SAES
            for m in PROBE_METRICS
        ]
        out["probe_importance"] = [
            f"results/figures/probes/{c}/layer{l}/{n}_{m}_importance.png" for c, l, n in per_sae for m in PROBE_METRICS
        ]
        out["probe_overlap"] = [
            f"results/figures/probes/layer{l}/{n}_{m}_overlap.png"
            for l in config["layers"]
            for n in DIFF_SAES
            for m in PROBE_METRICS
        ]
    out["dose_response"] = [
        f"results/figures/interventions/{r.experiment}/{r.cell.name}/layer{r.layer}/" f"{r.sae}_{r.metric}.png"
        for r in INTERVENTION_RUNS
    ]
    out["similarity"] = [
        f"results/figures/evolution/layer{l}/{n}_similarity_{b}.png"
        for l in config["layers"]
        for n in DIFF_SAES
        for b in config["grid"]["branches"]
        if branch_steps(b)
    ]
    return out


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


def intervention_spec(w):
    run = intervention_run(w)
    path, wheres = cfglib.intervention_prompts(config)
    return spec(
        interventions=config["interventions"],
        scorers=config["scorers"],
        prompts=path,
        wheres=wheres,
        direction=cfglib.metric_direction(config, run.metric),
        metrics=METRIC_NAMES,
        hook_point=config["saes"][run.sae].get("hook_point", "resid_post"),
        **placement(),
    )


def summary_inputs(wildcards):
    files = {
        "models": [f"results/models/{m}" for m in MODELS],
        "samples": [f"results/data/{d}/samples.parquet" for d in DATA],
        "iterations": "results/iterations.json",
        "features": [
            f"results/features/{cell.name}/layer{layer}/{name}/stats.parquet"
            for cell in CELLS
            for layer in config["layers"]
            for name in SAES
        ],
        "evolution": [
            f"results/evolution/layer{layer}/{name}.json" for layer in config["layers"] for name in DIFF_SAES
        ],
        "probes": [
            f"results/probes/{cell.name}/layer{layer}/{name}/{metric}.json"
            for cell in CELLS
            for layer in config["layers"]
            for name in SAES
            for metric in PROBE_METRICS
        ],
        "probe_comparisons": (
            [f"results/probes/comparison_layer{layer}.json" for layer in config["layers"]] if PROBE_METRICS else []
        ),
        "interventions": [f"{run.out_dir}/effects.json" for run in INTERVENTION_RUNS],
        "figures": [path for paths in figure_targets().values() for path in paths],
        "manifests": [m for cell in CELLS for m in manifests(cell.name)],
        "saes": sae_outputs(),
        "evals": [
            f"results/eval/{cell.name}/layer{layer}/{name}.json"
            for cell in CELLS
            for layer in config["layers"]
            for name in SAES
        ],
    }
    return files


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
        bench("diff_saes", f"{cfglib.pair_name(a, b)}_layer{layer}")
        for a, b, _ in cfglib.diff_pairs(config)
        for layer in config["layers"]
        if DIFF_SAES
    ]
)
