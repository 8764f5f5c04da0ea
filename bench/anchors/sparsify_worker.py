"""EleutherAI sparsify 1.3.3: SparseCoder's TopK step with torch Adam (its 'SAE step only')."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

args = common.parse(__doc__)
train, eval_acts = common.data(args)
torch.manual_seed(args.seed)
sae = SparseCoder(train.shape[1], SparseCoderConfig(num_latents=args.d_sae, k=args.k), device=args.device)
sae.b_dec.data = train[:4096].mean(0)  # as its trainer does when it sees the first batch: b_dec := mean
opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
since_fired = torch.zeros(args.d_sae, dtype=torch.long, device=args.device)


def step(x):
    global since_fired
    with common.precision(args):  # (on CUDA sparsify autocasts its forward to bf16 by itself)
        out = sae(x, dead_mask=since_fired > 10_000_000)
        loss = out.fvu + (1 / 32) * out.auxk_loss
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    sae.set_decoder_norm_to_unit_norm()
    since_fired += len(x)
    since_fired[out.latent_indices.flatten()] = 0


tok_s = common.run(step, train, args)


def reconstruct(x):
    return sae(x).sae_out


common.report("sparsify", args, tok_s, common.fvu(reconstruct, eval_acts))
