"""Peak memory of extraction and SAE training as the data grows: 1x and 4x the demo's D0 (or --scales).

An Nx table repeats D0's samples four times (new sample ids, same splits), so the token count
grows Nx with everything else equal. Each step runs as its own `sae-diff` process under
/usr/bin/time; the script prints peak RSS (MB) and wall seconds side by side. Extraction writes
shards of `activations.shard_tokens` tokens and training streams them through a bounded shuffle
buffer, so both peaks should stay flat. Needs `make run` (the demo's M0 and D0).

    python bench/memory.py [--results results] [--layer 12] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sae_diff import config as cfglib  # noqa: E402


def measured(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one command."""
    out = subprocess.run(["/usr/bin/time", "-f", "%M %e", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{out.stderr[-2000:]}")
    rss_kb, wall = out.stderr.strip().splitlines()[-1].split()
    return int(rss_kb) / 1024, float(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="data sizes, in copies of D0")
    parser.add_argument(
        "--shuffle-buffer",
        type=int,
        default=None,
        help="training shuffle buffer in tokens (default: the demo's); the training peak grows until the data fills it",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="training resume checkpoints every N steps (default: the demo's); a checkpoint "
        "briefly holds a serialised copy of the SAE and its Adam state",
    )
    args = parser.parse_args()
    results = Path(args.results)
    raw = pd.read_parquet(results / "data" / "D0" / "raw.parquet")
    cfg = cfglib.load(ROOT / "config" / "config.yaml")
    if args.shuffle_buffer is not None:
        cfg["training"]["shuffle_buffer"] = args.shuffle_buffer
    if args.checkpoint_every is not None:
        cfg["training"]["checkpoint_every"] = args.checkpoint_every
    work = Path(tempfile.mkdtemp(prefix="sae-diff-memory-"))
    rows = []
    try:
        for scale in args.scales:
            table = pd.concat(
                [raw.assign(sample_id=raw["sample_id"] + i * len(raw)) for i in range(scale)], ignore_index=True
            )
            samples = work / f"raw_{scale}x.parquet"
            table.to_parquet(samples, index=False)
            acts = work / f"acts_{scale}x"
            extract_spec = {
                "layers": [args.layer],
                "hook_points": ["resid_post"],
                "activations": cfg["activations"],
                "device": "cpu",
            }
            rss_x, wall_x = measured(
                [
                    "sae-diff",
                    "extract",
                    "--spec",
                    json.dumps(extract_spec),
                    "--model",
                    "M0",
                    "--data",
                    "D0",
                    "--model-dir",
                    str(results / "models" / "M0"),
                    "--samples",
                    str(samples),
                    "--out-dir",
                    str(acts / "M0_D0"),
                    "--threads",
                    str(args.threads),
                    "--no-progress",
                ]
            )
            manifest = json.loads((acts / "M0_D0" / f"layer{args.layer}" / "manifest.json").read_text())
            train_spec = {"saes": {"topk": cfg["saes"]["topk"]}, "training": {**cfg["training"], "epochs": args.epochs}}
            rss_t, wall_t = measured(
                [
                    "sae-diff",
                    "train",
                    "--spec",
                    json.dumps(train_spec),
                    "--model",
                    "M0",
                    "--data",
                    "D0",
                    "--layer",
                    str(args.layer),
                    "--acts-dir",
                    str(acts / "M0_D0"),
                    "--out-dir",
                    str(work / f"saes_{scale}x" / "M0_D0" / f"layer{args.layer}"),
                    "--threads",
                    str(args.threads),
                    "--no-progress",
                ]
            )
            tokens = sum(manifest["n_tokens"].values())
            rows.append((scale, tokens, rss_x, wall_x, rss_t, wall_t))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"SmolLM2-135M, layer {args.layer}, TopK d_sae {cfg['saes']['topk']['expansion_factor'] * 576}, "
        f"shards of {cfg['activations']['shard_tokens']} tokens, shuffle buffer {cfg['training']['shuffle_buffer']}, "
        f"checkpoints every {cfg['training']['checkpoint_every']} steps, "
        f"{args.epochs} epoch(s), {args.threads} threads"
    )
    print(f"{'data':>5} {'tokens':>8} {'extract peak RSS':>17} {'wall':>7} {'train peak RSS':>15} {'wall':>7}")
    for scale, tokens, rss_x, wall_x, rss_t, wall_t in rows:
        print(f"{scale:>4}x {tokens:>8} {rss_x:>14.0f} MB {wall_x:>6.1f}s {rss_t:>12.0f} MB {wall_t:>6.1f}s")
    first, last = rows[0], rows[-1]
    ratio = f"{last[0]}x_over_{first[0]}x"
    print(f"extract_rss_{ratio}={last[2] / first[2]:.3f} train_rss_{ratio}={last[4] / first[4]:.3f}")


if __name__ == "__main__":
    main()
