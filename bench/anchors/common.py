"""Shared by the benchmark workers: arguments, the batch stream, timing and FVU.

Each worker runs in its own virtual environment (ours in .venv, the anchors under
bench/.venvs/), reads the same activations, draws the same batches (same torch version,
same seed) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors.torch import load_file


def parse(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--acts", required=True, help="safetensors with 'train' and 'eval' [n, d] float32")
    parser.add_argument("--d-sae", type=int, required=True)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default="default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--autocast",
        default="off",
        choices=["off", "bf16"],
        help="bf16: each worker's forward under torch.autocast (as its own trainer would)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def precision(args):
    """The autocast context of ``--autocast`` on ``--device``."""
    import contextlib

    if args.autocast == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)


def data(args):
    tensors = load_file(args.acts)
    return tensors["train"].float().to(args.device), tensors["eval"].float().to(args.device)


def batches(train: torch.Tensor, args):
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.warmup + args.steps):
        yield train[torch.randint(len(train), (args.batch,), generator=gen).to(train.device)]


def run(step, train, args) -> float:
    """Tokens per second over the timed steps."""
    times = []
    sync = torch.cuda.synchronize if train.is_cuda else (lambda: None)
    for i, x in enumerate(batches(train, args)):
        sync()
        start = time.perf_counter()
        step(x)
        sync()  # GPU work is asynchronous: time it to completion
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch * len(times) / sum(times)


@torch.no_grad()
def fvu(reconstruct, eval_acts: torch.Tensor) -> float:
    x = eval_acts.double()
    recon = reconstruct(eval_acts).double()
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def report(name: str, args, tok_s: float, fvu_value: float, **extra) -> None:
    print(
        json.dumps(
            {
                "impl": name,
                "variant": args.variant,
                "d_sae": args.d_sae,
                "tok_s": tok_s,
                "fvu": fvu_value,
                "tokens": args.batch * (args.warmup + args.steps),
                "device": args.device,
                "autocast": args.autocast,
                **extra,
            }
        )
    )
