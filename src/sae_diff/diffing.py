"""One record per same-token pair and layer: what each method found, and where the methods agree.

The same-token methods (``crosscoder``, ``diff_sae``, ``lens`` for the activation-difference lens
and per-token KL) each write their own files under ``results/diffing/{method}/{pair}/``. This
module reads them back into one small JSON per (pair, layer), the source of ``headline.diffing``:

- per method, its top Mi-only directions (latent ids; for the lens, its promoted tokens), with the
  numbers that rank them;
- ``agreement``: every pair of directions from two different methods whose decoder vectors have
  |cosine| ≥ ``agreement_cosine`` (0.7 by default: well above what two random directions in
  d_model ≥ 64 dimensions reach, |cos| ≈ 1/√d), so a reader sees which findings two methods share.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch


def unit_rows(vectors) -> np.ndarray:
    rows = torch.as_tensor(vectors, dtype=torch.float64)
    return (rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()


def agreement(directions: dict[str, tuple[list, np.ndarray]], threshold: float) -> list[dict]:
    """Pairs of directions from two different methods with |cosine| ≥ ``threshold``.

    directions: method -> (ids, vectors [n, d]); ids name each row (latent id, or ``position:p`` for the lens).
    """
    found = []
    methods = sorted(directions)
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            ids_a, va = directions[a]
            ids_b, vb = directions[b]
            if len(ids_a) == 0 or len(ids_b) == 0:
                continue
            cos = unit_rows(va) @ unit_rows(vb).T
            for r, c in zip(*np.nonzero(np.abs(cos) >= threshold)):
                found.append({a: ids_a[r], b: ids_b[c], "cosine": float(cos[r, c])})
    return sorted(found, key=lambda row: -abs(row["cosine"]))


def diff_sae_block(folder: Path, top: int) -> tuple[dict, tuple[list, np.ndarray]]:
    """The diff-SAE's headline block and its top latents' decoder rows."""
    from .io import read_json
    from .sae import files

    folder = Path(folder)
    metrics = read_json(folder / "metrics.json")
    if metrics.get("identical"):
        return {"identical": True, "top": []}, ([], np.zeros((0, 0)))
    table = pd.read_parquet(folder / "latents.parquet").head(top)
    ids = [int(v) for v in table["latent"]]
    sae = files.load(folder / "sae")
    block = {
        "top": ids,
        "share": [round(float(v), 4) for v in table["share"]],
        "fvu": metrics.get("fvu"),
        "b_dec_share": metrics.get("b_dec_share"),
    }
    if "promoted" in table.columns:  # logit lens through the tuned model: each latent's first tokens
        block["promoted"] = [[str(t) for t in list(tokens)[:5]] for tokens in table["promoted"]]
    return block, (ids, sae.W_dec.detach().double().numpy()[ids])


def metric_block(record: dict) -> dict:
    """Per metric, the diff-SAE latents behind it (``metric_latents``): the latents chosen on train,
    their held-out ρ and q, those called, and the random-direction null: how many of as many random
    directions each draw called, and the rank p of the count called among the draws'."""
    out = {}
    for metric, found in record["metrics"].items():
        rows = found["latents"]
        out[metric] = {
            "chosen": [row["latent"] for row in rows],
            "rho_eval": [round(row["rho_eval"], 4) for row in rows],
            "q": [round(row["q"], 4) for row in rows],
            "called": [row["latent"] for row in rows if row["called"]],
            "rho_train": [round(row["rho_train"], 4) for row in rows],
            "random_directions_called": found["random_directions"]["n_called"],
            "random_directions_p": found["random_directions"]["p"],
            "random_directions_abs_rho_eval": [round(v, 4) for v in found["random_directions"]["abs_rho_eval"]],
            "n_eval": found["n_eval"],
            "n_eval_groups": found["n_eval_groups"],
            **({"skipped": found["skipped"]} if "skipped" in found else {}),
        }
    return out


def adl_block(folder: Path, top: int) -> tuple[dict, tuple[list, np.ndarray]]:
    """The lens's headline (promoted tokens of the unrelated-text direction, and of the data's) and
    its two directions."""
    from safetensors.torch import load_file

    from .io import read_json

    record = read_json(Path(folder) / "adl.json")
    tensors = load_file(str(Path(folder) / "adl.safetensors"))
    sets = [name for name in ("neutral", "data") if name in record]
    block = {
        "top": record["neutral"]["promoted"][:top] if "neutral" in record else [],
        "suppressed": record["neutral"]["suppressed"][:top] if "neutral" in record else [],
        "data_top": record["data"]["promoted"][:top] if "data" in record else [],
        "direction_norm": {name: record[name]["direction_norm"] for name in sets},
        "positions": record["headline_positions"],
    }
    vectors = np.stack([tensors[f"{name}.direction"].double().numpy() for name in sets]) if sets else np.zeros((0, 0))
    return block, (sets, vectors)


def kl_block(folder: Path, top: int) -> tuple[dict, tuple[list, np.ndarray]]:
    """Per-token KL: its means and the tokens where Mi departs most from M0 (no direction)."""
    from .io import read_json

    record = read_json(Path(folder) / "kl.json")
    block = {key: record[key] for key in record if key.startswith(("mean_", "median_", "n_"))}
    return {**block, "top": record["top_tokens"][:top]}, ([], np.zeros((0, 0)))


def crosscoder_block(folder: Path, top: int) -> tuple[dict, tuple[list, np.ndarray]]:
    """The crosscoder's class counts, Latent Scaling labels, top Mi-only latents (genuine first) and
    top latents by the change they carry (``moved_rank``), with every Mi-only latent's tuned decoder
    row (the directions other methods are matched to)."""
    from . import crosscoder
    from .io import read_json

    folder = Path(folder)
    table = pd.read_parquet(folder / "latents.parquet")
    metrics = read_json(folder / "metrics.json")
    ranked = table.dropna(subset=["mi_only_rank"]).sort_values("mi_only_rank")
    ids = [int(v) for v in ranked["latent"]]
    classes = metrics["classes"]
    block = {
        "top": ids[:top],
        "n_mi_only": classes["mi_only"],
        "n_shared": classes["shared"],
        "n_m0_only": classes["m0_only"],
        "n_other": classes["other"],
        "scaling_labels": metrics["scaling_labels"],
        "top_scaling_label": [str(v) for v in ranked["scaling_label"].head(top)],
        "fvu": {name: block["fvu"] for name, block in metrics.get("models", {}).items()},
    }
    if "moved_rank" in table:  # where the change rides on latents both models keep (moved_vectors)
        block["top_moved"] = [int(v) for v in crosscoder.ranked_moved(table, top)["latent"]]
        block["n_moved"] = metrics["moved"]["n_latents"]
    for key in ("ce_loss_score", "kl_div_with_spliced"):  # each model with its reconstruction spliced in
        values = {name: entry[key] for name, entry in metrics.get("models", {}).items() if key in entry}
        if values:
            block[key] = values
    last = [c for c in table.columns if c.startswith("promoted_m")]
    if last:
        block["promoted"] = [[str(t) for t in list(tokens)[:5]] for tokens in ranked[sorted(last)[-1]].head(top)]
    if not ids:
        return block, ([], np.zeros((0, 0)))
    cc = crosscoder.load(folder / "crosscoder")
    return block, (ids, cc.W_dec.detach().double().numpy()[ids, -1, :])


def all_iterations_block(folder: Path, top: int) -> tuple[dict, tuple[list, np.ndarray]]:
    """The crosscoder over M0..MX: the pair block of M0 against MX, plus per iteration Mi how many
    latents its decoder holds that M0's does not (Δnorm(M0, Mi) > 0.9) and the reverse (< 0.1),
    and at which iteration each latent first became Mi-only (``emerged_at``)."""
    from . import crosscoder

    block, found = crosscoder_block(folder, top)
    table = pd.read_parquet(Path(folder) / "latents.parquet")
    norms = table[sorted((c for c in table.columns if c.startswith("norm_m")), key=lambda c: int(c[6:]))].to_numpy()
    first = norms[:, :1]
    biggest = np.maximum(first, norms[:, 1:])
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(biggest > 0, 0.5 * ((norms[:, 1:] - first) / biggest + 1), np.nan)
    new = delta > crosscoder.MI_ONLY_MIN
    gone = delta < crosscoder.M0_ONLY_MAX
    emerged = np.where(new.any(axis=1), new.argmax(axis=1) + 1, 0)
    block["n_models"] = int(norms.shape[1])
    block["per_iteration"] = {
        f"M{i}": {"n_mi_only_vs_m0": int(new[:, i - 1].sum()), "n_m0_only_vs_mi": int(gone[:, i - 1].sum())}
        for i in range(1, norms.shape[1])
    }
    block["emerged_at"] = {f"M{i}": int((emerged == i).sum()) for i in range(1, norms.shape[1])}
    return block, found


READERS = {"crosscoder": crosscoder_block, "diff_sae": diff_sae_block, "adl": adl_block, "kl": kl_block}


def aligned_latents(directions: dict[str, tuple[list, np.ndarray]], k: int = 5) -> dict:
    """For each lens direction, the latents of each latent method whose decoders align with it most."""
    if "adl" not in directions:
        return {}
    out = {}
    names, lens_vectors = directions["adl"]
    for method, (ids, vectors) in directions.items():
        if method == "adl" or len(ids) == 0:
            continue
        cos = unit_rows(lens_vectors) @ unit_rows(vectors).T
        for row, name in enumerate(names):
            order = np.argsort(-np.abs(cos[row]), kind="stable")[:k]
            out.setdefault(name, {})[method] = [{"latent": ids[j], "cosine": float(cos[row, j])} for j in order]
    return out


def best_matches(source: tuple[list, np.ndarray], target: tuple[list, np.ndarray]) -> list[dict]:
    """For each source direction, the target direction with the largest |cosine| (and the cosine)."""
    ids_s, vs = source
    ids_t, vt = target
    best, cosine = best_by_abs_cosine(np.asarray(vs), np.asarray(vt))
    return [{"latent": ids_s[i], "match": ids_t[j], "cosine": float(c)} for i, (j, c) in enumerate(zip(best, cosine))]


def best_by_abs_cosine(source: np.ndarray, target: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each source row, the index of the target row with the largest |cosine| and that (signed)
    cosine, in float64 and ``chunk`` source rows at a time (memory O(chunk · len(target)));
    ties go to the first row, as np.argmax's. Zero rows have cosine 0 with everything."""
    target_unit = unit_rows(target)
    index = np.zeros(len(source), dtype=np.int64)
    cosine = np.zeros(len(source), dtype=np.float64)
    for start in range(0, len(source), chunk):
        cos = unit_rows(source[start : start + chunk]) @ target_unit.T
        best = np.argmax(np.abs(cos), axis=1)
        index[start : start + len(best)] = best
        cosine[start : start + len(best)] = cos[np.arange(len(best)), best]
    return index, cosine


MATCH_COLUMNS = {
    "latent": "int64",
    "rank": "Int64",
    "share": "Float64",
    "mi_only_match": "Int64",
    "mi_only_cosine": "Float64",
    "mi_only_abs_cosine": "Float64",
    "match": "Int64",
    "match_class": "string",
    "match_cosine": "Float64",
    "match_abs_cosine": "Float64",
}


def latent_matches(diff_sae_folder: Path, crosscoder_folder: Path) -> pd.DataFrame:
    """Every diff-SAE latent's best-matching crosscoder latent, by |cosine| between its decoder row
    and the crosscoder's decoder vector for Mi (the last model; raw and scaled directions agree):

    - ``mi_only_match``, ``mi_only_cosine``, ``mi_only_abs_cosine``: among the crosscoder's Mi-only
      latents (``class`` of its latents.parquet), null when it has none;
    - ``match``, ``match_class``, ``match_cosine``, ``match_abs_cosine``: among all its latents, with
      the class of the one found.

    One row per diff-SAE latent in latent order, with its ``rank`` and ``share`` (latents.parquet);
    no rows when the diff-SAE found the two models identical. Column types: ``MATCH_COLUMNS``.
    """
    from . import crosscoder
    from .io import read_json
    from .sae import files

    diff_sae_folder, crosscoder_folder = Path(diff_sae_folder), Path(crosscoder_folder)
    if read_json(diff_sae_folder / "metrics.json").get("identical"):
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MATCH_COLUMNS.items()})
    source = files.load(diff_sae_folder / "sae").W_dec.detach().double().numpy()
    ranks = pd.read_parquet(diff_sae_folder / "latents.parquet").set_index("latent")
    cc = crosscoder.load(crosscoder_folder / "crosscoder")
    target = cc.W_dec.detach().double().numpy()[:, -1, :]
    classes = pd.read_parquet(crosscoder_folder / "latents.parquet").set_index("latent")["class"]
    classes = classes.reindex(range(len(target))).to_numpy()
    n = len(source)
    latents = np.arange(n)
    table = pd.DataFrame({"latent": latents})
    table["rank"] = pd.array(ranks["rank"].reindex(latents).to_numpy(dtype=float), dtype="Float64").astype("Int64")
    table["share"] = pd.array(ranks["share"].reindex(latents).to_numpy(dtype=float), dtype="Float64")
    mi_only = np.flatnonzero(classes == "mi_only")
    if len(mi_only):
        index, cosine = best_by_abs_cosine(source, target[mi_only])
        table["mi_only_match"] = pd.array(mi_only[index], dtype="Int64")
        table["mi_only_cosine"] = pd.array(cosine, dtype="Float64")
    else:
        table["mi_only_match"] = pd.array([pd.NA] * n, dtype="Int64")
        table["mi_only_cosine"] = pd.array([pd.NA] * n, dtype="Float64")
    table["mi_only_abs_cosine"] = table["mi_only_cosine"].abs()
    index, cosine = best_by_abs_cosine(source, target)
    table["match"] = pd.array(index, dtype="Int64")
    table["match_class"] = pd.array(classes[index], dtype="string")
    table["match_cosine"] = pd.array(cosine, dtype="Float64")
    table["match_abs_cosine"] = table["match_cosine"].abs()
    return table.astype(MATCH_COLUMNS)


# KL recovery targets (recovery.run) and the method block each one belongs to
RECOVERY_OF = {"crosscoder_mi_only": "crosscoder", "diff_sae_top": "diff_sae", "adl_data": "adl"}


def record(
    pair: str,
    layer: int,
    folders: dict[str, Path],
    top: int,
    threshold: float,
    kl_recovery: Path | None = None,
    metric_latents: Path | None = None,
) -> dict:
    """The per-(pair, layer) record: each method's block and the cross-method agreement.

    folders: method -> its output folder for this pair and layer (only the methods that ran);
    kl_recovery: the pair and layer's ``recovery.json``, whose numbers join the blocks they measure;
    metric_latents: the diff-SAE's ``metric_latents.json``, its block's ``metric``."""
    blocks, directions = {}, {}
    readers = {**READERS, "crosscoder": all_iterations_block} if pair.startswith("all_") else READERS
    for method, folder in folders.items():
        blocks[method], found = readers[method](Path(folder), top)
        if len(found[0]):
            directions[method] = found
    if metric_latents is not None and "diff_sae" in blocks and not blocks["diff_sae"].get("identical"):
        from .io import read_json

        blocks["diff_sae"]["metric"] = metric_block(read_json(metric_latents))
    if "adl" in blocks:
        blocks["adl"]["aligned"] = aligned_latents(directions)
    if "diff_sae" in directions and "crosscoder" in directions:
        blocks["diff_sae"]["crosscoder_match"] = best_matches(directions["diff_sae"], directions["crosscoder"])
    if kl_recovery is not None:
        from .io import read_json

        measured = read_json(kl_recovery)
        for target, block in measured["targets"].items():
            numbers = {k: v for k, v in block.items() if k != "null"}
            method = RECOVERY_OF.get(target)
            if method in blocks:
                blocks[method]["kl_recovery"] = numbers
            if "kl" in blocks:
                blocks["kl"].setdefault("recovery", {})[target] = numbers
        if "kl" in blocks:
            blocks["kl"]["recovery_before"] = measured["mean_kl_before"]
    # the headline lists each method's top latents; agreement is sought among those only
    shown = {m: (ids[:top], vectors[:top]) for m, (ids, vectors) in directions.items()}
    return {
        "pair": pair,
        "layer": int(layer),
        "methods": blocks,
        "agreement_cosine": threshold,
        "agreement": agreement(shown, threshold),
    }


def headline(records: list[dict]) -> dict:
    """``headline.diffing``: method -> ``M{i}`` -> layer -> the method's block (with the agreements it is part of)."""
    out: dict = {}
    for rec in records:
        if rec["pair"].startswith("all_"):  # the crosscoder over every iteration at once
            block = rec["methods"]["crosscoder"]
            out.setdefault("crosscoder_all", {})[f"layer{rec['layer']}"] = {**block, "data": rec["pair"][4:]}
            continue
        iteration = rec["pair"].split("__")[1].split("_")[0]  # M0_Di__Mi_Di -> Mi
        for method, block in rec["methods"].items():
            shared = [row for row in rec["agreement"] if method in row]
            by_layer = out.setdefault(method, {}).setdefault(iteration, {})
            by_layer[f"layer{rec['layer']}"] = {**block, "agrees_with": shared}
    return out
