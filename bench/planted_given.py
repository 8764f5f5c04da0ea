"""The model-level planted change through the workflow: `config/examples/planted.yaml` (M1 = M0 with a
fixed direction u added to the input embeddings of four trigger characters, given as a user's
checkpoint, the same texts for both models; `resources/examples/planted/make.py`) run by Snakemake to
`results/summary.json`, and its SAE diffs scored against what was planted
(`resources/examples/planted/planted.json`).

What is scored, as issue 18 puts it:
- **the planted pair**, M0_D1 vs M1_D1 (the grid's model-effect pair: same tokens, other model):
  among the flagged features in the tool's own order (``diff.ranked``: activation mass moved), the
  best born / changed one of the top 5 by |cos| with the change as it arrives at the layer (the mean
  M1 − M0 difference on trigger tokens, eval split), its rank and the share of its 20 largest
  activations that fall on trigger tokens. Found: |cos| ≥ 0.7 in the top 5;
- **the identical controls**: M0_D0 vs M0_D1 (the grid's data-effect pair: D1 is D0's table again, so
  the same model on the same tokens) and the calibration's seed pair (M0_D0's SAE against one
  trained with other seeds on the same data: an identical model whose SAE differs): the share of
  live features labelled anything but "same" (issue 18: at most 1%);
- the run's own verdicts: ``headline.evolution.model_effect`` and ``data_effect`` (observed against
  the resampling null's range, called or not) and the convergence flag;
- **every same-token method** on M1 against M0 (planted) and on M2 against M0 (M2 is M0's own
  checkpoint: the identical-model control), with ``bench/planted_diffing.py``'s criteria: the
  crosscoder finds the change when a top-5 M1-only latent's M1 decoder has |cos| ≥ 0.7 with it, or
  a top-5 latent by ``moved_rank`` moves along it (``crosscoder.moved_vectors``) at |cos| ≥ 0.7, the
  diff-SAE when a top-5 latent by share does, the lens when its direction does on either text set,
  per-token KL when at least half of the 50 largest-KL eval tokens are triggers and that is at least
  twice their base rate. On the control: how many latents each flags, the lens's norm, the KL.

    python bench/planted_given.py [--work /tmp/planted_given] [--fresh]    (about 4 minutes on 2 cores)
    python bench/planted_given.py --work /tmp/planted_given_seed1 --overlay bench/second_seed.yaml

The run lives under ``--work`` (reused when its summary.json is there; ``--fresh`` reruns it);
nothing in this checkout's results/ is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from planted_diffing import cos_with, kl_found  # noqa: E402
from planted_sae_diff import FOUND_COS, TOP, not_same_share, trigger_precision  # noqa: E402

from sae_diff import config as cfglib  # noqa: E402
from sae_diff import diff, presence  # noqa: E402
from sae_diff import grid as grid_lib  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.io import read_json  # noqa: E402
from sae_diff.sae import files  # noqa: E402

CONFIG = ROOT / "config/examples/planted.yaml"
PLANTED = ROOT / "resources/examples/planted/planted.json"
START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def run_workflow(work: Path, cores: int, overlays: list[Path]) -> None:
    """Snakemake on the example (with ``overlays`` laid over it), in ``work`` (a list of arguments:
    no shell string)."""
    configs = [str(CONFIG), *(str(Path(p).resolve()) for p in overlays)]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), "--configfile",
           *configs, "--cores", str(cores), "--max-threads", "1", "results/summary.json"]  # fmt: skip
    log = work / "snakemake.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # sae-diff
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the workflow failed ({done.returncode}); see {log}")


def same_token_methods(work: Path, pair: str, layer: int, arrived: np.ndarray, triggers: list[int]) -> dict:
    """Each same-token method's outputs for ``pair`` (M0_Di__Mi_Di) at ``layer``, scored against the
    arrived change (unit vector) and the trigger token ids."""
    from safetensors.numpy import load_file

    from sae_diff import crosscoder

    u = torch.from_numpy(arrived)

    def folder(method: str, per_layer: bool = True) -> Path:
        return work / grid_lib.diffing_dir(method, pair, layer if per_layer else None)

    out = {}
    table = pd.read_parquet(folder("crosscoder") / "latents.parquet")
    mi_only = crosscoder.ranked_mi_only(table, TOP)
    cc = crosscoder.load(folder("crosscoder") / "crosscoder", dtype=torch.float64)
    cos = [float(c) for c in np.abs(cos_with(cc.W_dec.detach()[mi_only["latent"].tolist(), -1], u))]
    out["crosscoder"] = {"n_mi_only": int((table["class"] == "mi_only").sum()), "best_abs_cos": max(cos, default=None)}
    if "moved_rank" in table:  # the change riding on latents both models keep: the top 5 by moved_rank
        moved = crosscoder.ranked_moved(table, TOP)
        rows = crosscoder.moved_vectors(cc, moved["mean_activation"].to_numpy(), moved["latent"].to_numpy())
        moved_cos = [float(c) for c in np.abs(cos_with(rows, u))]
        out["crosscoder"].update(
            n_moved=int(table["moved_rank"].notna().sum()), best_moved_abs_cos=max(moved_cos, default=None)
        )
    metrics = read_json(folder("diff_sae") / "metrics.json")
    if metrics.get("identical"):
        out["diff_sae"] = {"identical": True, "n_latents": 0, "best_abs_cos": None}
    else:
        latents = pd.read_parquet(folder("diff_sae") / "latents.parquet").sort_values("rank").head(TOP)
        rows = files.load(folder("diff_sae") / "sae").W_dec.detach()[latents["latent"].tolist()]
        out["diff_sae"] = {"identical": False, "best_abs_cos": float(np.abs(cos_with(rows, u)).max())}
    directions = load_file(str(folder("adl") / "adl.safetensors"))
    lens_cos = {}
    for text_set in ("neutral", "data"):
        v = directions[f"{text_set}.direction"].astype(np.float64)
        lens_cos[text_set] = None if not np.linalg.norm(v) else abs(float(v @ arrived / np.linalg.norm(v)))
    out["adl"] = {
        "abs_cos": lens_cos,
        "norm": {k: float(np.linalg.norm(directions[f"{k}.direction"])) for k in lens_cos},
    }
    tokens = pd.read_parquet(folder("kl", per_layer=False) / "tokens.parquet")
    top = tokens.nlargest(50, "kl_tuned_base")
    out["kl"] = {
        "mean_kl": float(tokens["kl_tuned_base"].mean()),
        "top50_trigger_share": float(top["token_id"].isin(triggers).mean()),
        "base_rate": float(tokens["token_id"].isin(triggers).mean()),
    }
    out["found"] = {
        "crosscoder": max(cos + [out["crosscoder"].get("best_moved_abs_cos") or 0.0], default=0.0) >= FOUND_COS,
        "diff_sae": (out["diff_sae"]["best_abs_cos"] or 0) >= FOUND_COS,
        "adl": any((c or 0) >= FOUND_COS for c in lens_cos.values()),
        "kl": kl_found(out["kl"]["top50_trigger_share"], out["kl"]["base_rate"]),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/planted_given"))
    parser.add_argument("--fresh", action="store_true", help="rerun the workflow even when a summary is there")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the scores here (JSON)")
    parser.add_argument("--overlay", type=Path, nargs="*", default=[],
                        help="config files laid over the example, e.g. bench/second_seed.yaml (other seeds for "
                        "every SAE, their data order and the diff-SAE); use a --work of its own")  # fmt: skip
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh or not (work / "results/summary.json").exists():
        say(f"running the example in {work}")
        run_workflow(work, args.cores, args.overlay)
    say("scoring")
    planted = read_json(PLANTED)
    triggers = planted["token_ids"]
    results = work / grid_lib.RESULTS
    cfg = cfglib.load(CONFIG, check_depth=False)  # the example's one layer, hook point and SAE
    (cfg_layer,), (hook,), (sae_name,) = cfg["layers"], cfg["hook_points"], list(cfg["saes"])
    site = grid_lib.site_dir(cfg_layer, hook)

    def at(path: str) -> Path:  # a grid path (relative to the run's folder) inside the run
        return work / path

    a, b = grid_lib.Cell("M0", "D1"), grid_lib.Cell("M1", "D1")
    stores = {cell.name: ActivationStore(at(grid_lib.activations_dir(cell)) / site) for cell in (a, b)}
    samples = pd.read_parquet(at(grid_lib.samples("D1")))
    tokens = {name: presence.eval_tokens(store, samples) for name, store in stores.items()}
    if not tokens[a.name].same_as(tokens[b.name]):  # the scoring below reads one token list for both
        raise SystemExit(f"{a.name} and {b.name} do not hold the same eval tokens: is D1 D0's table again?")
    token_ids = tokens[b.name].identity[:, 2]
    on_trigger = torch.from_numpy(np.isin(token_ids, triggers))
    arrived = (tokens[b.name].acts.double() - tokens[a.name].acts.double())[on_trigger].mean(0)
    arrived = (arrived / arrived.norm()).numpy()
    saes = {cell.name: files.load(at(grid_lib.sae_dir(cell, cfg_layer, sae_name))) for cell in (a, b)}
    folder = at(grid_lib.diff_dir(a, b, cfg_layer))
    table = pd.read_parquet(folder / f"{sae_name}.parquet")
    summary = read_json(folder / f"{sae_name}.json")
    order = diff.ranked(table, summary).reset_index(drop=True)
    side_cell = {"a": a.name, "b": b.name}
    units = {name: diff.unit_rows(sae.W_dec) for name, sae in saes.items()}
    order["abs_cos_arrived"] = [
        abs(float(units[side_cell[s]][f] @ arrived)) for s, f in zip(order["side"], order["feature"])
    ]
    order["trigger_precision"] = [
        trigger_precision(saes[side_cell[s]], tokens[side_cell[s]], int(f), token_ids, triggers)
        for s, f in zip(order["side"], order["feature"])
    ]
    order.insert(0, "rank", np.arange(1, len(order) + 1))
    top = order.head(TOP)
    candidates = top[top["label"].isin(["born", "changed"])]
    best = candidates.loc[candidates["abs_cos_arrived"].idxmax()] if len(candidates) else None
    planted_share, live = not_same_share(table)
    record = {
        "trigger_share_of_eval_tokens": float(on_trigger.float().mean()),
        "planted": {
            "counts": summary["counts"],
            "not_same_share": planted_share,
            "live": live,
            "top": order.head(10).to_dict("records"),
            "best": None if best is None else {k: (v.item() if hasattr(v, "item") else v) for k, v in best.items()},
            "found": bool(best is not None and best["abs_cos_arrived"] >= FOUND_COS),
        },
    }
    identical_dir = at(grid_lib.diff_dir(grid_lib.Cell("M0", "D0"), a, cfg_layer))
    identical = read_json(identical_dir / f"{sae_name}.json")
    share, live = not_same_share(pd.read_parquet(identical_dir / f"{sae_name}.parquet"))
    calibration = read_json(at(grid_lib.calibration_json(cfg_layer, sae_name)))
    record["identical_model_and_data"] = {"counts": identical["counts"], "not_same_share": share, "live": live}
    record["identical_model_other_seed"] = {"not_same_share": calibration["changed_fraction"]}
    record["same_token"] = {
        "planted": same_token_methods(work, grid_lib.pair_name(a, b), cfg_layer, arrived, triggers),
        "identical": same_token_methods(work, grid_lib.pair_name(grid_lib.Cell("M0", "D2"), grid_lib.Cell("M2", "D2")),
                                        cfg_layer, arrived, triggers),
    }  # fmt: skip
    headline = read_json(results / "summary.json")["headline"]["evolution"]
    record["headline"] = {key: headline[key] for key in ("model_effect", "data_effect", "converged", "null_pairs")}

    print(order.head(10).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print("| case | pair | counts | not 'same' (live) | best born / changed of the top 5: rank, label, "
          "\\|cos arrived\\|, top-20 on triggers | found (\\|cos\\| ≥ 0.7, top 5) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    best_text = "–" if best is None else (
        f"{best['rank']}, {best['label']}, {best['abs_cos_arrived']:.2f}, {best['trigger_precision']:.0%}"
    )  # fmt: skip
    print(f"| planted | M0_D1 vs M1_D1 | {summary['counts']} | {planted_share:.1%} ({record['planted']['live']}) | "
          f"{best_text} | {'**yes**' if record['planted']['found'] else 'no'} |")  # fmt: skip
    print(f"| identical model and data | M0_D0 vs M0_D1 | {identical['counts']} | {share:.1%} ({live}) | – | – |")
    print(f"| identical model, SAE of other seeds | calibration seed pair | – | "
          f"{calibration['changed_fraction']:.1%} | – | – |")  # fmt: skip
    for effect in ("model_effect", "data_effect"):
        for layer, labels in headline[effect].items():
            cells = ", ".join(
                f"{label} {v['observed']} [{v['null_low']:.1f}, {v['null_high']:.1f}]{' called' if v['called'] else ''}"
                for label, v in labels.items()
            )
            print(f"headline {effect} {layer}: {cells}")
    print(f"converged: {headline['converged']}, null pairs: {headline['null_pairs']}")
    print()
    planted_st, control = record["same_token"]["planted"], record["same_token"]["identical"]
    print("| method | planted (M1 vs M0): found, how | identical model (M2 = M0): what it flags |")
    print("|---|---|---|")
    cc, cc0 = planted_st["crosscoder"], control["crosscoder"]
    cc_best = "–" if cc["best_abs_cos"] is None else f"{cc['best_abs_cos']:.2f}"
    moved_best = "–" if cc.get("best_moved_abs_cos") is None else f"{cc['best_moved_abs_cos']:.2f}"
    print(f"| crosscoder | {planted_st['found']['crosscoder']}: {cc['n_mi_only']} M1-only latents, best top-5 "
          f"\\|cos\\| {cc_best}; {cc.get('n_moved', '–')} moved latents, best top-5 moved \\|cos\\| {moved_best} | "
          f"{cc0['n_mi_only']} M2-only latents, {cc0.get('n_moved', '–')} moved |")  # fmt: skip
    ds, ds0 = planted_st["diff_sae"], control["diff_sae"]
    print(f"| diff-SAE | {planted_st['found']['diff_sae']}: best top-5 \\|cos\\| {ds['best_abs_cos']:.2f} | "
          f"{'identical activations: no latents' if ds0['identical'] else 'latents trained'} |")  # fmt: skip
    lc, lc0 = planted_st["adl"], control["adl"]
    cos_text = ", ".join(f"{k} {v:.2f}" for k, v in lc["abs_cos"].items() if v is not None)
    print(f"| activation-difference lens | {planted_st['found']['adl']}: \\|cos\\| {cos_text} | direction norm "
          f"{max(lc0['norm'].values()):.3g} |")  # fmt: skip
    kl, kl0 = planted_st["kl"], control["kl"]
    print(f"| per-token KL | {planted_st['found']['kl']}: {kl['top50_trigger_share']:.0%} of the top-50 KL tokens are "
          f"triggers (base rate {kl['base_rate']:.0%}) | mean KL {kl0['mean_kl']:.3g} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(record, indent=2, default=float))
    methods = " ".join(f"{method}={value}" for method, value in planted_st["found"].items())
    print(
        f"planted_given found={record['planted']['found']} {methods} "
        f"best_cos={np.nan if best is None else best['abs_cos_arrived']:.3f} "
        f"identical_not_same={share:.4f} seed_pair_not_same={calibration['changed_fraction']:.4f}"
    )


if __name__ == "__main__":
    main()
