"""The identical-model control on the demo: the same model on the same data, an SAE trained with
another seed, labelled exactly as a step is (``diff.compare``: the layer's thresholds from the
resampling null; both SAEs alive, and each feature's presence tested, on M0_D0's eval split: the
same tokens). Whatever it labels other than "same" is what the labels call change where there is
none but the SAE's training seed.

Two partners of M0_D0's SAE, both trained by the workflow beside the seed pair (run `make run`
first): another data-order seed (the calibration partner: the cells share their init, so this is
the control that matches them) and another init seed too (the cross-init partner).

    python bench/identical_control.py [--layers 6 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pandas as pd  # noqa: E402

from sae_diff import grid, presence  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.diff import Thresholds, compare  # noqa: E402
from sae_diff.io import read_json  # noqa: E402
from sae_diff.models import set_threads  # noqa: E402
from sae_diff.sae import files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    parser.add_argument("--sae", default="topk")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    for layer in args.layers:
        calibration = read_json(grid.calibration_json(layer, args.sae))
        thresholds = Thresholds(**calibration["thresholds"])
        site = Path(grid.activations_dir("M0_D0")) / grid.site_dir(layer, "resid_post")
        tokens = presence.eval_tokens(ActivationStore(site), pd.read_parquet(grid.samples("D0")))
        main_sae = files.load(grid.sae_dir("M0_D0", layer, args.sae))
        partners = {
            "data-order seed": Path(grid.seed_saes_dir(layer)) / args.sae,
            "init and data-order seed": Path(grid.cross_init_sae_dir(layer, args.sae, "shuffle")),
        }
        for name, folder in partners.items():
            table, summary = compare(main_sae, files.load(folder), tokens, tokens, thresholds, False, 0.1, 0.25)
            counts = summary["counts"]
            live = int((table["label"] != "inactive").sum())
            other = counts.get("changed", 0) + counts.get("died", 0)
            print(
                f"layer {layer}, {name}: of {live} live features, same {counts.get('same', 0)}, changed "
                f"{counts.get('changed', 0)} (unmatched {counts['unmatched']}), died {counts.get('died', 0)} "
                f"(absent {counts['died_absent']}), born {counts['born']}: {other / max(live, 1):.2%} not 'same' "
                f"(MMCS {summary['mmcs']:.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
