"""Which seed pair is the right null for SAE diffs: MMCS when only the data order changes,
and when the initialisation changes too.

Trains three SAEs of the demo's `topk` config on the demo's M0_D0 layer-12 activations
(run `make run` first): (init 0, order 0), (init 0, order 1), (init 1, order 1); prints
each one's held-out FVU and the MMCS (mean decoder cosine with the Hungarian match) of the
first against the other two.

    python bench/seed_pairs.py [--acts results/activations/M0_D0/layer12] [--config config/config.yaml]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sae_diff import config as cfglib  # noqa: E402
from sae_diff import diff, evaluate  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.models import set_threads  # noqa: E402
from sae_diff.sae import files  # noqa: E402
from sae_diff.sae.train import spec_from_config, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", default="results/activations/M0_D0/layer12")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--sae", default="topk")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    cfg = cfglib.load(args.config, check_depth=False)
    block, opts = cfg["saes"][args.sae], cfg["training"]
    store = ActivationStore(args.acts)
    saes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for init, order in ((0, 0), (0, 1), (1, 1)):
            spec = spec_from_config(
                args.sae,
                dict(block, seed=init),
                d_in=store.d_model,
                d_out=None,
                hook_name=store.manifest["hook_name"],
                target_hook_name="",
                model_name="M0",
                warm_start=None,
            )
            out = Path(tmp) / f"init{init}_order{order}"
            start = time.perf_counter()
            train(
                store,
                [spec],
                [out],
                n_tokens=opts["tokens"],
                batch_size=opts["batch_size"],
                shuffle_buffer=opts["shuffle_buffer"],
                seed=order,
                checkpoint_every=0,
                epochs=opts["epochs"],
                progress=False,
                work_dir=Path(tmp) / f".work{init}{order}",
            )
            saes[(init, order)] = files.load(out)
            fvu = evaluate.reconstruction_metrics(saes[(init, order)], evaluate.store_batches(store, split="eval"))[
                "fvu"
            ]
            print(f"init seed {init}, order seed {order}: FVU {fvu:.3f} ({time.perf_counter() - start:.1f} s)")
    base = saes[(0, 0)]
    for key, name in (((0, 1), "order only"), ((1, 1), "init and order")):
        print(f"MMCS, {name} differs: {diff.mmcs(diff.weight_diff(base, saes[key])):.3f}")


if __name__ == "__main__":
    main()
