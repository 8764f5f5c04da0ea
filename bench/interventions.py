"""Hook overhead of interventions during generation: plain greedy ``generate`` vs the same call
with the no-op splice, an ablation and a steering edit at one layer (KV cache on).

Same SmolLM2-135M model, prompts and settings (batch 16, 64 new tokens forced with
min_new_tokens, greedy); one untimed warm-up, then the four variants in a rotated order each
round (whichever runs first in a round is measurably slower here), best of ``--rounds``.
End-to-end differences on this shared 2-core machine swing by ±5%, more than the edit costs, so
the script also times the edit itself (``editing.editor``, what the hook runs) on a
decoding step's activation [batch, 1, d] and reports it against a plain decoding step.
Needs `make run` (the prepared model and the demo's SAE).

    python bench/interventions.py [--layer 12] [--batch 16] [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from demo_inputs import model_and_sae  # noqa: E402

from sae_diff import data, editing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, sae = model_and_sae(args.layer)
    prompts = data.load_prompts(ROOT / "resources" / "prompts" / "professions.yaml")
    prompts = data.select_prompts(prompts, {"template": [2], "language": ["en"]}, "professions").head(args.batch)
    texts = [data.format_prompt(tokenizer, p, True) for p in prompts["prompt"]]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    features = (2047, 338, 4426, 252, 3769)
    variants = {
        "plain generate": None,
        "no-op splice (SAE encode, nothing changed)": editing.Edit("noop"),
        "ablation of 5 features": editing.Edit("ablate", features),
        "steering with 5 features": editing.Edit("steer", features, (4.0,) * 5),
    }
    seconds = {name: [] for name in variants}
    outputs = {}
    names = list(variants)
    with torch.inference_mode():  # warm-up: allocator and caches
        model.generate(
            **enc,
            max_new_tokens=8,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            edit = variants[name]
            context = (
                contextlib.nullcontext()
                if edit is None
                else editing.intervene(model, sae, args.layer, "resid_post", edit)
            )
            with context, torch.inference_mode():
                start = time.perf_counter()
                out = model.generate(
                    **enc,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
                seconds[name].append(time.perf_counter() - start)
            outputs[name] = out
    n_tokens = args.batch * args.new_tokens
    plain = min(seconds["plain generate"])
    print(
        f"SmolLM2-135M, {args.threads} threads, batch {args.batch}, {args.new_tokens} new tokens, greedy, "
        f"edit at block {args.layer} (d_sae {sae.cfg.d_sae}), best of {args.rounds}"
    )
    for name, times in seconds.items():
        best = min(times)
        print(f"{name:45s} {best:7.2f} s  {n_tokens / best:7.1f} tok/s  overhead {100 * (best / plain - 1):+6.2f}%")
    same = torch.equal(outputs["plain generate"], outputs["no-op splice (SAE encode, nothing changed)"])
    print(f"no-op splice output identical to plain: {same}")
    step_ms = 1000 * plain / args.new_tokens  # one decoding step of the whole batch (prefill included)
    x = torch.randn(args.batch, 1, model.config.hidden_size)
    print(
        f"the edit alone on one decoding step [{args.batch}, 1, {model.config.hidden_size}] "
        f"vs a plain step ({step_ms:.1f} ms):"
    )
    for name, edit in variants.items():
        if edit is None:
            continue
        apply = editing.editor(sae, edit, "cpu")
        with torch.inference_mode():
            for _ in range(20):
                apply(x)
            start = time.perf_counter()
            for _ in range(500):
                apply(x)
            per_call = (time.perf_counter() - start) / 500
        print(f"{name:45s} {1e6 * per_call:7.1f} us per step  edit_overhead={100 * per_call * 1000 / step_ms:.2f}%")


if __name__ == "__main__":
    main()
