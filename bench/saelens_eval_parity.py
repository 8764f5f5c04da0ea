"""Our reconstruction metrics vs SAELens 6.54's evaluation code on the demo's trained SAE.

Run with the SAELens venv that bench/sae_train.py installs, after `make run`:

    PYTHONPATH=src bench/.venvs/saelens/bin/python bench/saelens_eval_parity.py [--layer 12] [--sae topk]

Prints both sets of numbers and the largest relative difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from sae_diff import evaluate  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.sae import files  # noqa: E402
from tests.test_saelens_parity import METRICS, saelens_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="M0_D0")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--sae", default="topk")
    args = parser.parse_args()
    folder = ROOT / "results" / "saes" / args.cell / f"layer{args.layer}" / args.sae
    acts = ActivationStore(ROOT / "results" / "activations" / args.cell / f"layer{args.layer}").all("eval").float()
    theirs, _ = saelens_metrics(folder, acts)
    ours = evaluate.reconstruction_metrics(files.load(folder), evaluate.tensor_batches(acts, 4096))
    print(f"{folder.relative_to(ROOT)} on {len(acts)} eval tokens")
    print(f"{'metric':<30}{'sae-diff':>16}{'SAELens 6.54':>16}{'rel. diff':>12}")
    worst = 0.0
    for key in METRICS:
        rel = abs(ours[key] - theirs[key]) / max(abs(theirs[key]), 1e-12)
        worst = max(worst, rel)
        print(f"{key:<30}{ours[key]:>16.8g}{theirs[key]:>16.8g}{rel:>12.2e}")
    print(f"max_relative_difference={worst:.2e}")


if __name__ == "__main__":
    main()
