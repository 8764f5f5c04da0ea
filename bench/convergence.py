"""How long the demo's SAEs must train before they pass the convergence checks (diff.convergence).

Trains the demo's `topk` config on M0_D0's layer-12 activations (run `make run` first) from two
init seeds in one pass, for several numbers of epochs over the same ~12k training tokens and,
optionally, several dictionary shapes (expansion factor, k), learning rates and decay fractions,
and prints for each: held-out FVU, its relative drop over the last quarter of training, the mean
decoder cosine to the init, and the cross-init MMCS against two random dictionaries of the same
shape (``sae_diff.convergence``), with the verdict of each check. ``--config`` names another
config's `topk` SAE (the planted example's settings were chosen with it: bench/RESULTS.md).

    python bench/convergence.py [--epochs 12 48 144] [--acts results/activations/M0_D0/layer12]
    python bench/convergence.py --expansion-factors 1 2 4 8 --k 16 32 --epochs 12 48
    python bench/convergence.py --acts results/activations/M0_D{0,1,2}/layer12 --epochs 12 48
    python bench/convergence.py --acts <run>/results/activations/M1_D1/layer1 --config config/examples/planted.yaml \
        --expansion-factors 1 --k 1 2 --lr 0.01 0.003 --decay-fraction 0 0.2 --epochs 16 32

Several ``--acts`` stores (of one model and layer) are pooled into one training set (their train
shards side by side; the first store's eval split scores the held-out FVU): how the checks move
with the number of tokens, e.g. M0's three cells of the demo as a larger M0 corpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sae_diff import config as cfglib  # noqa: E402
from sae_diff import convergence  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.models import set_threads  # noqa: E402
from sae_diff.sae import files  # noqa: E402
from sae_diff.sae.train import spec_from_config, train  # noqa: E402


def pooled_store(folders: list[Path], work: Path) -> ActivationStore:
    """One store whose train split is every store's train shards (linked, not copied) and whose
    eval split is the first store's; a single store is used as it is."""
    if len(folders) == 1:
        return ActivationStore(folders[0])
    manifests = [json.loads((f / "manifest.json").read_text()) for f in folders]
    first = manifests[0]
    if len({(m["model"], m["layer"], m["hook_point"], m["d_model"]) for m in manifests}) != 1:
        raise SystemExit(f"--acts: pooled stores must share model, layer and hook point: {[str(f) for f in folders]}")
    shards = []
    for i, (folder, manifest) in enumerate(zip(folders, manifests)):
        for shard in manifest["shards"]:
            if shard["split"] == "train" or i == 0:
                name = f"{i}-{shard['file']}"
                (work / name).symlink_to((folder / shard["file"]).resolve())
                shards.append({**shard, "file": name})
    train_tokens = sum(m["n_tokens"]["train"] for m in manifests)
    record = {**first, "cell": "pooled", "shards": shards, "n_tokens": {**first["n_tokens"], "train": train_tokens}}
    record["n_sequences"] = {**first["n_sequences"], "train": sum(m["n_sequences"]["train"] for m in manifests)}
    (work / "manifest.json").write_text(json.dumps(record))
    return ActivationStore(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acts", nargs="+", default=["results/activations/M0_D0/layer12"])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--epochs", type=int, nargs="+", default=[12, 48, 144])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--expansion-factors", type=int, nargs="+", help="shapes to try (default: the config's)")
    parser.add_argument("--k", type=int, nargs="+", help="TopK k values to try (default: the config's)")
    parser.add_argument("--lr", type=float, nargs="+", help="learning rates to try (default: the config's)")
    parser.add_argument(
        "--decay-fraction",
        type=float,
        nargs="+",
        help="shares of training with a decaying learning rate to try (default: the config's)",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    cfg = cfglib.load(args.config)
    criterion = convergence.Criterion.from_config(cfg["diff"]["convergence"])
    pooled = tempfile.TemporaryDirectory()
    store = pooled_store([Path(a) for a in args.acts], Path(pooled.name))
    print(f"{store.n_tokens('train')} training tokens from {len(args.acts)} store(s)", flush=True)
    base = cfg["saes"]["topk"]
    shapes = [
        (e, k, lr, decay)
        for e in args.expansion_factors or [base["expansion_factor"]]
        for k in args.k or [base["k"]]
        for lr in args.lr or [base["lr"]]
        for decay in args.decay_fraction or [base["decay_fraction"]]
    ]  # fmt: skip
    for (expansion, k, lr, decay), epochs in ((shape, epochs) for shape in shapes for epochs in args.epochs):
        block = {**base, "expansion_factor": expansion, "k": k, "lr": lr, "decay_fraction": decay}
        specs = [
            spec_from_config(
                f"init{seed}", {**block, "seed": seed}, store.d_model, None, store.manifest["hook_name"], "", "M0", None
            )
            for seed in (0, 1)
        ]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            dirs = [Path(work) / s.name for s in specs]
            opts = cfg["training"]
            train(store, specs, dirs, n_tokens=opts["tokens"], batch_size=opts["batch_size"],
                  shuffle_buffer=opts["shuffle_buffer"], seed=opts["seed"], checkpoint_every=0, epochs=epochs,
                  progress=False)  # fmt: skip
            record = convergence.sae_record(dirs[0], criterion)
            a, b = files.load(dirs[0]), files.load(dirs[1])
            cross = convergence.cross_init_record(a, b, criterion)
        print(
            f"d_sae {store.d_model * expansion} (x{expansion}) k {k} lr {lr:g} decay {decay:g} epochs {epochs:4d} "
            f"({record['steps']} steps, {time.perf_counter() - start:.0f} s): "
            f"held-out FVU {record['heldout_fvu']:.3f}, drop over the last quarter {record['fvu_drop']:.3f} "
            f"({'flat' if record['fvu_flat'] else 'still dropping'}); cosine to init {record['init_cos']:.3f} "
            f"({'left' if record['left_init'] else 'near init'}); cross-init MMCS {cross['mmcs']:.3f} vs random "
            f"{cross['mmcs_random']:.3f}: score {cross['score']:.3f} ({'ok' if cross['converged'] else 'too low'})",
            flush=True,
        )


if __name__ == "__main__":
    main()
