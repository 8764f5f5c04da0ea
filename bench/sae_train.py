"""TopK SAE training throughput and quality: sae-diff vs SAELens 6.54 vs EleutherAI sparsify 1.3.3.

Same cached activations (SmolLM2-135M, block 12 residual stream, from `make run`), scaled
to E‖x‖ = √d, the same batches (batch 4096, seeded), k = 32, Adam at the same learning
rate, 2 threads, d_sae 4608 and 9216. Each implementation runs in its own virtual
environment (the anchors are installed by this script under bench/.venvs/, never as
project dependencies), one after another in this one run, alternating, best of
``--repeats``. Reports tokens/s and the eval FVU after the same number of tokens; the last
line is ``sae_vs_sparsify=<ratio> sae_vs_saelens=<ratio>`` at d_sae 4608 (SAELens: its
faster configuration of the two measured).

    python bench/sae_train.py [--steps 24] [--repeats 2] [--sizes 4608 9216]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "bench" / ".venvs"
WORK = ROOT / "bench" / "_work"
ANCHORS = {  # venv name -> pip requirements (torch first, from the same pinned wheel as ours)
    "sparsify": ["eai-sparsify==1.3.3"],
    "saelens": ["sae-lens==6.54.*"],
}


def ensure_venv(name: str) -> Path:
    python = VENVS / name / "bin" / "python"
    if not python.exists():
        print(f"installing {name} into {VENVS / name} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENVS / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *ANCHORS[name]], check=True)
    return python


def cached_activations(layer: int) -> Path:
    """Train/eval activations of the demo cell, scaled to E‖x‖ = √d, as one safetensors file."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "src"))
    from sae_diff.activations import ActivationStore

    folder = ROOT / "results" / "activations" / "M0_D0" / f"layer{layer}"
    if not (folder / "manifest.json").exists():
        raise SystemExit(f"{folder}: no activations; run `make run` first (it extracts SmolLM2 layer {layer})")
    out = WORK / f"acts_layer{layer}.safetensors"
    store = ActivationStore(folder)
    train, evals = store.all("train").float(), store.all("eval").float()
    scale = math.sqrt(train.shape[1]) / float(train.norm(dim=1).mean())
    WORK.mkdir(parents=True, exist_ok=True)
    save_file({"train": (train * scale).contiguous(), "eval": (evals * scale).contiguous()}, str(out))
    return out


def run_worker(python: Path, script: str, args: list[str], threads: int) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": str(ROOT / "src"),
    }
    proc = subprocess.run(
        [str(python), str(ROOT / "bench" / "anchors" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4608, 9216])
    parser.add_argument("--lr", type=float, default=4e-4)
    args = parser.parse_args()

    acts = cached_activations(args.layer)
    impls = [
        (Path(sys.executable), "ours.py", "default"),
        (ensure_venv("sparsify"), "sparsify_worker.py", "default"),
        (ensure_venv("saelens"), "saelens_worker.py", "default"),
        (ensure_venv("saelens"), "saelens_worker.py", "best_cpu"),
    ]
    best: dict = {}
    for d_sae in args.sizes:
        for _ in range(args.repeats):
            for python, script, variant in impls:
                result = run_worker(
                    python,
                    script,
                    [
                        "--acts",
                        str(acts),
                        "--d-sae",
                        str(d_sae),
                        "--steps",
                        str(args.steps),
                        "--threads",
                        str(args.threads),
                        "--lr",
                        str(args.lr),
                        "--variant",
                        variant,
                    ],
                    args.threads,
                )
                key = (result["impl"], variant, d_sae)
                if key not in best or result["tok_s"] > best[key]["tok_s"]:
                    best[key] = result
                print(json.dumps(result), file=sys.stderr)

    tokens = next(iter(best.values()))["tokens"]
    print(
        f"TopK SAE training step, SmolLM2 layer {args.layer}, d_in 576, k 32, batch 4096, {args.threads} threads, "
        f"best of {args.repeats}; FVU on held-out tokens after {tokens} training tokens"
    )
    print(f"{'implementation':<28}{'d_sae':>7}{'tok/s':>10}{'FVU':>9}")
    for (impl, variant, d_sae), r in sorted(best.items(), key=lambda kv: (kv[0][2], -kv[1]["tok_s"])):
        label = impl if variant == "default" else f"{impl} ({variant})"
        print(f"{label:<28}{d_sae:>7}{r['tok_s']:>10.0f}{r['fvu']:>9.4f}")
    ref = args.sizes[0]
    ours = best[("sae-diff", "default", ref)]["tok_s"]
    saelens = max(best[("saelens", v, ref)]["tok_s"] for v in ("default", "best_cpu"))
    print(
        f"sae_vs_sparsify={ours / best[('sparsify', 'default', ref)]['tok_s']:.2f} sae_vs_saelens={ours / saelens:.2f}"
    )


if __name__ == "__main__":
    main()
