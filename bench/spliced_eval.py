"""Spliced evaluation cost: our shared-prefix evaluation vs three independent forwards.

Our spliced CE/KL runs blocks 0..L once per batch and only the blocks above L for the SAE
and the zero-ablation variants. The reference runs three full forwards (clean, spliced,
ablated) with a hook that replaces block L's output. Same SmolLM2 model, SAE, tokens and
batches; alternating, best of ``--rounds``. Needs `make run` (the demo's SAE).

    python bench/spliced_eval.py [--layer 12] [--samples 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from demo_inputs import model_and_sae  # noqa: E402

from sae_diff import evaluate, models  # noqa: E402
from sae_diff.activations import tokenize  # noqa: E402


def three_forwards(model, tokenizer, sae, table, layer, batch_size, max_length=128):
    sequences = tokenize(tokenizer, table, max_length, True, True)
    pad = tokenizer.pad_token_id
    for start in range(0, len(sequences), batch_size):
        seqs = sequences[start : start + batch_size]
        width = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad)
        attn = torch.zeros_like(ids)
        keep = torch.zeros((len(seqs), width), dtype=torch.bool)
        for j, s in enumerate(seqs):
            ids[j, : len(s.ids)] = torch.tensor(s.ids)
            attn[j, : len(s.ids)] = 1
            keep[j, : len(s.ids)] = torch.from_numpy(s.keep)
        for edit in (None, lambda h: sae(h), torch.zeros_like):

            def hook(_m, _i, out, edit=edit):
                if edit is None:
                    return out
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                h[keep] = edit(h[keep])
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

            handle = models.blocks(model)[layer].register_forward_hook(hook)
            try:
                with torch.no_grad():
                    torch.log_softmax(model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float(), -1)
            finally:
                handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, sae = model_and_sae(args.layer)
    table = pd.read_parquet(ROOT / "results" / "data" / "D0" / "raw.parquet").head(args.samples)
    ours_s, ref_s = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        evaluate.spliced_metrics(model, tokenizer, sae, table, args.layer, batch_size=args.batch)
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        three_forwards(model, tokenizer, sae, table, args.layer, args.batch)
        ref_s.append(time.perf_counter() - start)
    print(
        f"SmolLM2-135M, SAE at block {args.layer} of 30, {len(table)} samples, batch {args.batch}, "
        f"{args.threads} threads, best of {args.rounds}"
    )
    print(f"three independent forwards (clean, spliced, ablated): {min(ref_s):7.2f} s")
    print(f"sae-diff spliced evaluation (shared lower blocks, CE + KL): {min(ours_s):7.2f} s")
    print(f"spliced_vs_three_forwards={min(ours_s) / min(ref_s):.3f}")


if __name__ == "__main__":
    main()
