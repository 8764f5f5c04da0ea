"""Config validation: defaults, identical behaviour to snakemake.utils.validate, one-line errors."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import yaml

from sae_diff import config as cfglib
from sae_diff import grid
from sae_diff.config import ConfigError
from sae_diff.grid import Cell


def _load(cfg: dict, tmp_path, root):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfglib.load(path, base_dirs=[root])


def test_test_config_is_valid_and_defaults_filled(test_config, tmp_path, root):
    cfg = _load(test_config, tmp_path, root)
    assert cfg["activations"]["exclude_first_position"] is True
    assert cfg["grid"]["branches"] == ["MXDX", "M0DX"]
    assert cfg["data"]["D0"]["sampling"]["temperature"] == 1.0  # nested default under a $ref
    assert cfg["models"]["M0"]["trust_remote_code"] is False
    assert cfg["data"]["D0"]["model"] == "M0" and cfg["data"]["D1"]["model"] == "M1"


def test_same_defaults_as_snakemake_validate(test_config):
    from snakemake.utils import validate as snakemake_validate

    ours = cfglib.validate(copy.deepcopy(test_config))
    theirs = copy.deepcopy(test_config)
    snakemake_validate(theirs, str(cfglib.SCHEMA_PATH))
    assert ours == theirs


def test_grid_branches(test_config, tmp_path, root):
    cfg = _load(test_config, tmp_path, root)
    assert [c.name for c in grid.branch_cells(cfg, "MXDX")] == ["M0_D0", "M1_D1"]
    assert [c.name for c in grid.branch_cells(cfg, "M0DX")] == ["M0_D0", "M0_D1"]
    assert [c.name for c in grid.cells(cfg)] == ["M0_D0", "M0_D1", "M1_D1"]
    cfg["grid"]["branches"] = ["MXDX"]
    assert [c.name for c in grid.cells(cfg)] == ["M0_D0", "M1_D1"]
    assert Cell.parse("M3_D2") == Cell("M3", "D2")


def _set(cfg, dotted, value):
    keys = dotted.split(".")
    for key in keys[:-1]:
        cfg = cfg[int(key)] if isinstance(cfg, list) else cfg[key]
    cfg[keys[-1]] = value


def _delete(cfg, dotted):
    keys = dotted.split(".")
    for key in keys[:-1]:
        cfg = cfg[key]
    del cfg[keys[-1]]


def _explicit(cfg):
    """The test config with M1, D0 and D1 written out instead of made by the iterations block."""
    it = cfg.pop("iterations")
    cfg["models"]["M1"] = dict(cfg["models"]["M0"], seed=1, init_from="M0")
    cfg["data"] = {
        f"D{i}": {"source": "generate", "prompts": it["prompts"], "sampling": dict(it["sampling"], seed=i)}
        for i in range(2)
    }
    return cfg


# (description, mutation, substrings the one-line error must contain)
BAD = [
    ("unknown top-level key", lambda c: _set(c, "layerz", [1]), ["layerz", "unknown key"]),
    (
        "unknown nested key",
        lambda c: _set(c, "activations.batchsize", 4),
        ["activations.batchsize", "unknown key", "batch_size"],
    ),
    ("unknown model key", lambda c: _set(c, "models.M0.package", "x"), ["models.M0.package", "unknown key"]),
    (
        "wrong type",
        lambda c: _set(c, "activations.batch_size", "eight"),
        ["activations.batch_size", '"eight"', "integer"],
    ),
    ("out of range", lambda c: _set(c, "split.eval_fraction", 1.5), ["split.eval_fraction", "1.5", "<= 0.9"]),
    ("bad enum", lambda c: _set(c, "models.M0.source", "s3"), ["models.M0.source", '"s3"', "gguf_package"]),
    ("bad dtype", lambda c: _set(c, "activations.dtype", "int8"), ["activations.dtype", '"int8"', "float16"]),
    (
        "unknown scorer",
        lambda c: _set(c, "scorers", [{"name": "toxicity"}]),
        ["scorers[0].name", '"toxicity"', "gender_pronouns"],
    ),
    (
        "unknown hook point",
        lambda c: _set(c, "hook_points", ["resid_pre"]),
        ["hook_points[0]", '"resid_pre"', "resid_post"],
    ),
    ("negative layer", lambda c: _set(c, "layers", [-1]), ["layers[0]", "-1", ">= 0"]),
    ("layer beyond depth", lambda c: _set(c, "layers", [0, 3]), ["layers[1] = 3", "below 3", "M0"]),
    (
        "missing prompts file",
        lambda c: _set(_explicit(c), "data.D0.prompts", "resources/prompts/nope.txt"),
        ["data.D0.prompts", "nope.txt", "existing file"],
    ),
    (
        "missing table file",
        lambda c: _set(_explicit(c), "data.D1", {"source": "table", "path": "no/such.csv"}),
        ["data.D1.path", "no/such.csv", "existing file"],
    ),
    ("missing required key", lambda c: _delete(c, "layers"), ["missing required key 'layers'"]),
    (
        "bad model id",
        lambda c: _set(c, "models", {"base": c["models"]["M0"]}),
        ["models.base: key not allowed", "^M[0-9]+$"],
    ),
    ("data count differs", lambda c: _delete(_explicit(c), "data.D1"), ["data", "one data set per model"]),
    (
        "missing reference FASTA",
        lambda c: _set(c, "scorers", [{"name": "protein_identity", "reference": "x.fasta"}]),
        ["scorers[0].reference", "x.fasta"],
    ),
    (
        "missing command program",
        lambda c: _set(
            c,
            "scorers",
            [{"name": "command", "command": "no-such-folding-tool {input} {output}", "metrics": ["plddt"]}],
        ),
        ["scorers[0].command", "no-such-folding-tool", "not found"],
    ),
    (
        "scorer option of another scorer",
        lambda c: _set(c, "scorers", [{"name": "length", "reference": "x"}]),
        ["scorers[0].reference", "unknown key"],
    ),
    (
        "init_from a later model",
        lambda c: _set(_explicit(c), "models.M0.init_from", "M1"),
        ["models.M0.init_from", "earlier model"],
    ),
    (
        "non-divisible heads",
        lambda c: _set(c, "models.M0.d_model", 30),
        ["models.M0.d_model = 30", "multiple of n_heads"],
    ),
    (
        "sae site not extracted",
        lambda c: _set(c, "saes", {"a": {"architecture": "topk", "hook_point": "attn_out"}}),
        ["saes.a.hook_point = 'attn_out'", "extracted hook_points"],
    ),
    (
        "sae without architecture",
        lambda c: _set(c, "saes", {"a": {"lr": 0.1}}),
        ["saes.a", "missing required key 'architecture'"],
    ),
    (
        "unknown sae architecture",
        lambda c: _set(c, "saes", {"a": {"architecture": "gated"}}),
        ["saes.a.architecture", '"gated"', "jumprelu"],
    ),
    (
        "pretrained SAE file missing",
        lambda c: _set(c, "saes", {"p": {"source": "pretrained", "path": "nowhere/{model}/layer{layer}"}}),
        ["saes.p.path", "nowhere/M0/layer1", "existing file"],
    ),
    (
        "bad matryoshka fractions",
        lambda c: _set(c, "saes", {"m": {"architecture": "matryoshka", "matryoshka_fractions": [0.5, 0.25]}}),
        ["saes.m.matryoshka_fractions", "ending at 1.0"],
    ),
    ("top level not a mapping", None, ["expected a mapping"]),
]


@pytest.mark.parametrize("name,mutate,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_fails_with_one_clear_line(name, mutate, expected, test_config, tmp_path, root):
    if mutate is None:
        path = tmp_path / "c.yaml"
        path.write_text("- just\n- a list\n")
        with pytest.raises(ConfigError) as info:
            cfglib.load(path)
    else:
        mutate(test_config)
        with pytest.raises(ConfigError) as info:
            _load(test_config, tmp_path, root)
    message = str(info.value)
    assert "\n" not in message, message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_snakemake_stops_before_any_job_with_one_line(test_config, tmp_path, root):
    """The same check at workflow parse time: exit status 1, the error line, no job planned."""
    test_config["activations"]["batch_size"] = "eight"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(test_config))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-s",
            str(root / "Snakefile"),
            "--configfile",
            str(path),
            "-d",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert proc.returncode != 0
    assert 'config error: activations.batch_size = "eight": expected a value of type integer' in proc.stderr
    assert "Job stats" not in proc.stdout + proc.stderr


def test_pretrained_path_template_is_resolved_for_every_cell(test_config, tmp_path, root):
    for cell in ("M0_D0", "M0_D1", "M1_D1"):
        (tmp_path / "mine" / cell / "layer1").mkdir(parents=True)
    test_config["saes"] = {"p": {"source": "pretrained", "path": "mine/{model}_{data}/layer{layer}"}}
    test_config["interventions"]["saes"] = ["p"]  # the interventions' SAEs must be configured ones
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(test_config))
    cfg = cfglib.load(path, base_dirs=[tmp_path, root])
    assert cfg["saes"]["p"]["path"] == str(tmp_path / "mine" / "{model}_{data}" / "layer{layer}")
    (tmp_path / "mine" / "M1_D1" / "layer1").rmdir()  # one cell missing: named in the error
    with pytest.raises(ConfigError, match=r"saes.p.path \(M1_D1, layer 1\)"):
        cfglib.load(path, base_dirs=[tmp_path, root])


def test_intervention_runs_follow_the_seed_design(test_config, tmp_path, root):
    """Ablation in the iteration's model, steering in M0, one run per branch cell; subsets and
    unknown names are checked."""
    cfg = _load(test_config, tmp_path, root)
    runs = {(r.experiment, r.cell.name, r.model) for r in grid.intervention_runs(cfg)}
    assert runs == {
        ("ablation", "M1_D1", "M1"),
        ("ablation", "M0_D1", "M1"),
        ("steering", "M1_D1", "M0"),
        ("steering", "M0_D1", "M0"),
    }
    run = grid.intervention_runs(cfg)[0]
    assert run.out_dir == f"results/interventions/{run.experiment}/{run.cell.name}/layer1/topk/n_chars"
    assert grid.metric_direction(cfg, "n_chars") == "up" and grid.metric_direction(cfg, "female_ratio") == "up"
    for key, value, message in [
        ("metrics", ["female_ratio"], "not probed"),
        ("layers", [7], "not among layers"),
        ("iterations", [3], "have no data"),
        ("saes", ["nope"], "not configured SAEs"),
    ]:
        bad = copy.deepcopy(cfg)
        bad["interventions"][key] = value
        with pytest.raises(ConfigError, match=f"interventions.{key}.*{message}"):
            grid.intervention_runs(bad)
    off = copy.deepcopy(cfg)
    off["interventions"]["enabled"] = False
    assert grid.intervention_runs(off) == []


def test_snakefile_parses_without_importing_torch(tmp_path, root):
    """Every local run and every SLURM job step parses the Snakefile: it must stay light (the
    intervention grid reads sae_diff.experiments, not the torch-importing interventions module)."""
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "snakemake",
            "-n",
            "-s",
            str(root / "Snakefile"),
            "-d",
            str(tmp_path),
            "--configfile",
            str(root / "config" / "test.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert {"sae_diff.config", "sae_diff.grid"} <= imported
    assert "torch" not in imported and "transformers" not in imported


def test_every_module_imports_first_without_a_circle(root):
    """Each sae_diff module imported first, in a fresh package state (a circle fails only when its
    import starts at the right module), in one interpreter to stay quick."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import sae_diff, sae_diff.sae
        names = [m.name for m in pkgutil.walk_packages(sae_diff.__path__, "sae_diff.")
                 if not m.name.endswith("__main__")]
        failed = []
        for name in names:
            for loaded in [m for m in sys.modules if m == "sae_diff" or m.startswith("sae_diff.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as error:
                failed.append(f"{name}: {type(error).__name__}: {error}")
        print(len(names))
        print("\\n".join(failed))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    count, *failed = result.stdout.strip().splitlines()
    assert int(count) > 25 and not [f for f in failed if f], failed
