"""sae-diff's TopK training step (sparse kernels, fused Adam, AuxK bookkeeping)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sae_diff.sae.kernels import _triton_module  # noqa: E402
from sae_diff.sae.model import SAEConfig  # noqa: E402
from sae_diff.sae.train import TrainSpec, _Run  # noqa: E402

args = common.parse(__doc__)
train, eval_acts = common.data(args)
spec = TrainSpec(
    name="bench",
    sae=SAEConfig(architecture="topk", d_in=train.shape[1], d_sae=args.d_sae, k=args.k),
    lr=args.lr,
    warmup_steps=0,
    decay_fraction=0.0,
    seed=args.seed,
    dead_tokens=10_000_000,
)
run = _Run(
    spec,
    total_steps=args.warmup + args.steps,
    scale=1.0,
    sample=train[:4096].cpu(),
    scale_out=1.0,
    device=args.device,
    precision=lambda: common.precision(args),
)
step_index = iter(range(10**9))
tok_s = common.run(lambda x: run.step(next(step_index), x, x), train, args)
run.sae.eval()
kernels = "triton" if train.is_cuda and _triton_module() is not None else "torch"
common.report("sae-diff", args, tok_s, common.fvu(run.sae, eval_acts), kernels=kernels)
