"""GPU benchmark: extraction and TopK SAE training on one CUDA device, float32 vs bf16 autocast,
and sae-diff's trainer vs sparsify's on the same GPU, side by side in one run.

Extraction: SmolLM2-135M-Instruct (the demo's M0, prepared from the GGUF package when absent)
up to block ``--layer``, a bare HF forward vs ``activations.extract`` (shards, checksums),
each with and without ``autocast: bf16``. Training: the workers of ``bench/sae_train.py``
(same activations, same batches, k 32, batch 4096) with ``--device``; sparsify runs from
bench/.venvs/sparsify when ``bench/sae_train.py`` has installed it there, else from this
Python if it imports, else it is reported as not run. On CUDA the results are appended to
bench/RESULTS.md with the GPU's name and the date; on a CPU (``--device cpu``, for checking
the script) they are only printed.

    python bench/gpu.py [--device cuda] [--sizes 16384 65536] [--steps 50] [--sequences 1024]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import extract as extract_bench  # noqa: E402
import sae_train as train_bench  # noqa: E402

from sae_diff import activations, models  # noqa: E402


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def extraction(args, sync) -> list[dict]:
    folder = extract_bench.model_dir()
    model, tok = models.load(folder, device=args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    table = extract_bench.samples(args.sequences, work / "samples.parquet")
    seqs = activations.tokenize(tok, pd.read_parquet(table), args.seq_len, True, True)
    batches = [
        torch.tensor([s.ids for s in seqs[i : i + args.batch]], device=args.device)
        for i in range(0, len(seqs), args.batch)
    ]
    n_tokens = len(seqs) * args.seq_len
    spec = {
        "model": "M0",
        "data": "bench",
        "layers": [args.layer],
        "hook_points": ["resid_post"],
        "activations": {
            "dtype": "float16",
            "batch_size": args.batch,
            "max_length": args.seq_len,
            "shard_tokens": 1 << 30,
            "exclude_special_tokens": True,
            "exclude_first_position": True,
        },
    }
    rows = []
    try:
        for mode in ("off", "bf16"):
            place = models.Placement(args.device, None, mode)
            with place.precision():
                extract_bench.bare_forward(model, batches[:1], args.layer)  # warm-up (kernels, allocator)
            best_bare, best_ours = float("inf"), float("inf")
            for r in range(args.rounds):
                with place.precision():
                    best_bare = min(
                        best_bare, timed(lambda: extract_bench.bare_forward(model, batches, args.layer), sync)
                    )
                out = work / f"{mode}{r}"
                best_ours = min(
                    best_ours,
                    timed(
                        lambda: activations.extract(
                            spec, folder, table, out, place=place, progress=False, loaded=(model, tok)
                        ),
                        sync,
                    ),
                )
                shutil.rmtree(out)
            rows.append({"what": f"bare HF forward, autocast {mode}", "tok_s": n_tokens / best_bare})
            rows.append({"what": f"sae-diff extract, autocast {mode}", "tok_s": n_tokens / best_ours})
    finally:
        shutil.rmtree(work)
    return rows


def sparsify_python() -> Path | None:
    venv = train_bench.VENVS / "sparsify" / "bin" / "python"
    if venv.exists():
        return venv
    return Path(sys.executable) if importlib.util.find_spec("sparsify") else None


def training(args) -> list[dict]:
    acts = train_bench.cached_activations(args.layer)
    impls = [(Path(sys.executable), "ours.py", "off"), (Path(sys.executable), "ours.py", "bf16")]
    sparsify = sparsify_python()
    if sparsify is not None:
        impls.append((sparsify, "sparsify_worker.py", "bf16"))
    rows = []
    for d_sae in args.sizes:
        for python, script, mode in impls:
            result = train_bench.run_worker(
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
                    "--device",
                    args.device,
                    "--autocast",
                    mode,
                ],
                args.threads,
            )
            print(json.dumps(result), file=sys.stderr)
            rows.append(result)
        if sparsify is None:
            rows.append(
                {
                    "impl": "sparsify",
                    "d_sae": d_sae,
                    "autocast": "-",
                    "tok_s": float("nan"),
                    "fvu": float("nan"),
                    "note": "not installed (run bench/sae_train.py once to install it)",
                }
            )
    return rows


def report(args, extract_rows: list[dict], train_rows: list[dict]) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [
        f"## GPU benchmark, {datetime.date.today()}: {device}, torch {torch.__version__}",
        "",
        f"`python bench/gpu.py --device {args.device} --sizes {' '.join(map(str, args.sizes))} "
        f"--steps {args.steps} --sequences {args.sequences}`",
        "",
        f"Extraction, SmolLM2-135M blocks 0..{args.layer}, {args.sequences} x {args.seq_len} tokens, "
        f"batch {args.batch}, best of {args.rounds}:",
        "",
        "| method | tok/s |",
        "|---|---:|",
    ]
    lines += [f"| {r['what']} | {r['tok_s']:,.0f} |" for r in extract_rows]
    lines += [
        "",
        f"TopK SAE training step (d_in 576, k 32, batch 4096, {args.steps} timed steps):",
        "",
        "| implementation | autocast | d_sae | tok/s | FVU |",
        "|---|---|---:|---:|---:|",
    ]
    for r in train_rows:
        name = (
            r["impl"]
            + (f" ({r['kernels']} kernels)" if "kernels" in r else "")
            + (f", {r['note']}" if "note" in r else "")
        )
        lines.append(f"| {name} | {r.get('autocast', '-')} | {r['d_sae']} | {r['tok_s']:,.0f} | {r['fvu']:.4f} |")
    for d_sae in args.sizes:
        ours = max((r["tok_s"] for r in train_rows if r["impl"] == "sae-diff" and r["d_sae"] == d_sae), default=None)
        theirs = [
            r["tok_s"]
            for r in train_rows
            if r["impl"] == "sparsify" and r["d_sae"] == d_sae and r["tok_s"] == r["tok_s"]
        ]
        if ours and theirs:
            lines.append(f"\nsae_vs_sparsify[d_sae={d_sae}]={ours / theirs[0]:.2f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here (use --device cpu to check the script on a CPU)")
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    text = report(args, extraction(args, sync), training(args))
    print(text)
    if args.device.startswith("cuda"):
        results = ROOT / "bench" / "RESULTS.md"
        previous = results.read_text() if results.exists() else "# Benchmark results\n\n"
        results.write_text(previous.rstrip("\n") + "\n\n" + text)
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
