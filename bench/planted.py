"""Planted changes recovered, and nothing else: the SAE diff against its resampling null on
synthetic worlds, at full size and graded change sizes, with seed replicates.

Each replicate (``sae_diff.synthetic.run``) trains cell A on D0 of a known sparse dictionary, the
resampling null on D0's prompt halves (5 pairs, thresholds from the null, leave one out), and cells
B of three worlds labelled against A through the unchanged train → diff code (matched weights, the
presence test of died / born on each cell's eval tokens):

    no_change   a disjoint sample of the same world
    placebo     the same, plus isotropic noise of the planted change's mean norm per token
    planted     n features rotated (to cos 0.3), n removed, n added

Per change size it prints, over the replicates: how often each world's step is called (any label
outside the null on the side of change) and how many (world, label) calls there were; for the
planted world the AUROC of A's latents tied to a touched feature against the rest (1 − matched
cosine), the rate at which latents of untouched features are labelled 'changed' (nominal: the 5%
quantile the thresholds are set at) or 'died', the share of removed features' latents labelled
died (the presence test), and the share of added features' latents labelled born.

    python bench/planted.py [--replicates 5] [--sizes 2 4 8] [--out /tmp/planted.json]

Nothing is written outside a temporary folder (and --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sae_diff import synthetic  # noqa: E402
from sae_diff.models import set_threads  # noqa: E402


def summarise(runs: list[dict]) -> dict:
    out = {}
    for name in ("no_change", "placebo", "planted"):
        records = [r["worlds"][name] for r in runs]
        out[name] = {
            "steps_called": sum(any(c["called"] for c in rec["counts"].values()) for rec in records),
            "label_calls": {
                label: sum(rec["counts"][label]["called"] for rec in records) for label in records[0]["counts"]
            },
            "excess_mean": {
                label: float(np.mean([rec["counts"][label]["excess"] for rec in records]))
                for label in records[0]["counts"]
            },
        }
    planted = [r["worlds"]["planted"] for r in runs]
    untouched = sum(p["n_untouched_latents"] for p in planted)
    added = [p["added_born_share"] for p in planted if p["n_added_latents"]]
    out["planted"].update(
        {
            "auroc_mean": float(np.nanmean([p["auroc"] for p in planted])),
            "auroc_min": float(np.nanmin([p["auroc"] for p in planted])),
            "untouched_changed_rate": sum(p["untouched_changed"] for p in planted) / max(untouched, 1),
            "untouched_died_rate": sum(p["untouched_died"] for p in planted) / max(untouched, 1),
            "removed_died_share": sum(p["removed_died"] for p in planted)
            / max(sum(p["n_removed_latents"] for p in planted), 1),
            "n_touched_latents": sum(p["n_touched_latents"] for p in planted),
            "n_untouched_latents": untouched,
            "added_born_share": float(np.mean(added)) if added else None,
        }
    )
    out["seed_pair_changed_fraction"] = float(np.mean([r["seed_pair_changed_fraction"] for r in runs]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicates", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8], help="features rotated = removed = added")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    set_threads(args.threads)
    table = {}
    start = time.perf_counter()
    for size in args.sizes:
        runs = []
        for seed in range(args.replicates):
            world = synthetic.World(seed=seed, n_rotated=size, n_removed=size, n_added=size)
            with tempfile.TemporaryDirectory() as work:
                runs.append(synthetic.run(world, Path(work)))
        table[size] = {"world": runs[0]["world"], **summarise(runs)}
        s = table[size]
        quiet, planted = (s["no_change"], s["placebo"]), s["planted"]
        print(
            f"size {size}: steps called no_change {quiet[0]['steps_called']}/{args.replicates}, "
            f"placebo {quiet[1]['steps_called']}/{args.replicates}, "
            f"planted {planted['steps_called']}/{args.replicates}; "
            f"label calls no_change {quiet[0]['label_calls']}, placebo {quiet[1]['label_calls']}, "
            f"planted {planted['label_calls']}; AUROC mean {planted['auroc_mean']:.3f} "
            f"(min {planted['auroc_min']:.3f}); untouched labelled changed {planted['untouched_changed_rate']:.3f}, "
            f"died {planted['untouched_died_rate']:.3f} (of {planted['n_untouched_latents']}); "
            f"removed died {planted['removed_died_share']:.2f}; "
            f"added born {planted['added_born_share']}; seed pair changed {s['seed_pair_changed_fraction']:.3f} "
            f"[{time.perf_counter() - start:.0f} s]",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(table, indent=2))
    worst = max(t["no_change"]["steps_called"] + t["placebo"]["steps_called"] for t in table.values())
    print(f"planted_bench replicates={args.replicates} quiet_worlds_called_max={worst} "
          f"auroc_min={min(t['planted']['auroc_min'] for t in table.values()):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
