# Config validation, the grid of cells, and the target lists every other rule file uses.
import json
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # parse-time helpers, even before install
from sae_diff import config as cfglib  # noqa: E402

try:
    # our validator first: it stops with one line naming the key, the value and what was expected
    cfglib.validate(config)
    validate(config, "../../src/sae_diff/schemas/config.schema.yaml")  # the same schema and defaults
    cfglib.check(config, [Path.cwd(), Path(workflow.basedir)])
except cfglib.ConfigError as error:
    sys.exit(str(error))

MODELS = cfglib.model_ids(config)
DATA = cfglib.data_ids(config)
CELLS = cfglib.cells(config)
SITES = [cfglib.site_dir(layer, hook) for layer, hook in cfglib.sites(config)]
SAES = list(config["saes"])
TRAINED_SAES = [n for n, s in config["saes"].items() if s["source"] == "train"]
PRETRAINED_SAES = [n for n, s in config["saes"].items() if s["source"] == "pretrained"]


wildcard_constraints:
    model=r"M\d+",
    data=r"D\d+",
    layer=r"\d+",


def spec(**parts):
    """The part of the config a job depends on, as JSON: its params change exactly when it must rerun.

    Rules call it inside a lambda: Snakemake would otherwise expand {...} in string params
    (a pretrained SAE's path template) as wildcards.
    """
    return json.dumps(parts, sort_keys=True)


def bench(rule_name, pattern):
    return f"results/benchmarks/{rule_name}/{pattern}.tsv"


def manifests(cell_name):
    return [f"results/activations/{cell_name}/{site}/manifest.json" for site in SITES]


# ----- input functions of the rule files


def init_model_input(wildcards):
    source = config["models"][wildcards.model].get("init_from")
    return [f"results/models/{source}"] if source else []


def data_model_input(wildcards):
    spec_ = config["data"][wildcards.data]
    return [f"results/models/{spec_['model']}"] if spec_["source"] == "generate" else []


def sae_outputs():
    return [f"{cfglib.sae_dir(cell, layer, name)}/sae_weights.safetensors"
            for cell in CELLS for layer in config["layers"] for name in SAES]


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


def summary_inputs(wildcards):
    files = {
        "models": [f"results/models/{m}" for m in MODELS],
        "samples": [f"results/data/{d}/samples.parquet" for d in DATA],
        "manifests": [m for cell in CELLS for m in manifests(cell.name)],
        "saes": sae_outputs(),
        "evals": [f"results/eval/{cell.name}/layer{layer}/{name}.json"
                  for cell in CELLS for layer in config["layers"] for name in SAES],
    }
    return files


BENCHMARKS = (
    [bench("prepare_model", m) for m in MODELS]
    + [bench("make_data", d) for d in DATA]
    + [bench("score_data", d) for d in DATA]
    + [bench("extract_activations", c.name) for c in CELLS]
    + ([bench("train_sae", f"{c.name}_layer{layer}") for c in CELLS for layer in config["layers"]] if TRAINED_SAES else [])
    + ([bench("evaluate_saes", f"{c.name}_layer{layer}") for c in CELLS for layer in config["layers"]] if SAES else [])
)
