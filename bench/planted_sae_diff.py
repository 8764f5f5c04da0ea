"""The SAE diff on a change planted on purpose in the real model, beside an identical-model control.

The planted model is ``bench/planted_diffing.py``'s: SmolLM2-135M-Instruct (the demo's M0) with a
rank-1 edit to block 10's MLP that writes a fixed random direction u into the residual stream on
the token " the" (0.3 of the layer-12 norm there); M1c is a byte copy of M0. All three read the
same texts (the demo's D0 samples); layer 12 resid_post is extracted for each (reused from
``--work`` when there, built otherwise).

Each model's cell gets the demo's ``topk`` SAE, trained as the workflow trains a cell (the config's
training block and init seed); M1c's SAE with another data-order seed, as the calibration partner
is, so the control is not bit-identical. Both pairs are labelled as a step of the grid is
(``diff.compare``: the demo's layer-12 thresholds from the resampling null, the presence test paired
on the same texts) and every flagged feature is ordered by ``diff.ranked`` (activation mass moved).

Passes, as issue 18 puts them: a feature labelled born or changed has |cos| >= 0.7 with the planted
direction as it arrives at the layer (the mean M1 − M0 difference on edited train tokens; also
reported against u) and ranks in the top 5 of the ordering; its top activations fall on trigger
tokens; the identical control labels at most 1% of live features as anything but "same".

    python bench/planted_sae_diff.py [--work /tmp/planted] [--threads 2]   (after `make run`)

Everything is written under ``--work``; nothing in results/ is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_diffing import HOOK, build_planted, cos_with, edited_mask  # noqa: E402

from sae_diff import activations, diff, presence  # noqa: E402
from sae_diff import config as cfglib  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.grid import site_dir  # noqa: E402
from sae_diff.io import read_json  # noqa: E402
from sae_diff.models import set_threads  # noqa: E402
from sae_diff.paired import PairedStore  # noqa: E402
from sae_diff.sae import files  # noqa: E402
from sae_diff.sae.train import spec_from_config, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOUND_COS = 0.7
TOP = 5
TRIGGER_TOP = 20  # a feature's top activations checked for the trigger token
START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def stores_for(args, samples: pd.DataFrame, cfg: dict) -> dict:
    """M0, M1 (planted) and M1c (copy) at the layer: reused from ``--work`` or built."""
    work = Path(args.work)
    folders = {name: work / "acts" / name / site_dir(args.layer, HOOK) for name in ("M0", "M1", "M1c")}
    if not all((f / "manifest.json").exists() for f in folders.values()) or not (work / "edit.pt").exists():
        say("building M1 (planted) and M1c (copy of M0), extracting the layer")
        build_planted(args, samples, work)
        job_opts = dict(cfg["activations"], max_length=args.max_length)
        for name, folder in (("M0", args.model), ("M1", work / "M1"), ("M1c", work / "M1c")):
            job = {"model": name, "data": "D0", "layers": [args.layer], "hook_points": [HOOK], "activations": job_opts}
            activations.extract(job, folder, args.samples, work / "acts" / name, place="cpu", progress=False)
    return {name: ActivationStore(folder) for name, folder in folders.items()}


def train_cell(store: ActivationStore, cfg: dict, name: str, out: Path, order_seed: int) -> object:
    block = cfg["saes"][name]
    spec = spec_from_config(name, block, store.d_model, None, store.manifest["hook_name"], "", "M", None)
    opts = cfg["training"]
    train(store, [spec], [out], n_tokens=opts["tokens"], batch_size=opts["batch_size"],
          shuffle_buffer=opts["shuffle_buffer"], seed=order_seed, checkpoint_every=0, epochs=opts["epochs"],
          progress=False)  # fmt: skip
    return files.load(out)


def trigger_precision(sae, side_tokens: presence.Tokens, feature: int, token_ids: np.ndarray, trigger) -> float:
    """Share of the feature's ``TRIGGER_TOP`` largest activations (on its own cell's eval tokens)
    that fall on the trigger token (``trigger``: one token id, or a list of them)."""
    with torch.no_grad():
        acts = sae.encode(side_tokens.acts.float())[:, feature].numpy()
    top = np.argsort(-acts)[:TRIGGER_TOP]
    top = top[acts[top] > 0]
    return float(np.isin(token_ids[top], trigger).mean()) if len(top) else float("nan")


def not_same_share(table: pd.DataFrame) -> tuple[float, int]:
    """Share of a labelled diff's live features (every label but inactive) not labelled "same"
    (changed, unmatched among them, or died), and the live count."""
    live = int((table["label"] != "inactive").sum())
    return float(table["label"].isin(["changed", "died"]).sum() / max(live, 1)), live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/planted")
    parser.add_argument("--model", default=str(ROOT / "results/models/M0"))
    parser.add_argument("--samples", default=str(ROOT / "results/data/D0/samples.parquet"))
    parser.add_argument("--config", default=str(ROOT / "config/config.yaml"))
    parser.add_argument("--sae", default="topk")
    parser.add_argument("--calibration", default=str(ROOT / "results/calibration/layer12/topk.json"))
    # the construction's settings: bench/planted_diffing.py's defaults
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--token", default=" the")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--construct-samples", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    set_threads(args.threads)
    cfg = cfglib.load(args.config, check_depth=False)
    samples = pd.read_parquet(args.samples)
    stores = stores_for(args, samples, cfg)
    edit = torch.load(Path(args.work) / "edit.pt")
    u = edit["u"]
    info = read_json(Path(args.work) / "M1" / "sae_diff_model.json")["edit"]
    trigger = int(info["token_id"])
    mask, delta = edited_mask(PairedStore([stores["M0"], stores["M1"]], names=["M0", "M1"]), "train")
    arrived = delta[torch.from_numpy(mask["edited"].to_numpy().copy())].mean(0).float()
    thresholds = diff.Thresholds(**read_json(args.calibration)["thresholds"])
    absent_below = cfg["diff"]["absent_below"]
    tokens = {name: presence.eval_tokens(store, samples) for name, store in stores.items()}
    token_ids = {name: store.all("eval", key="token_ids").numpy() for name, store in stores.items()}
    say(f"{stores['M0'].n_tokens('train')} train / {stores['M0'].n_tokens('eval')} eval tokens per model; "
        f"|cos(arrived, u)| {abs(cos_with(arrived[None], u)[0]):.3f}")  # fmt: skip

    record: dict = {"construction": info, "thresholds": thresholds.to_dict(), "absent_below": absent_below}
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        seed = cfg["training"]["seed"]
        saes = {
            "M0": train_cell(stores["M0"], cfg, args.sae, Path(scratch) / "M0", seed),
            "M1": train_cell(stores["M1"], cfg, args.sae, Path(scratch) / "M1", seed),
            "M1c": train_cell(stores["M1c"], cfg, args.sae, Path(scratch) / "M1c", seed + 1),
        }
    say("trained the three cells' SAEs")
    for pair in ("M1", "M1c"):
        table, summary = diff.compare(
            saes["M0"], saes[pair], tokens["M0"], tokens[pair], thresholds, False,
            cfg["diff"]["norm_collapse"], absent_below,
        )  # fmt: skip
        order = diff.ranked(table, summary)
        dec = {"a": diff.unit_rows(saes["M0"].W_dec), "b": diff.unit_rows(saes[pair].W_dec)}
        rows = np.stack([dec[s][f] for s, f in zip(order["side"], order["feature"])] or [np.zeros(len(u))])
        order["abs_cos_arrived"] = np.abs(cos_with(rows, arrived))[: len(order)]
        order["abs_cos_u"] = np.abs(cos_with(rows, u))[: len(order)]
        share, live = not_same_share(table)
        counts = summary["counts"]
        out = {
            "paired_tokens": summary["paired_tokens"],
            "counts": counts,
            "live": live,
            "not_same_share": share,
            "n_flagged": len(order),
            "top": order.head(10).to_dict("records"),
        }
        candidates = order[order["label"].isin(["born", "changed"])]
        if len(candidates):
            best = int(candidates["abs_cos_arrived"].to_numpy().argmax())
            row = candidates.iloc[best]
            side_cell = "M0" if row["side"] == "a" else pair
            sae = saes["M0"] if row["side"] == "a" else saes[pair]
            out["best"] = {
                "side": row["side"],
                "feature": int(row["feature"]),
                "label": row["label"],
                "rank": int(candidates.index[best]) + 1,
                "abs_cos_arrived": float(row["abs_cos_arrived"]),
                "abs_cos_u": float(row["abs_cos_u"]),
                "trigger_precision": trigger_precision(
                    sae, tokens[side_cell], int(row["feature"]), token_ids[side_cell], trigger
                ),
            }
            best = out["best"]
            out["found"] = bool(best["abs_cos_arrived"] >= FOUND_COS and best["rank"] <= TOP)
        record[pair] = out
        say(f"{pair}: {json.dumps({k: v for k, v in out.items() if k != 'top'})}")
        print(order.head(10).to_string(), flush=True)
    if args.out:
        args.out.write_text(json.dumps(record, indent=2, default=float))
    planted, control = record["M1"], record["M1c"]
    print(
        f"planted_sae_diff found={planted.get('found', False)} "
        f"best_cos={planted.get('best', {}).get('abs_cos_arrived', float('nan')):.3f} "
        f"rank={planted.get('best', {}).get('rank')} control_not_same={control['not_same_share']:.4f}"
    )


if __name__ == "__main__":
    main()
