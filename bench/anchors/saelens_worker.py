"""SAELens 6.54: TopKTrainingSAE.training_forward_pass, its trainer's step (clip, Adam)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402

args = common.parse(__doc__)
train, eval_acts = common.data(args)
torch.manual_seed(args.seed)
best = args.variant == "best_cpu"  # sparse activations, no decoder-norm rescaling (the fastest on CPU)
cfg = TopKTrainingSAEConfig(
    d_in=train.shape[1],
    d_sae=args.d_sae,
    k=args.k,
    use_sparse_activations=best,
    rescale_acts_by_decoder_norm=not best,
    dtype="float32",
    device="cpu",
)
sae = TopKTrainingSAE(cfg)
opt = torch.optim.Adam(sae.parameters(), lr=args.lr, betas=(0.9, 0.999))
since_fired = torch.zeros(args.d_sae, dtype=torch.long)
n_steps = 0


def step(x):
    global n_steps
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=since_fired > 2442,
            n_training_steps=n_steps,
            is_logging_step=False,
        )
    )
    with torch.no_grad():
        fired = out.feature_acts.bool().float().sum(-2).bool()
        if fired.is_sparse:
            fired = fired.to_dense()
        since_fired.add_(1)
        since_fired[fired] = 0
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    n_steps += 1


tok_s = common.run(step, train, args)
sae.eval()


def reconstruct(x):
    out = sae.decode(sae.encode(x))
    return out.to_dense() if out.is_sparse else out


common.report("saelens", args, tok_s, common.fvu(reconstruct, eval_acts))
