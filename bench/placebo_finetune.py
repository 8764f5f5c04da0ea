"""Placebo fine-tunes against the demo's DPO rounds: what the SAE diff's model effect counts when
the model was fine-tuned as Mi was, on labels that carry no preference.

Placebo round i fine-tunes the previous placebo (M0 for round 1) with the demo's DPO settings
(the config's ``iterations.dpo``: steps, learning rate, beta, LoRA) on Mi's own preference pairs
(built from its ``pairs_from`` data as the workflow builds them) with chosen and rejected swapped
in a random half (seeded). Placebo i reads Di's texts, as Mi does in cell Mi_Di; its layer's
activations are extracted with the cells' settings and its SAE trained as a cell's is (the
config's SAE block and training seed). Then M0_Di → placebo i is labelled exactly as the model
effect M0_Di → Mi_Di is (``diff.compare``: the demo's thresholds from the resampling null, the
presence test paired on the same texts), and both are set against the resampling null
(``nulls.versus``).

The model effect of a real round is evidence of a change tied to its preference only where it
exceeds the placebo's; this is the paired null the resampling null (unpaired prompt halves) is not.

    python bench/placebo_finetune.py [--layer 12] [--rounds 2] [--work /tmp/placebo]   (after `make run`)

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_sae_diff import train_cell  # noqa: E402

from sae_diff import activations, diff, finetune, grid, nulls, presence  # noqa: E402
from sae_diff import config as cfglib  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.io import read_json  # noqa: E402
from sae_diff.models import set_threads  # noqa: E402
from sae_diff.sae import files  # noqa: E402

START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def shuffled(pairs: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The pairs with chosen and rejected swapped in a random half (the placebo's labels)."""
    out = pairs.copy()
    swap = np.random.default_rng(seed).permutation(len(out)) < len(out) // 2
    for a, b in (("chosen", "rejected"), ("chosen_score", "rejected_score"), ("chosen_sample", "rejected_sample")):
        out.loc[swap, [a, b]] = out.loc[swap, [b, a]].to_numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--sae", default="topk")
    parser.add_argument("--seed", type=int, default=0, help="which pairs are swapped (round i: seed + i)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default="/tmp/placebo")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    cfg = cfglib.load(args.config)
    it = cfg["iterations"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    site = grid.site_dir(args.layer, "resid_post")
    thresholds = diff.Thresholds(**read_json(grid.calibration_json(args.layer, args.sae))["thresholds"])
    null = read_json(grid.null_json(args.layer, args.sae))["pairs"]
    record, parent, last = {"null": null}, Path(grid.model_dir("M0")), ""
    for i in range(1, args.rounds + 1):
        source = cfg["models"][f"M{i}"]["pairs_from"]
        pairs = finetune.build_pairs(
            pd.read_parquet(grid.samples(source)), it["target"]["metric"], it["target"]["direction"],
            margin=it["pairs"]["margin"], missing=it["pairs"]["missing"],
            max_per_prompt=it["pairs"]["max_per_prompt"], where=it["target"].get("where"),
        )  # fmt: skip
        placebo = shuffled(pairs, args.seed + i)
        say(f"round {i}: {len(pairs)} pairs from {source}; {int((placebo['chosen'] != pairs['chosen']).sum())} swapped")
        model_dir = work / f"P{i}"
        if not (model_dir / "config.json").exists():
            done = finetune.dpo(parent, parent, placebo, it["dpo"], model_dir, progress=False)
            say(f"placebo round {i}: DPO loss {done['loss_first']:.4f} -> {done['loss_last']:.4f}")
        data = f"D{i}"
        job = {"model": f"P{i}", "data": data, "layers": [args.layer], "hook_points": ["resid_post"],
               "activations": cfg["activations"]}  # fmt: skip
        activations.extract(job, model_dir, grid.samples(data), work / f"acts_P{i}", progress=False)
        samples = pd.read_parquet(grid.samples(data))
        base_store = ActivationStore(Path(grid.activations_dir(f"M0_{data}")) / site)
        tokens_base = presence.eval_tokens(base_store, samples)
        store = ActivationStore(work / f"acts_P{i}" / site)
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            sae_p = train_cell(store, cfg, args.sae, Path(scratch) / f"P{i}", cfg["training"]["seed"])
        _, summary = diff.compare(
            files.load(grid.sae_dir(f"M0_{data}", args.layer, args.sae)), sae_p, tokens_base,
            presence.eval_tokens(store, samples), thresholds, False, cfg["diff"]["norm_collapse"],
            cfg["diff"]["absent_below"],
        )  # fmt: skip
        real = read_json(grid.diff_json(f"M0_{data}", f"M{i}_{data}", args.layer, args.sae))["counts"]
        record[f"round{i}"] = {"pairs": len(pairs), "placebo": summary["counts"], "real": real}
        for name, counts in (("placebo", summary["counts"]), (f"M{i}", real)):
            versus = nulls.versus(counts, null)
            shown = {k: f"{v['observed']} [{v['null_low']:.0f}, {v['null_high']:.0f}]{' CALLED' if v['called'] else ''}"
                     for k, v in versus.items()}  # fmt: skip
            print(f"layer {args.layer} M0_{data} -> {name} on {data}: {shown}; paired {summary['paired_tokens']}")
        last += (
            f" round{i}: died placebo {summary['counts'].get('died', 0)} real {real.get('died', 0)},"
            f" born placebo {summary['counts']['born']} real {real['born']};"
        )
        parent = model_dir
    (work / "placebo.json").write_text(json.dumps(record, indent=2, default=float))
    print(f"placebo_finetune layer={args.layer}{last}")


if __name__ == "__main__":
    main()
