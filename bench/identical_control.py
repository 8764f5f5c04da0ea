"""The identical-model control on the demo: the same model on the same data, an SAE trained with
another seed, labelled exactly as a step is (the layer's thresholds from the resampling null, both
SAEs firing on M0_D0's eval split). Whatever it labels other than "same" is what the labels call
change where there is none but the SAE's training seed.

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

from sae_diff import grid, nulls  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.diff import Thresholds  # noqa: E402
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
        eval_acts = ActivationStore(site).all("eval")
        main_sae = files.load(grid.sae_dir("M0_D0", layer, args.sae))
        partners = {
            "data-order seed": Path(grid.seed_saes_dir(layer)) / args.sae,
            "init and data-order seed": Path(grid.cross_init_sae_dir(layer, args.sae, "shuffle")),
        }
        for name, folder in partners.items():
            table, fires_b = nulls.pair_table(main_sae, files.load(folder), eval_acts, eval_acts)
            counts = nulls.pair_counts(table, fires_b, thresholds, collapse=0.1)
            live = int((table["fires"] > 0).sum())
            other = counts["changed"] + counts["died"]
            print(
                f"layer {layer}, {name}: of {live} live features, same {counts['same']}, changed "
                f"{counts['changed']}, died {counts['died']} (silent {counts['died_silent']}, unmatched "
                f"{counts['died_unmatched']}), born {counts['born']}: {other / max(live, 1):.2%} not 'same' "
                f"(MMCS {counts['mmcs']:.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
