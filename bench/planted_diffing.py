"""Score every same-token diffing method on a change planted on purpose in the real model.

M1 is SmolLM2-135M-Instruct (the demo's M0) with a rank-1 edit to the MLP of one block:

    W_down += alpha * u v^T        (block ``--block``, default 10; W_down [d_model, d_mlp])

so that the MLP writes ``alpha * (v . h) * u`` more into the residual stream, where h is the MLP's
hidden activation (the input of down_proj). u is a fixed random unit vector of the residual stream
(seeded). v is read from tokens: the mean hidden activation of one token class (default the token
" the") minus the mean over all other tokens, with the other tokens' mean projected out (so that
on average the edit writes nothing where the class is absent), unit norm. alpha is set so that on
class tokens the edit's mean size is ``--ratio`` (default 0.3) of the median layer-``--layer``
residual norm there. M1' is an exact copy of M0 (the null control).

All three models read the same texts (the demo's D0 samples, train and eval splits); layer 12
resid_post is extracted with ``activations.extract``; then each method runs on (M0, M1) and on
(M0, M1'): the BatchTopK crosscoder, the diff-SAE (BatchTopK and TopK), the activation-difference
lens (neutral texts and the data's texts), per-token KL, and KL recovery of each method's top
directions against random latents (directions for the lens). A method "finds" the edit when:

    crosscoder  a top-5 Mi-only latent (``crosscoder.ranked_mi_only``) has |cos(tuned decoder, u)| >= 0.7,
                or a top-5 latent by ``moved_rank`` moves along u (``crosscoder.moved_vectors``) at >= 0.7
    diff-SAE    a top-5 latent by share has |cos(decoder, u)| >= 0.7
    ADL         |cos(headline direction, u)| >= 0.7 on either text set
    KL          at least half of the 50 largest-KL eval tokens are edited tokens (moved by more than
                10% of their residual norm at the layer) and that fraction is at least twice the base rate

    python bench/planted_diffing.py [--out /tmp/planted/table.json] [--work /tmp/planted]

Everything is written under ``--work``; nothing in results/ is touched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sae_diff import activations, crosscoder, diff_sae, lens, models, recovery  # noqa: E402
from sae_diff import config as cfglib  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.grid import site_dir  # noqa: E402
from sae_diff.paired import PairedStore  # noqa: E402
from sae_diff.sae import files  # noqa: E402
from sae_diff.sae.train import spec_from_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HOOK = "resid_post"
FOUND_COS = 0.7
TOP = 5
PLANTED_STREAM = 0x5EED_D1FF  # the planted direction's random stream, apart from every model init
MOVED = 0.1  # a token is "edited" when the edit moves its layer activation by more than 10% of its norm
START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def cos_with(rows: torch.Tensor | np.ndarray, u: torch.Tensor) -> np.ndarray:
    """Cosine of each row of ``rows`` [m, d] with ``u`` [d] (0 for a zero row), float64."""
    w = torch.as_tensor(np.asarray(rows) if not torch.is_tensor(rows) else rows).double().reshape(-1, len(u))
    norms = w.norm(dim=1)
    return torch.where(norms > 0, (w @ u.double()) / (norms * u.double().norm()).clamp_min(1e-300), 0.0).numpy()


# --------------------------------------------------------------------------- the planted model


def kept_sequences(tokenizer, samples: pd.DataFrame, max_length: int):
    return activations.tokenize(tokenizer, samples, max_length, True, True)


@torch.no_grad()
def hidden_and_resid(model, sequences, block: int, layer: int):
    """Per kept token: the MLP hidden activation of ``block`` (input of down_proj), the layer's
    resid_post, the token id."""
    captured = {}
    down = models.blocks(model)[block].mlp.down_proj
    handle = down.register_forward_hook(lambda _m, inputs, _o: captured.__setitem__("h", inputs[0].detach()))
    hs, rs, ids = [], [], []
    try:
        for seq in sequences:
            keep = torch.from_numpy(seq.keep)
            if not keep.any():
                continue
            with models.capture(model, [(layer, HOOK)], stop=False) as store:
                model(input_ids=torch.tensor([seq.ids]), use_cache=False)
            hs.append(captured["h"][0][keep].float())
            rs.append(store[(layer, HOOK)][0][keep].float())
            ids.append(torch.tensor(seq.ids)[keep])
    finally:
        handle.remove()
    return torch.cat(hs), torch.cat(rs), torch.cat(ids)


def build_planted(args, samples: pd.DataFrame, work: Path) -> dict:
    """Write M1 (edited) and M1c (copy of M0) under ``work``; return the construction's record."""
    model, tokenizer = models.load(args.model)
    token_ids = tokenizer(args.token, add_special_tokens=False)["input_ids"]
    if len(token_ids) != 1:
        raise SystemExit(f"--token {args.token!r} is {len(token_ids)} tokens; pick a single-token class")
    class_id = token_ids[0]
    train = samples[samples["split"] == "train"].sort_values("sample_id")
    sequences = kept_sequences(tokenizer, train.head(args.construct_samples), args.max_length)
    h, resid, ids = hidden_and_resid(model, sequences, args.block, args.layer)
    in_class = ids == class_id
    if not in_class.any():
        raise SystemExit(f"--token {args.token!r}: no such token in the train split")
    mu_on, mu_off = h[in_class].mean(0), h[~in_class].mean(0)
    v = mu_on - mu_off
    v = v - (v @ mu_off) / (mu_off @ mu_off) * mu_off
    v = v / v.norm()
    score = h @ v
    # u from its own stream: torch.randn with a small seed is exactly how the SAEs, diff-SAEs and
    # crosscoders initialise their decoders (seed 0: u was latent 0's init row, which an unconverged
    # dictionary keeps at cosine ~0.9 whatever the data), so a "found" latent 0 proved nothing
    u = torch.from_numpy(np.random.default_rng([args.seed, PLANTED_STREAM]).standard_normal(resid.shape[1]))
    u = (u / u.norm()).float()
    target = args.ratio * float(resid[in_class].norm(dim=1).median())
    alpha = target / float(score[in_class].mean())
    down = models.blocks(model)[args.block].mlp.down_proj
    with torch.no_grad():
        down.weight += alpha * torch.outer(u, v).to(down.weight.dtype)
    out = work / "M1"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(args.model) / name).exists():
            shutil.copy2(Path(args.model) / name, out / name)
    edit = {
        "block": args.block,
        "module": f"model.layers.{args.block}.mlp.down_proj",
        "token_class": args.token,
        "token_id": int(class_id),
        "class_fraction_train": float(in_class.float().mean()),
        "alpha": alpha,
        "ratio": args.ratio,
        "u_seed": args.seed,
        "score_on_class_mean": float(score[in_class].mean()),
        "score_on_class_std": float(score[in_class].std()),
        "score_off_class_mean": float(score[~in_class].mean()),
        "score_off_class_std": float(score[~in_class].std()),
        "score_off_class_abs_q99": float(score[~in_class].abs().quantile(0.99)),
        "edit_norm_on_class_mean": float(alpha * score[in_class].mean()),
        "resid_norm_on_class_median": float(resid[in_class].norm(dim=1).median()),
        "resid_norm_median": float(resid.norm(dim=1).median()),
    }
    info = {"model_id": "M1", "source": "planted", "edit": edit, "sha256": models.checksums(out)}
    (out / "sae_diff_model.json").write_text(json.dumps(info, indent=2))
    control = work / "M1c"
    if control.exists():
        shutil.rmtree(control)
    shutil.copytree(args.model, control, ignore=shutil.ignore_patterns(".snakemake_timestamp", ".written-by-sae-diff"))
    torch.save({"u": u, "v": v, "alpha": alpha}, work / "edit.pt")
    return {"edit": edit, "u": u}


@torch.no_grad()
def perplexity(model, tokenizer, samples: pd.DataFrame, max_length: int) -> float:
    """exp(mean next-token NLL) over every token after the first of each sample (prompt + text)."""
    total, count = 0.0, 0
    for seq in kept_sequences(tokenizer, samples, max_length):
        if len(seq.ids) < 2:
            continue
        ids = torch.tensor([seq.ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total, count = total + float(nll), count + len(seq.ids) - 1
    return float(np.exp(total / count))


# --------------------------------------------------------------------------- methods


def run_crosscoder(paired: PairedStore, u: torch.Tensor, out: Path, args, true_dir: torch.Tensor) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cfg = crosscoder.CrosscoderConfig(
        n_models=2, d_in=paired.d_model, d_sae=args.cc_expansion * paired.d_model, architecture="batchtopk",
        k=args.k, model_names=list(paired.names), hook_name=paired.stores[1].manifest["hook_name"],
    )  # fmt: skip
    training = {"tokens": 10**9, "batch_size": args.batch_size, "epochs": args.epochs, "checkpoint_every": 0,
                "shuffle_buffer": 65536}  # fmt: skip
    opts = {"lr": args.lr, "seed": 0, "warmup_steps": 50, "decay_fraction": 0.2, "dead_tokens": 1_000_000,
            "logit_lens_k": 10}  # fmt: skip
    metrics = crosscoder.run(paired, cfg, out, training, opts, samples=None, progress=False)
    table = pd.read_parquet(out / "latents.parquet")
    cc = crosscoder.load(out / "crosscoder")
    table["cos_u"] = cos_with(cc.W_dec.detach()[:, 1], u)
    table["abs_cos_u"] = table["cos_u"].abs()
    table["abs_cos_true"] = np.abs(cos_with(cc.W_dec.detach()[:, 1], true_dir))
    ranked = table.dropna(subset=["mi_only_rank"]).sort_values("mi_only_rank")
    top = ranked.head(TOP)
    best = table.loc[table["abs_cos_u"].idxmax()]
    hit = top[top["abs_cos_u"] >= FOUND_COS]
    # a change that rides on latents both models keep: the top 5 by moved_rank, along what they move
    moved = crosscoder.ranked_moved(table, TOP)
    rows = crosscoder.moved_vectors(cc, moved["mean_activation"].to_numpy(), moved["latent"].to_numpy())
    moved_cos, moved_cos_true = np.abs(cos_with(rows, u)), np.abs(cos_with(rows, true_dir))
    return {
        "found": bool(len(hit)) or bool(len(moved_cos) and moved_cos.max() >= FOUND_COS),
        "n_moved": int(table["moved_rank"].notna().sum()),
        "abs_cos_moved_top5_best": float(moved_cos.max()) if len(moved_cos) else float("nan"),
        "abs_cos_true_moved_top5_best": float(moved_cos_true.max()) if len(moved_cos) else float("nan"),
        "abs_cos_top5_best": float(top["abs_cos_u"].max()) if len(top) else float("nan"),
        "rank_of_found": int(hit["mi_only_rank"].iloc[0]) if len(hit) else None,
        "found_true": bool((top["abs_cos_true"] >= FOUND_COS).any()),
        "abs_cos_true_top5_best": float(top["abs_cos_true"].max()) if len(top) else float("nan"),
        "best_abs_cos_true": float(table["abs_cos_true"].max()),
        "top5_mi_only": [
            {
                "latent": int(r.latent),
                "abs_cos_u": round(float(r.abs_cos_u), 4),
                "label": r.scaling_label,
                "firing_frequency": round(float(r.firing_frequency), 5),
            }
            for r in top.itertuples()
        ],  # fmt: skip
        "best_latent": int(best["latent"]),
        "best_abs_cos": float(best["abs_cos_u"]),
        "best_class": str(best["class"]),
        "best_label": str(best["scaling_label"]),
        "best_delta_norm": float(best["delta_norm"]),
        "best_mi_only_rank": None if pd.isna(best["mi_only_rank"]) else int(best["mi_only_rank"]),
        "best_firing_frequency": float(best["firing_frequency"]),
        "n_mi_only": int(metrics["classes"]["mi_only"]),
        "classes": metrics["classes"],
        "scaling_labels": metrics["scaling_labels"],
        "fvu": {m: round(v["fvu"], 4) for m, v in metrics["models"].items()},
        "top_latents": [int(v) for v in ranked["latent"].head(TOP)],
    }


def run_diff_sae(
    base, tuned, u, out: Path, args, architecture: str, cfg: dict, samples, model, tokenizer, true_dir
) -> dict:
    if out.exists():
        shutil.rmtree(out)
    block = dict(cfg["diffing"]["diff_sae"], architecture=architecture, lr=args.lr, k=args.k)
    spec = spec_from_config(
        "diff_sae", block, d_in=tuned.d_model, d_out=None, hook_name=tuned.manifest["hook_name"],
        target_hook_name="", model_name="M1-minus-M0", warm_start=None,
    )  # fmt: skip
    training = {"tokens": 10**9, "batch_size": args.batch_size, "epochs": args.epochs, "checkpoint_every": 0,
                "shuffle_buffer": 65536, "seed": 0}  # fmt: skip
    result = diff_sae.run(
        base, tuned, spec, training, out, samples, cfg["features"], model, tokenizer, "cpu", progress=False
    )
    if result.get("identical"):
        table = pd.read_parquet(out / "latents.parquet")
        return {"found": False, "identical": True, "n_latents": int(len(table)), "abs_cos_top5_best": float("nan")}
    table = pd.read_parquet(out / "latents.parquet")
    sae = files.load(out / "sae")
    cosines = cos_with(sae.W_dec.detach(), u)
    table["abs_cos_u"] = np.abs(cosines[table["latent"].to_numpy()])
    table["abs_cos_true"] = np.abs(cos_with(sae.W_dec.detach(), true_dir)[table["latent"].to_numpy()])
    top = table.head(TOP)
    hit = top[top["abs_cos_u"] >= FOUND_COS]
    best = table.loc[table["abs_cos_u"].idxmax()]
    return {
        "found": bool(len(hit)),
        "identical": False,
        "abs_cos_top5_best": float(top["abs_cos_u"].max()),
        "rank_of_found": int(hit["rank"].iloc[0]) if len(hit) else None,
        "found_true": bool((top["abs_cos_true"] >= FOUND_COS).any()),
        "abs_cos_true_top5_best": float(top["abs_cos_true"].max()),
        "best_abs_cos_true": float(table["abs_cos_true"].max()),
        "top5": [
            {"latent": int(r.latent), "share": round(float(r.share), 4), "abs_cos_u": round(float(r.abs_cos_u), 4)}
            for r in top.itertuples()
        ],
        "best_latent": int(best["latent"]),
        "best_abs_cos": float(best["abs_cos_u"]),
        "best_rank": int(best["rank"]),
        "fvu": float(result["metrics"].get("fvu", float("nan"))),
        "b_dec_share": float(result["b_dec_share"]),
        "top_latents": [int(v) for v in table["latent"].head(TOP)],
        "live_latents": [int(v) for v in table.loc[~table["dead"].astype(bool), "latent"]]
        if "dead" in table
        else [int(v) for v in table["latent"]],
    }


def run_adl(base, tuned, tokenizer, text_sets: dict, u, layer: int, n_positions: int, true_dir) -> dict:
    out = {}
    keep = lens.headline_positions(n_positions)
    for name, texts in text_sets.items():
        block = lens.activation_difference(
            base, tuned, tokenizer, texts, [(layer, HOOK)], n_positions, 16, "cpu", progress=False
        )[(layer, HOOK)]
        counts = block["count"][keep]
        reached = counts > 0
        weights = counts[reached][:, None]
        direction = (block["mean"][keep][reached] * weights).sum(0) / max(weights.sum(), 1)
        norm = float(np.linalg.norm(direction))
        cosine = float(cos_with(direction[None], u)[0]) if norm > 0 else float("nan")
        per_position = [
            float(abs(cos_with(row[None], u)[0])) if np.linalg.norm(row) > 0 else float("nan")
            for row in np.nan_to_num(block["mean"])
        ]
        out[name] = {
            "abs_cos": abs(cosine) if norm > 0 else float("nan"),
            "abs_cos_true": float(abs(cos_with(direction[None], true_dir)[0])) if norm > 0 else float("nan"),
            "direction_norm": norm,
            "tuned_norm": float(np.nanmean(block["tuned_norm"][keep])),
            "abs_cos_per_position": [round(c, 4) for c in per_position],
            "norm_per_position": [float(v) for v in np.linalg.norm(np.nan_to_num(block["mean"]), axis=1)],
            "direction": direction,
        }
    cosines = [v["abs_cos"] for v in out.values() if np.isfinite(v["abs_cos"])]
    return {"found": bool(cosines) and max(cosines) >= FOUND_COS, "sets": out}


def kl_found(top50_fraction: float, base_rate: float) -> bool:
    """Per-token KL finds the change: at least half of the 50 largest-KL tokens are changed ones, and
    at least twice their base rate."""
    return top50_fraction >= 0.5 and top50_fraction >= 2 * base_rate


def edited_mask(paired: PairedStore, split: str) -> tuple[pd.DataFrame, torch.Tensor]:
    """Per token of ``split``: sample_idx, position, relative move ‖Δ‖/‖h0‖, edited (move > MOVED), cos(Δ, u)."""
    data = paired.all(split)
    acts = data["acts"].double()
    delta = acts[:, 1] - acts[:, 0]
    rel = delta.norm(dim=1) / acts[:, 0].norm(dim=1).clamp_min(1e-12)
    return pd.DataFrame(
        {
            "sample_idx": data["sample_idx"].numpy().astype(np.int64),
            "position": data["position"].numpy().astype(np.int64),
            "token_id": data["token_ids"].numpy().astype(np.int64),
            "rel_move": rel.numpy(),
            "edited": (rel > MOVED).numpy(),
        }
    ), delta


def run_kl(base, tuned, tokenizer, samples, mask: pd.DataFrame | None, max_length: int, class_id: int) -> dict:
    table = lens.per_token_kl(base, tuned, tokenizer, samples, 8, "cpu", max_length=max_length, progress=False)
    out = {
        "n_tokens": int(len(table)),
        "mean_kl": float(table["kl_tuned_base"].mean()),
        "max_kl": float(table["kl_tuned_base"].max()),
    }
    if mask is None:
        return out | {"found": False}
    joined = table.merge(mask[["sample_idx", "position", "edited"]], on=["sample_idx", "position"], how="left")
    missing = int(joined["edited"].isna().sum())
    joined["edited"] = joined["edited"].fillna(False).astype(bool)
    top = joined.sort_values("kl_tuned_base", ascending=False, kind="stable").head(50)
    base_rate = float(joined["edited"].mean())
    frac = float(top["edited"].mean())
    out.update(
        found=kl_found(frac, base_rate),
        top50_edited_fraction=frac,
        top50_class_fraction=float((top["token_id"] == class_id).mean()),
        edited_base_rate=base_rate,
        class_base_rate=float((joined["token_id"] == class_id).mean()),
        mean_kl_edited=float(joined.loc[joined["edited"], "kl_tuned_base"].mean()),
        mean_kl_not_edited=float(joined.loc[~joined["edited"], "kl_tuned_base"].mean()),
        tokens_not_in_store=missing,
        top10_tokens=[tokenizer.decode([int(t)]) for t in top["token_id"].head(10)],
    )
    return out


def projection_patch(u: torch.Tensor):
    """h_base + ((h_tuned − h_base)·u) u: the planted direction's own share of the difference (the ceiling)."""
    uu = u.float()

    def patch(h_base, h_tuned):
        delta = (h_tuned - h_base).float()
        return h_base + ((delta @ uu.to(delta.device))[..., None] * uu.to(delta.device)).to(h_base.dtype)

    return patch


def run_recovery(base, tuned, tokenizer, samples, layer, u, cc_dir, cc_top, dsae_dir, dsae, adl_direction, args):
    rng = np.random.default_rng(args.seed)
    targets, nulls, notes = {"oracle_u": projection_patch(u)}, {}, {}
    if cc_top:
        cc = crosscoder.load(cc_dir / "crosscoder")
        table = pd.read_parquet(cc_dir / "latents.parquet")
        live = table.loc[table["firing_frequency"] > 0, "latent"].to_numpy()
        draws = recovery.random_latents(np.setdiff1d(live, cc_top), len(cc_top), args.n_random, args.seed)
        targets["crosscoder_top5_mi_only"] = recovery.crosscoder_patch(cc, cc_top)
        nulls["crosscoder_top5_mi_only"] = [recovery.crosscoder_patch(cc, d) for d in draws]
        notes["crosscoder_top5_mi_only"] = [int(v) for v in cc_top]
    if dsae is not None and not dsae.get("identical"):
        sae = files.load(dsae_dir / "sae")
        chosen = dsae["top_latents"]
        pool = np.setdiff1d(np.asarray(dsae["live_latents"]), chosen)
        draws = recovery.random_latents(pool, len(chosen), args.n_random, args.seed)
        targets["diff_sae_top5"] = recovery.sae_patch(sae, chosen)
        nulls["diff_sae_top5"] = [recovery.sae_patch(sae, d) for d in draws]
        notes["diff_sae_top5"] = chosen
    if adl_direction is not None and np.linalg.norm(adl_direction) > 0:
        norm = np.linalg.norm(adl_direction)
        targets["adl_data_direction"] = recovery.vector_patch(adl_direction)
        randoms = [rng.standard_normal(len(adl_direction)) for _ in range(args.n_random)]
        nulls["adl_data_direction"] = [recovery.vector_patch(r / np.linalg.norm(r) * norm) for r in randoms]
    result = recovery.measure(
        base, tuned, tokenizer, samples, layer, targets, nulls, 8, "cpu", args.max_length, progress=False
    )
    result["notes"] = notes
    return result


# --------------------------------------------------------------------------- table


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if not np.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/planted/table.json")
    parser.add_argument("--work", default="/tmp/planted")
    parser.add_argument("--model", default=str(ROOT / "results/models/M0"))
    parser.add_argument("--samples", default=str(ROOT / "results/data/D0/samples.parquet"))
    parser.add_argument("--config", default=str(ROOT / "config/config.yaml"))
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--token", default=" the", help="the token class the edit reads (one token)")
    parser.add_argument("--ratio", type=float, default=0.3, help="edit size on class tokens / their residual norm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--construct-samples", type=int, default=120, help="train samples that define v and alpha")
    parser.add_argument("--cc-expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--recovery-samples", type=int, default=16)
    parser.add_argument("--n-random", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = cfglib.load(args.config, check_depth=False)
    samples = pd.read_parquet(args.samples)
    eval_samples = samples[samples["split"] == "eval"].sort_values("sample_id")
    record: dict = {"args": vars(args)}

    # 1-2. the planted model and the identical control
    say("building M1 (planted) and M1c (copy of M0)")
    built = build_planted(args, samples, work)
    u = built["u"]
    record["construction"] = built["edit"]

    m0, tokenizer = models.load(args.model)
    m1, _ = models.load(work / "M1")
    m1c, _ = models.load(work / "M1c")
    ppl0 = perplexity(m0, tokenizer, eval_samples, args.max_length)
    ppl1 = perplexity(m1, tokenizer, eval_samples, args.max_length)
    record["construction"].update(ppl_m0_eval=ppl0, ppl_m1_eval=ppl1, ppl_change=ppl1 / ppl0 - 1)
    say(f"perplexity on eval texts: M0 {ppl0:.3f}, M1 {ppl1:.3f} ({100 * (ppl1 / ppl0 - 1):+.2f}%)")

    # 3. the same texts under the three models
    job_opts = dict(cfg["activations"], max_length=args.max_length)
    stores = {}
    for name, folder in (("M0", args.model), ("M1", work / "M1"), ("M1c", work / "M1c")):
        job = {"model": name, "data": "D0", "layers": [args.layer], "hook_points": [HOOK], "activations": job_opts}
        activations.extract(job, folder, args.samples, work / "acts" / name, place="cpu", progress=False)
        stores[name] = ActivationStore(work / "acts" / name / site_dir(args.layer, HOOK))
    say(f"extracted: {stores['M0'].n_tokens('train')} train + {stores['M0'].n_tokens('eval')} eval tokens per model")
    planted = PairedStore([stores["M0"], stores["M1"]], names=["M0", "M1"])
    control = PairedStore([stores["M0"], stores["M1c"]], names=["M0", "M1c"])
    masks = {}
    for split in ("train", "eval"):
        mask, delta = edited_mask(planted, split)
        masks[split] = mask
        on = torch.from_numpy(mask["edited"].to_numpy().copy())
        is_class = mask["token_id"].to_numpy() == built["edit"]["token_id"]
        record["construction"][f"{split}_fraction_moved_gt_10pct"] = float(mask["edited"].mean())
        record["construction"][f"{split}_class_fraction"] = float(is_class.mean())
        record["construction"][f"{split}_moved_that_are_class"] = (
            float(is_class[on.numpy()].mean()) if on.any() else float("nan")
        )
        record["construction"][f"{split}_class_that_moved"] = float(mask["edited"].to_numpy()[is_class].mean())
        record["construction"][f"{split}_rel_move_median_class"] = float(np.median(mask["rel_move"][is_class]))
        record["construction"][f"{split}_rel_move_median_other"] = float(np.median(mask["rel_move"][~is_class]))
        if on.any():
            record["construction"][f"{split}_abs_cos_mean_delta_edited_u"] = float(
                abs(cos_with(delta[on].mean(0)[None], u)[0])
            )
            record["construction"][f"{split}_mean_abs_cos_delta_edited_u"] = float(
                np.abs(cos_with(delta[on], u)).mean()
            )
        record["construction"][f"{split}_share_of_diff_energy_along_u"] = float(
            (delta @ u.double()).pow(2).sum() / delta.pow(2).sum().clamp_min(1e-300)
        )
    # the planted change as it arrives at the layer: blocks after the edit answer u with their own writes, so
    # the mean difference over the edited train tokens is the second reference direction ("true")
    train_mask, train_delta = edited_mask(planted, "train")
    true_dir = train_delta[torch.from_numpy(train_mask["edited"].to_numpy().copy())].mean(0).float()
    record["construction"]["abs_cos_true_dir_u"] = float(abs(cos_with(true_dir[None], u)[0]))
    control_max = float(control.all("eval")["acts"].diff(dim=1).abs().max())
    record["construction"]["control_max_abs_diff_eval"] = control_max
    say(f"construction: {json.dumps(record['construction'])}")

    # 4. methods
    results: dict = {"planted": {}, "control": {}}
    for pair_name, paired, tuned_store, tuned_model in (
        ("planted", planted, stores["M1"], m1),
        ("control", control, stores["M1c"], m1c),
    ):
        res = results[pair_name]
        say(f"[{pair_name}] crosscoder")
        res["crosscoder"] = run_crosscoder(paired, u, work / pair_name / "crosscoder", args, true_dir)
        say(f"[{pair_name}] crosscoder: {json.dumps({k: v for k, v in res['crosscoder'].items()})}")
        for arch in ("batchtopk", "topk"):
            say(f"[{pair_name}] diff-SAE {arch}")
            res[f"diff_sae_{arch}"] = run_diff_sae(
                stores["M0"], tuned_store, u, work / pair_name / f"diff_sae_{arch}", args, arch, cfg, samples,
                tuned_model, tokenizer, true_dir,
            )  # fmt: skip
            shown = {k: v for k, v in res[f"diff_sae_{arch}"].items() if k != "live_latents"}
            say(f"[{pair_name}] diff-SAE {arch}: {json.dumps(shown)}")
        say(f"[{pair_name}] ADL")
        text_sets = {
            "neutral": lens.neutral_texts(ROOT / "resources/prompts/neutral.txt"),
            "data": samples[samples["split"] == "train"].sort_values("sample_id")["text"].astype(str).tolist(),
        }
        res["adl"] = run_adl(m0, tuned_model, tokenizer, text_sets, u, args.layer, 5, true_dir)
        say(
            f"[{pair_name}] ADL: "
            + json.dumps(
                {k: {kk: vv for kk, vv in v.items() if kk != "direction"} for k, v in res["adl"]["sets"].items()}
            )
        )
        say(f"[{pair_name}] per-token KL")
        res["kl"] = run_kl(
            m0, tuned_model, tokenizer, eval_samples, masks["eval"] if pair_name == "planted" else None,
            args.max_length, built["edit"]["token_id"],
        )  # fmt: skip
        say(f"[{pair_name}] KL: {json.dumps(res['kl'])}")
        if pair_name == "planted":
            say(f"[{pair_name}] KL recovery")
            res["recovery"] = run_recovery(
                m0, tuned_model, tokenizer, eval_samples.head(args.recovery_samples), args.layer, u,
                work / pair_name / "crosscoder", res["crosscoder"]["top_latents"],
                work / pair_name / "diff_sae_batchtopk", res["diff_sae_batchtopk"],
                res["adl"]["sets"]["data"]["direction"], args,
            )  # fmt: skip
            say(f"[{pair_name}] recovery: {json.dumps(res['recovery'])}")
        else:
            res["recovery"] = {"skipped": "identical models: KL is 0, recovery undefined"}

    # 5. the table
    p, c = results["planted"], results["control"]
    rec = p["recovery"]["targets"]

    def rec_cell(name):
        block = rec.get(name)
        if block is None:
            return "-"
        null = f" (null med {fmt(block.get('null_median'))}, p {fmt(block.get('null_p'))})" if "null" in block else ""
        return f"{fmt(block['recovery'])}{null}"

    rows = [
        {
            "method": "crosscoder (batchtopk)",
            "found": p["crosscoder"]["found"],
            "abs_cos": p["crosscoder"]["abs_cos_top5_best"],
            "rank": p["crosscoder"]["rank_of_found"],
            "extra": f"best |cos| {fmt(p['crosscoder']['best_abs_cos'])} latent {p['crosscoder']['best_latent']} "
            f"class {p['crosscoder']['best_class']} label {p['crosscoder']['best_label']} "
            f"mi_only rank {fmt(p['crosscoder']['best_mi_only_rank'])}; n mi_only {p['crosscoder']['n_mi_only']}; "
            f"top-5 |cos true| {fmt(p['crosscoder']['abs_cos_true_top5_best'])}; {p['crosscoder']['n_moved']} moved, "
            f"top-5 moved |cos u| {fmt(p['crosscoder']['abs_cos_moved_top5_best'])}, "
            f"|cos true| {fmt(p['crosscoder']['abs_cos_true_moved_top5_best'])}",
            "kl_recovery": rec_cell("crosscoder_top5_mi_only"),
            "control": f"mi_only latents (false alarms) {c['crosscoder']['n_mi_only']}, "
            f"moved {c['crosscoder']['n_moved']}",
        },
        *[
            {
                "method": f"diff-SAE ({arch})",
                "found": p[f"diff_sae_{arch}"]["found"],
                "abs_cos": p[f"diff_sae_{arch}"]["abs_cos_top5_best"],
                "rank": p[f"diff_sae_{arch}"]["rank_of_found"],
                "extra": f"best |cos| {fmt(p[f'diff_sae_{arch}']['best_abs_cos'])} at share rank "
                f"{p[f'diff_sae_{arch}']['best_rank']}; FVU {fmt(p[f'diff_sae_{arch}']['fvu'])}; "
                f"top-5 |cos true| {fmt(p[f'diff_sae_{arch}']['abs_cos_true_top5_best'])}",
                "kl_recovery": rec_cell("diff_sae_top5") if arch == "batchtopk" else "-",
                "control": f"identical {c[f'diff_sae_{arch}'].get('identical')}, "
                f"latents {c[f'diff_sae_{arch}'].get('n_latents')}",
            }
            for arch in ("batchtopk", "topk")
        ],
        {
            "method": "ADL (n_positions 5)",
            "found": p["adl"]["found"],
            "abs_cos": max(v["abs_cos"] for v in p["adl"]["sets"].values()),
            "rank": None,
            "extra": "; ".join(
                f"{k}: |cos| {fmt(v['abs_cos'])}, |cos true| {fmt(v['abs_cos_true'])}, norm {fmt(v['direction_norm'])}"
                for k, v in p["adl"]["sets"].items()
            ),
            "kl_recovery": rec_cell("adl_data_direction"),
            "control": "norm " + ", ".join(f"{k} {v['direction_norm']:.3g}" for k, v in c["adl"]["sets"].items()),
        },
        {
            "method": "per-token KL",
            "found": p["kl"]["found"],
            "abs_cos": None,
            "rank": None,
            "extra": f"mean KL {p['kl']['mean_kl']:.4g}; top-50 edited {fmt(p['kl']['top50_edited_fraction'])} "
            f"vs base {fmt(p['kl']['edited_base_rate'])}; top-50 class {fmt(p['kl']['top50_class_fraction'])} "
            f"vs base {fmt(p['kl']['class_base_rate'])}",
            "kl_recovery": f"oracle u-projection {rec_cell('oracle_u')}",
            "control": f"mean KL {c['kl']['mean_kl']:.3g}, max {c['kl']['max_kl']:.3g}",
        },
    ]
    print()
    header = ["method", "found", "|cos|", "rank", "KL recovery", "control", "details"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        cells = [r["method"], fmt(r["found"]), fmt(r["abs_cos"]), fmt(r["rank"]), r["kl_recovery"], r["control"]]
        print(" | ".join(cells + [r["extra"]]))
    for res in results.values():
        for block in res["adl"]["sets"].values():
            block["direction"] = [float(x) for x in block["direction"]]
    record.update(rows=rows, results=results, runtime_s=time.perf_counter() - START)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    say(f"wrote {out}")
    found = {
        "crosscoder": p["crosscoder"]["found"],
        "diff_sae": p["diff_sae_batchtopk"]["found"],
        "adl": p["adl"]["found"],
        "kl": p["kl"]["found"],
    }
    print("planted: " + " ".join(f"{k}={str(v).lower()}" for k, v in found.items()))


if __name__ == "__main__":
    main()
