"""Load, validate and resolve the workflow configuration.

The JSON schema in ``schemas/config.schema.yaml`` is the single source of truth: the
Snakefile validates with ``snakemake.utils.validate`` against the same file and this
module fills in the same defaults, so a config means the same thing in both places.
Every error is one line naming the key, the value and what was expected.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import yaml

from .errors import ConfigError  # noqa: F401  (re-exported: sae_diff.config.ConfigError)
from .grid import cells, intervention_prompts, intervention_runs

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"

HOOK_POINTS = ("resid_post", "mlp_in", "mlp_out", "attn_out")


# --------------------------------------------------------------------------- schema


def load_schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def defaults(section: str) -> dict:
    """The schema's default of every key of a top-level ``section`` that has one: what the
    workflow uses where a config is silent (library callers outside a config read them here)."""
    props = load_schema()["properties"][section]["properties"]
    return {key: copy.deepcopy(prop["default"]) for key, prop in props.items() if "default" in prop}


def _default_filling_validator(schema: dict):
    """A Draft 2020-12 validator that fills in defaults, as snakemake.utils.validate does."""
    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop:
                    # deepcopy: a shared default object would be filled in place later
                    instance.setdefault(name, copy.deepcopy(prop["default"]))
        yield from validate_properties(validator, properties, instance, subschema)

    cls = validators.extend(Draft202012Validator, {"properties": set_defaults})
    return cls(schema)


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<config>"


def _describe(error) -> str:
    """Turn a jsonschema error into 'key = value: expected ...'."""
    key = _key_path(error.absolute_path)
    value = error.instance
    schema = error.schema
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed)) if isinstance(value, dict) else []
        where = f"{key}." if key != "<config>" else ""
        return f"{where}{extra[0] if extra else '?'}: unknown key; expected one of: {', '.join(allowed)}"
    if kind == "required":
        missing = [r for r in error.validator_value if r not in (value or {})]
        return f"{key}: missing required key '{missing[0] if missing else '?'}'"
    if "propertyNames" in error.schema_path:
        return f"{key}.{value}: key not allowed; expected a key matching {error.validator_value!r}"
    shown = json.dumps(value) if not isinstance(value, (dict, list)) else _short(value)
    if kind == "enum":
        expected = "one of: " + ", ".join(map(str, error.validator_value))
    elif kind == "const":
        expected = f"{error.validator_value!r}"
    elif kind == "type":
        expected = f"a value of type {error.validator_value}"
    elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        expected = f"a number {op} {error.validator_value}"
    elif kind == "pattern":
        expected = f"a string matching {error.validator_value!r}"
    elif kind in ("minItems", "maxItems", "minProperties", "minLength"):
        expected = f"{kind} {error.validator_value}"
    elif kind == "uniqueItems":
        expected = "no repeated items"
    else:
        expected = error.message
    return f"{key} = {shown}: expected {expected}"


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(cfg: dict) -> dict:
    """Check ``cfg`` against the schema and fill in defaults (in place); return it."""
    from jsonschema.exceptions import best_match

    if not isinstance(cfg, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(cfg).__name__}")
    validator = _default_filling_validator(load_schema())
    error = best_match(validator.iter_errors(cfg))
    if error is not None:
        # best_match may pick an error inside a failed `if/then`; its path is still exact
        raise ConfigError(f"config error: {_describe(error)}")
    return cfg


# --------------------------------------------------------------------------- semantics


def resolve_path(value: str, base_dirs: list[Path], key: str) -> Path:
    """Resolve a relative path against each base dir in turn; the first hit wins."""
    path = Path(value).expanduser()
    if path.is_absolute():
        if path.exists():
            return path
        raise ConfigError(f"config error: {key} = {value!r}: expected an existing file or folder")
    tried = []
    for base in base_dirs:
        candidate = (base / path).resolve()
        tried.append(str(candidate))
        if candidate.exists():
            return candidate
    raise ConfigError(
        f"config error: {key} = {value!r}: expected an existing file or folder (tried {', '.join(tried)})"
    )


def _resolve_template(cfg: dict, template: str, base_dirs: list[Path], key: str) -> str:
    """An absolute path template ({model}, {data}, {layer}) whose every instance exists."""
    instances = [
        (c, layer, template.format(model=c.model, data=c.data, layer=layer))
        for c in cells(cfg)
        for layer in cfg["layers"]
    ]
    first = resolve_path(instances[0][2], base_dirs, f"{key} ({instances[0][0].name}, layer {instances[0][1]})")
    base = first.parents[len(Path(instances[0][2]).parts) - 1] if not Path(template).is_absolute() else Path("/")
    for cell, layer, path in instances[1:]:
        resolve_path(str(base / path), [base], f"{key} ({cell.name}, layer {layer})")
    return str(base / template) if not Path(template).is_absolute() else template


def _indexed(ids, prefix: str, key: str) -> list[str]:
    numbers = sorted(int(i[1:]) for i in ids)
    if numbers != list(range(len(numbers))):
        raise ConfigError(
            f"config error: {key} = {sorted(ids)}: expected consecutive ids {prefix}0..{prefix}{len(numbers) - 1}"
        )
    return [f"{prefix}{n}" for n in numbers]


def _iteration_entries(cfg: dict) -> tuple[dict, dict]:
    """The models M1..MX and data D0..DX an iterations block stands for."""
    it = cfg["iterations"]
    if it["method"] == "dpo":
        models = {
            f"M{i}": {
                "source": "dpo",
                "parent": f"M{i - 1}",
                "pairs_from": f"D{i - 1}",
                "reference": "M0" if it["dpo"]["reference"] == "base" else f"M{i - 1}",
            }
            for i in range(1, it["rounds"] + 1)
        }
        generate = {"source": "generate", "prompts": it["prompts"], "sampling": it["sampling"]}
        generate.update({key: it[key] for key in ("where", "max_prompts") if key in it})
        data = {f"D{i}": {**copy.deepcopy(generate), "model": f"M{i}"} for i in range(it["rounds"] + 1)}
        return models, data
    if len(it["data"]) != len(it["models"]) + 1:
        raise ConfigError(
            f"config error: iterations.data has {len(it['data'])} tables: expected one per model "
            f"M0..M{len(it['models'])} ({len(it['models']) + 1})"
        )
    models = {f"M{i + 1}": {"source": "hf", "path": path} for i, path in enumerate(it["models"])}
    data = {
        f"D{i}": {"source": "table", "path": path, **copy.deepcopy(it.get("table") or {})}
        for i, path in enumerate(it["data"])
    }
    return models, data


def _agrees(existing, wanted) -> bool:
    """True when every key of ``wanted`` has the same value in ``existing`` (defaults may add keys)."""
    if isinstance(wanted, dict):
        return isinstance(existing, dict) and all(k in existing and _agrees(existing[k], v) for k, v in wanted.items())
    return existing == wanted


def expand_iterations(cfg: dict) -> dict:
    """Turn an ``iterations`` block into model and data entries, so both methods give the same grid.

    Idempotent: entries already expanded (and filled with defaults) are left as they are; an
    entry the user wrote that contradicts the block is an error.
    """
    if "iterations" not in cfg:
        if "data" not in cfg:
            raise ConfigError(
                "config error: <config>: missing required key 'data' (or an iterations block that makes it)"
            )
        return cfg
    if "M0" not in cfg["models"]:
        raise ConfigError("config error: models: missing 'M0', the base model the iterations start from")
    models, data = _iteration_entries(cfg)
    cfg.setdefault("data", {})
    method = cfg["iterations"]["method"]
    for section, entries in (("models", models), ("data", data)):
        for key, entry in entries.items():
            if key in cfg[section] and not _agrees(cfg[section][key], entry):
                raise ConfigError(
                    f"config error: {section}.{key}: also made by iterations (method {method}); "
                    f"expected it only in one place: remove {section}.{key} or the iterations block"
                )
            cfg[section].setdefault(key, entry)
    extra = sorted(set(cfg["models"]) - {"M0", *models}) + sorted(set(cfg["data"]) - set(data))
    if extra:
        section = "models" if extra[0].startswith("M") else "data"
        raise ConfigError(
            f"config error: {section}.{extra[0]}: not part of the iterations block "
            f"(method {method} makes M0..M{len(models)}); expected it to be removed"
        )
    return validate(cfg)  # fills the new entries' defaults


def check(cfg: dict, base_dirs: list[Path] | None = None, check_depth: bool = True) -> dict:
    """Semantic checks the schema cannot express; resolves input paths to absolute ones.

    base_dirs: where relative paths are looked up, in order (cwd, then the workflow root).
    """
    base_dirs = [Path(b) for b in (base_dirs or [Path.cwd()])]
    if cfg.get("iterations", {}).get("method") == "dpo":
        cfg["iterations"]["prompts"] = str(resolve_path(cfg["iterations"]["prompts"], base_dirs, "iterations.prompts"))
    if cfg.get("interventions", {}).get("prompts"):
        cfg["interventions"]["prompts"] = str(
            resolve_path(cfg["interventions"]["prompts"], base_dirs, "interventions.prompts")
        )
    expand_iterations(cfg)
    models = _indexed(cfg["models"], "M", "models")
    datas = _indexed(cfg["data"], "D", "data")
    if len(datas) != len(models):
        raise ConfigError(
            f"config error: data = {datas}: expected one data set per model ({', '.join('D' + m[1:] for m in models)})"
        )

    for mid in models:
        spec = cfg["models"][mid]
        if spec["source"] == "hf":
            local = Path(spec["path"]).expanduser()
            looks_local = (
                local.is_absolute() or spec["path"].startswith(".") or any((b / local).exists() for b in base_dirs)
            )
            if looks_local:
                spec["path"] = str(resolve_path(spec["path"], base_dirs, f"models.{mid}.path"))
        if spec["source"] == "random" and "init_from" in spec:
            src = spec["init_from"]
            if src not in cfg["models"] or int(src[1:]) >= int(mid[1:]):
                raise ConfigError(f"config error: models.{mid}.init_from = {src!r}: expected an earlier model id")
            if cfg["models"][src]["source"] != "random":
                raise ConfigError(
                    f"config error: models.{mid}.init_from = {src!r}: expected a model with source 'random'"
                )
        if spec["source"] == "dpo":
            for key in ("parent", "reference"):
                if spec[key] not in cfg["models"] or int(spec[key][1:]) >= int(mid[1:]):
                    raise ConfigError(f"config error: models.{mid}.{key} = {spec[key]!r}: expected an earlier model id")
            if spec["pairs_from"] not in cfg["data"]:
                raise ConfigError(f"config error: models.{mid}.pairs_from = {spec['pairs_from']!r}: expected a data id")
            if "iterations" not in cfg or cfg["iterations"]["method"] != "dpo":
                raise ConfigError(
                    f"config error: models.{mid}.source = 'dpo': expected an iterations block "
                    "with method dpo (it holds the target metric and the DPO settings)"
                )
        if spec["source"] == "random" and spec["d_model"] % spec["n_heads"]:
            raise ConfigError(
                f"config error: models.{mid}.d_model = {spec['d_model']}: "
                f"expected a multiple of n_heads ({spec['n_heads']})"
            )

    for did in datas:
        spec = cfg["data"][did]
        if spec["source"] == "generate":
            spec.setdefault("model", "M" + did[1:])
            if spec["model"] not in cfg["models"]:
                raise ConfigError(
                    f"config error: data.{did}.model = {spec['model']!r}: expected one of {', '.join(models)}"
                )
            spec["prompts"] = str(resolve_path(spec["prompts"], base_dirs, f"data.{did}.prompts"))
        else:
            spec["path"] = str(resolve_path(spec["path"], base_dirs, f"data.{did}.path"))

    for i, scorer in enumerate(cfg["scorers"]):
        if scorer["name"] == "protein_identity":
            scorer["reference"] = str(resolve_path(scorer["reference"], base_dirs, f"scorers[{i}].reference"))
        if scorer["name"] == "command":
            import shlex

            program = shlex.split(scorer["command"])[0]
            if shutil.which(program) is None and not Path(program).exists():
                raise ConfigError(
                    f"config error: scorers[{i}].command = {scorer['command']!r}: "
                    f"expected an installed program, '{program}' was not found on PATH"
                )

    target = cfg.get("iterations", {}).get("target")
    if target is not None:
        from .scorers import metric_names

        known = metric_names(cfg["scorers"]) + [c for d in datas for c in cfg["data"][d].get("metric_columns", [])]
        if target["metric"] not in known:
            raise ConfigError(
                f"config error: iterations.target.metric = {target['metric']!r}: expected a metric "
                f"of the configured scorers or tables ({', '.join(known) or 'none configured'})"
            )

    for name, sae in cfg.get("saes", {}).items():
        if sae["source"] == "pretrained":
            sae["path"] = _resolve_template(cfg, sae["path"], base_dirs, f"saes.{name}.path")
        for key in ("hook_point", "target_hook_point"):
            if key in sae and sae[key] not in cfg["hook_points"]:
                raise ConfigError(
                    f"config error: saes.{name}.{key} = {sae[key]!r}: expected one of the extracted "
                    f"hook_points {cfg['hook_points']}"
                )
        if sae.get("architecture") == "matryoshka":
            fractions = sae["matryoshka_fractions"]
            if fractions != sorted(set(fractions)) or fractions[-1] != 1.0:
                raise ConfigError(
                    f"config error: saes.{name}.matryoshka_fractions = {fractions}: expected "
                    "increasing fractions ending at 1.0"
                )

    if check_depth:
        from . import models as model_lib

        for mid in models:
            depth = model_lib.model_depth(cfg["models"], mid, base_dirs)
            for j, layer in enumerate(cfg["layers"]):
                if layer >= depth:
                    raise ConfigError(
                        f"config error: layers[{j}] = {layer}: expected a block index below "
                        f"{depth} (model {mid} has {depth} blocks, numbered from 0)"
                    )
    # the interventions' grid and prompts, checked here too: `sae-diff validate` and the DAG
    # build then accept and refuse the same configs
    if intervention_runs(cfg):
        intervention_prompts(cfg)
    _check_diffing(cfg, base_dirs)
    return cfg


def _check_diffing(cfg: dict, base_dirs: list[Path]) -> None:
    """Same-token diffing reads the resid_post stores of the configured layers, and the lens its text file."""
    block = cfg.get("diffing")
    if not block or not block.get("methods"):
        return
    for j, layer in enumerate(block.get("layers") or []):
        if layer not in cfg["layers"]:
            raise ConfigError(
                f"config error: diffing.layers[{j}] = {layer}: expected one of layers {cfg['layers']} "
                "(same-token methods read the activations extracted there)"
            )
    if {"crosscoder", "diff_sae"} & set(block["methods"]) and "resid_post" not in cfg["hook_points"]:
        raise ConfigError(
            f"config error: diffing.methods {block['methods']}: the crosscoder and the diff-SAE read resid_post "
            f"activations, but hook_points is {cfg['hook_points']} (add resid_post, or drop those methods)"
        )
    if "adl" in block["methods"]:
        block["adl"]["prompts"] = str(resolve_path(block["adl"]["prompts"], base_dirs, "diffing.adl.prompts"))


def load(path: str | Path, base_dirs: list[Path] | None = None, check_depth: bool = True) -> dict:
    """Read a YAML config, validate it, fill in defaults and run the semantic checks."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config error: {path}: file not found")
    try:
        with open(path) as fh:
            cfg = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    validate(cfg)
    return check(cfg, base_dirs or [Path.cwd(), path.parent.resolve()], check_depth=check_depth)


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
