"""Does the demo's crosscoder find the latents behind ``female_ratio``, and are they the model's change?

The diff-SAE's latents behind a metric (``sae_diff.metric_latents``) describe the difference Mi − M0,
so on identical models there is nothing for them to track. A crosscoder's latents describe both
models' activations at once: a latent can track the metric across samples because the *texts* vary
in it, whether or not the model changed. This bench asks the metric-latent question of the
crosscoder and holds the answer against the null that contains everything but the model change:

- **the demo's crosscoder** of M0 and M2 on D2 (layer 12, the workflow's own, from ``make run``);
- **an identical-model crosscoder**: the same settings trained on (M0_D2, M0_D2), the same tokens
  through the same model twice.

For each, every latent is pooled per sample as the probes pool (``before_scored``: the completion
before its first gendered word), the ``top`` latents by |Spearman ρ| with ``female_ratio`` are chosen
on D2's English train prompts and reported on its eval prompts (permutation p over whole prompts,
BH q; ``metric_latents.associate``), beside ``--draws`` draws of as many random directions of the
concatenated activations chosen the same way (``probes.random_directions``). For the chosen latents:
their class, the cosine between their two decoders, and how far they moved (``moved_rank``).

    python bench/crosscoder_metric.py [--draws 20] [--work /tmp/crosscoder_metric]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from sae_diff import config as cfglib  # noqa: E402
from sae_diff import crosscoder, features, metric_latents, probes  # noqa: E402
from sae_diff.activations import ActivationStore  # noqa: E402
from sae_diff.models import set_threads  # noqa: E402
from sae_diff.paired import DifferenceStore, PairedStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = "M0_D2__M2_D2"
LAYER = 12


class ConcatStore(DifferenceStore):
    """Both models' activations of the same tokens side by side ([n, 2d]), read like one store: what
    ``features.pool_tokens`` and ``probes.random_directions`` read for a crosscoder."""

    def __init__(self, base, tuned):
        super().__init__(base, tuned)
        self.manifest = {**self.manifest, "d_model": 2 * base.d_model}

    @property
    def d_model(self) -> int:
        return 2 * self.base.d_model

    def load_shard(self, entry: dict, verify: bool = True) -> dict:
        base_entry = next(s for s in self.base.manifest["shards"] if s["file"] == entry["file"])
        a, b = self.base.load_shard(base_entry, verify), self.tuned.load_shard(entry, verify)
        return {**b, "acts": torch.cat([a["acts"].float(), b["acts"].float()], -1)}


def metric_latents_of(cc, store, args, pooled_ref) -> tuple[dict, list[int]]:
    """The chosen latents (``associate``) and the random-direction draws' call counts."""
    ids, cut = pooled_ref["sample_id"], pooled_ref["scored_cutoff"]
    rows = pooled_ref["n_before_scored_tokens"] > 0
    samples = pd.read_parquet(ROOT / "results" / "data" / "D2" / "samples.parquet")
    table = samples.set_index("sample_id").loc[ids[rows]].reset_index()
    kept = (table["language"] == "en").to_numpy()  # the demo's target: English texts
    train, held = kept & (table["split"] == "train").to_numpy(), kept & (table["split"] == "eval").to_numpy()
    groups = table["prompt_id"].astype(str).to_numpy()
    values = table["female_ratio"].to_numpy(float)
    settings = (args.top, args.permutations, args.fdr, 0)

    def associate(encoders: dict) -> dict:
        pooled = features.pool_tokens(store, ids, "before_scored", encoders, cutoffs=cut)
        return {
            name: metric_latents.associate(
                pooled[name][rows].astype(np.float64), values, train, held, groups, *settings
            )
            for name in encoders
        }

    found = associate({"cc": lambda x: cc.encode(x.view(len(x), 2, -1))})["cc"]
    center = probes.store_center(store)
    width = cc.cfg.d_sae
    counts = []
    for first in range(0, args.draws, 10):  # ten draws per pass over the store
        encoders = {
            d: probes.random_directions(store, width, d, center) for d in range(first, min(first + 10, args.draws))
        }
        counts += [result["n_called"] for result in associate(encoders).values()]
    return found, counts


def describe(name: str, cc, table: pd.DataFrame, found: dict, counts: list[int]) -> None:
    w = cc.W_dec.detach().double().numpy()
    p = metric_latents.count_p(found["n_called"], counts)
    print(
        f"\n{name}: {found['n_called']} of {len(found['latents'])} chosen latents called; random directions: "
        f"{np.mean(counts):.2f} per draw (max {max(counts)}), p = {p:.3f}"
    )
    print("| latent | ρ train | ρ eval | q | called | class | decoder cos M0/Mi | moved rank (of moved) |")
    print("|---:|---:|---:|---:|---|---|---:|---:|")
    n_moved = int(table["moved_rank"].notna().sum())
    for row in found["latents"]:
        j = row["latent"]
        a, b = w[j, 0], w[j, -1]
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        rank = table.loc[j, "moved_rank"]
        rank = "–" if pd.isna(rank) else f"{int(rank)} ({n_moved})"
        print(
            f"| {j} | {row['rho_train']:+.2f} | {row['rho_eval']:+.2f} | {row['q']:.3f} | {row['called']} | "
            f"{table.loc[j, 'class']} | {cos:.4f} | {rank} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--permutations", type=int, default=2000)
    parser.add_argument("--fdr", type=float, default=0.05)
    parser.add_argument("--work", type=Path, default=Path("/tmp/crosscoder_metric"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    results = ROOT / "results"
    config = cfglib.load(ROOT / "config" / "config.yaml")  # with the schema's defaults
    training = {**config["training"], **config["diffing"]["training"]}  # as the workflow's diffing_training()
    opts = config["diffing"]["crosscoder"]
    pooled_ref = load_file(
        str(results / "diffing" / "diff_sae" / PAIR / f"layer{LAYER}" / "features" / "pooled.safetensors")
    )
    base = ActivationStore(results / "activations" / "M0_D2" / f"layer{LAYER}")
    tuned = ActivationStore(results / "activations" / "M2_D2" / f"layer{LAYER}")

    demo_dir = results / "diffing" / "crosscoder" / PAIR / f"layer{LAYER}"
    demo = crosscoder.load(demo_dir / "crosscoder").eval()
    found, counts = metric_latents_of(demo, ConcatStore(base, tuned), args, pooled_ref)
    describe(
        "demo crosscoder, M0 vs M2 on D2",
        demo,
        pd.read_parquet(demo_dir / "latents.parquet").set_index("latent"),
        found,
        counts,
    )

    # the identical-model control: M0's store twice, the demo's crosscoder settings and seed
    folder = args.work / "identical"
    paired = PairedStore([base, base], names=["M0", "M0copy"])
    cfg = crosscoder.CrosscoderConfig(
        n_models=2,
        d_in=base.d_model,
        d_sae=opts["expansion_factor"] * base.d_model,
        k=opts["k"],
        same_init=opts.get("same_init", True),
        model_names=["M0", "M0copy"],
    )
    if not (folder / "crosscoder_weights.safetensors").exists():
        crosscoder.train(
            paired,
            cfg,
            folder,
            n_tokens=base.n_tokens("train"),
            batch_size=training["batch_size"],
            lr=opts["lr"],
            seed=opts["seed"],
            epochs=training["epochs"],
            dead_tokens=opts["dead_tokens"],
            shuffle_buffer=training["shuffle_buffer"],
            checkpoint_every=0,
        )
    control = crosscoder.load(folder).eval()
    table = crosscoder.latent_table(control).set_index("latent")
    table["moved_rank"] = np.nan  # identical decoders (shared start): nothing moved
    found0, counts0 = metric_latents_of(control, ConcatStore(base, base), args, pooled_ref)
    describe("identical-model crosscoder, M0 vs M0 on D2", control, table, found0, counts0)
    print(f"\ncrosscoder_metric demo_called={found['n_called']} identical_called={found0['n_called']}")


if __name__ == "__main__":
    main()
