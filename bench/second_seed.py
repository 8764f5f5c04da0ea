"""The demo's calls under a second seed of its dictionaries: the evolution labels' calls against the
resampling null (issue 18: the same calls for every label whose excess is outside the null) and the
diff-SAE latents behind the target metric (which latents are called, where they fire, and how close
each seed's latents and steering direction are).

The second run: a copy of the finished demo folder (its models, data and activations reused; only
the dictionaries change, with ``bench/second_seed.yaml``)::

    cp -a . ../demo_seed1 && cd ../demo_seed1
    snakemake --cores 2 --configfile config/config.yaml bench/second_seed.yaml \\
        --rerun-triggers mtime --forcerun train_sae train_null_saes train_seed_sae diff_sae -- \\
        results/evolution/layer6/topk.json results/evolution/layer12/topk.json \\
        results/diffing/diff_sae/M0_D1__M1_D1/layer12/metric_latents.json \\
        results/diffing/diff_sae/M0_D2__M2_D2/layer12/metric_latents.json

(``--rerun-triggers mtime``: the copy's absolute paths would otherwise rerun every job; the forced
rules are the ones the seeds feed, and everything downstream reruns after them.) Then::

    python bench/second_seed.py --first results --second ../demo_seed1/results [--metric female_ratio]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sae_diff import metric_latents
from sae_diff.evolution import headline
from sae_diff.sae import files

LABELS = ("born", "died", "changed", "same")


def evolution_headline(results: Path) -> dict:
    blocks = {}
    for path in sorted(results.glob("evolution/layer*/*.json")):
        block = json.loads(path.read_text())
        blocks[(block["layer"], block["sae"])] = block
    names = sorted({name for _, name in blocks})
    return headline(blocks, names)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True).clip(1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first", type=Path, default=Path("results"))
    parser.add_argument("--second", type=Path, required=True)
    parser.add_argument("--metric", default="female_ratio")
    args = parser.parse_args()
    runs = {"first": args.first, "second": args.second}
    heads = {name: evolution_headline(root) for name, root in runs.items()}
    same_calls = True
    print("effect layer label: observed [null_low, null_high] called, first seed | second seed")
    for effect in ("model_effect", "data_effect"):
        for layer in sorted(heads["first"][effect]):
            for label in LABELS:
                rows = [heads[name][effect][layer][label] for name in runs]
                same_calls &= rows[0]["called"] == rows[1]["called"]
                text = " | ".join(
                    f"{r['observed']} [{r['null_low']:.0f}, {r['null_high']:.0f}] {r['called']}" for r in rows
                )
                print(f"{effect} {layer} {label}: {text}")
    print(f"same calls for every label: {same_calls}")
    for pair_dir in sorted(args.first.glob("diffing/diff_sae/*/layer*")):
        relative = pair_dir.relative_to(args.first)
        folders = {name: root / relative for name, root in runs.items()}
        found, decoders = {}, {}
        for name, folder in folders.items():
            found[name] = json.loads((folder / "metric_latents.json").read_text())["metrics"][args.metric]
            decoders[name] = unit(files.load(folder / "sae").W_dec.detach().double().numpy())
            examples = json.loads((folder / "features" / "examples.json").read_text())
            called = [row for row in found[name]["latents"] if row["called"]]
            print(f"{relative} {name}: {len(called)} of {len(found[name]['latents'])} called "
                  f"(random directions {found[name]['random_directions']['n_called']})")  # fmt: skip
            for row in called:
                contexts = [e["context"].replace("\n", " ") for e in examples.get(str(row["latent"]), [])[:3]]
                where = [c[max(c.find("⟦") - 12, 0) : c.find("⟦") + 16] for c in contexts]
                print(f"    {row['latent']} rho {row['rho_eval']:+.2f} q {row['q']:.3g}  {where}")
        first = [row["latent"] for row in found["first"]["latents"] if row["called"]]
        if first:
            best = np.abs(decoders["first"][first] @ decoders["second"].T).max(1)
            # the same best-of-n against as many random unit directions: what the best match reaches by chance
            rng = np.random.default_rng(0)
            random = unit(rng.normal(size=decoders["second"].shape))
            chance = np.abs(decoders["first"][first] @ random.T).max(1)
            print(f"  best |cos| of the first seed's called latents with any second-seed latent: {np.round(best, 2)} "
                  f"(with as many random directions: {np.round(chance, 2)})")  # fmt: skip
            second = [row["latent"] for row in found["second"]["latents"] if row["called"]]
            if second:
                cos = decoders["first"][first] @ decoders["second"][second].T
                print(f"  cos of the called latents, first {first} (rows) x second {second}:\n{np.round(cos, 2)}")
        directions = [metric_latents.direction(folder, args.metric) for folder in folders.values()]
        norms = [np.linalg.norm(d) for d in directions]
        if min(norms) > 0:
            print(f"  cos of the two seeds' steering directions: {directions[0] @ directions[1] / np.prod(norms):.2f}")
        # two random unit directions in d dimensions: cos ~ N(0, 1/d)
        print(f"  (two random unit directions: |cos| 99th percentile {2.58 / np.sqrt(decoders['first'].shape[1]):.2f})")


if __name__ == "__main__":
    main()
