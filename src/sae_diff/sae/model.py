"""Sparse autoencoders: five architectures, each usable as a transcoder.

    pre  = (x - b_dec) @ W_enc + b_enc        (b_dec subtracted for SAEs, not for transcoders)
    f    = act(pre)                            (relu | topk | batchtopk | jumprelu | matryoshka)
    x̂    = f @ W_dec + b_dec

Weights follow SAELens's layout and names (W_enc [d_in, d_sae] on disk; held transposed in
memory so that both the encoder and the decoder read contiguous rows per latent).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import kernels

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")


def dictionary_seed(seed: int, kind: str) -> int:
    """The seed that starts a dictionary of ``kind`` ("diff_sae", "crosscoder"), drawn from
    (seed, kind). Dictionaries of different kinds trained with the same configured seed must not
    start from the same random decoder rows: the demo's diff-SAE and crosscoder were found
    matching row for row (|cos| up to 0.96) because both drew their rows from one generator
    seeded alike, so agreement between methods measured the shared start, not the models.
    The cell SAEs keep the configured seed itself (their diffs account for a shared start)."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}:{kind}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class SAEConfig:
    architecture: str
    d_in: int
    d_sae: int
    k: int = 32  # topk / batchtopk / matryoshka: mean active latents
    d_out: int | None = None  # transcoder target width (None: an SAE, target = input)
    l1_coefficient: float = 1.0  # relu
    l0_coefficient: float = 1.0  # jumprelu
    jumprelu_bandwidth: float = 0.05  # width of the straight-through rectangle kernel
    jumprelu_init_threshold: float = 0.1
    matryoshka_prefixes: list[int] = field(default_factory=list)  # nested prefix sizes; last == d_sae
    k_aux: int | None = None  # AuxK latents (default d_in // 2)
    # Encoder rows start as the decoder rows times this norm. 1/√3 is nn.Linear's default row
    # norm; with Adam a smaller encoder takes relatively larger early steps. Measured on
    # SmolLM2 layer 12 (TopK 4608, k 32, lr 4e-4, 106k tokens): eval FVU 0.386 at 1.0, 0.296 here.
    encoder_init_norm: float = 3**-0.5
    aux_coefficient: float = 1 / 32
    threshold_momentum: float = 0.99  # batchtopk: running estimate of the inference threshold
    apply_b_dec_to_input: bool | None = None  # None: subtract b_dec for SAEs, not for transcoders
    hook_name: str = ""
    target_hook_name: str = ""
    model_name: str = ""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r}: expected one of {ARCHITECTURES}")
        if self.architecture == "matryoshka":
            prefixes = list(self.matryoshka_prefixes) or [self.d_sae]
            if sorted(set(prefixes)) != prefixes or prefixes[-1] != self.d_sae or prefixes[0] <= 0:
                raise ValueError(
                    f"matryoshka_prefixes {prefixes}: expected increasing sizes ending at d_sae={self.d_sae}"
                )
            self.matryoshka_prefixes = prefixes

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def uses_topk(self) -> bool:
        return self.architecture in ("topk", "batchtopk", "matryoshka")

    def to_dict(self) -> dict:
        return asdict(self)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - θ) with the straight-through pseudo-derivative for θ (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        grad_theta = (grad * (-threshold / eps) * window).sum(0)
        return grad * (pre > threshold), grad_theta, None


class _Step(torch.autograd.Function):
    """H(z - θ), for the L0 penalty, with pseudo-derivative -1/ε · K((z - θ)/ε) wrt θ."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        return None, (grad * (-1.0 / eps) * window).sum(0), None


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.out_dim
        self.W_enc_T = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))  # row j: encoder of latent j
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out, dtype=dtype))  # row j: decoder of latent j
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(cfg.jumprelu_init_threshold), dtype=dtype))
        # batchtopk / matryoshka: a global threshold estimated during training, used at inference
        self.register_buffer("threshold", torch.zeros(d_sae, dtype=dtype))

    # ------------------------------------------------------------------ init

    def initialize(self, sample: torch.Tensor | None = None, seed: int = 0, median: str = "geometric") -> None:
        """Unit-norm random decoder, W_enc = c·W_decᵀ (c = encoder_init_norm), b_dec = geometric median."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=gen, dtype=torch.float64)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
            if not self.cfg.is_transcoder:
                self.W_enc_T.copy_(w * self.cfg.encoder_init_norm)
            else:
                enc = torch.randn(self.W_enc_T.shape, generator=gen, dtype=torch.float64)
                self.W_enc_T.copy_(enc / enc.norm(dim=1, keepdim=True) * self.cfg.encoder_init_norm)
            self.b_enc.zero_()
            if sample is not None and len(sample):
                center = geometric_median(sample.double()) if median == "geometric" else sample.double().mean(0)
                self.b_dec.copy_(center)

    # ------------------------------------------------------------------ encode / decode

    @property
    def apply_b_dec_to_input(self) -> bool:
        if self.cfg.apply_b_dec_to_input is not None:
            return self.cfg.apply_b_dec_to_input
        return not self.cfg.is_transcoder

    def _centered(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, self._centered(x), self.W_enc_T.t())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [batch, d_sae] (inference semantics)."""
        arch = self.cfg.architecture
        pre = self.encode_pre(x)
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))
        if arch == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
        # batchtopk / matryoshka: JumpReLU with the learned global threshold once it exists
        if bool((self.threshold > 0).any()) and not self.training:
            return pre * (pre > self.threshold)
        return self._batch_topk(pre)

    def _batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        n_keep = min(self.cfg.k * acts.shape[0], acts.numel())
        flat = acts.flatten()
        keep = flat.topk(n_keep, sorted=False).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter(0, keep, True).view_as(acts)
        return acts * mask

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ training

    def training_losses(
        self, x: torch.Tensor, target: torch.Tensor | None = None, dead: torch.Tensor | None = None
    ) -> dict:
        """Loss terms and statistics for one batch. ``dead``: bool [d_sae], latents for AuxK."""
        cfg = self.cfg
        target = x if target is None else target
        arch = cfg.architecture
        out: dict = {}
        if arch == "topk":
            vals, idx = kernels.topk_encode(self._centered(x), self.W_enc_T, self.b_enc, cfg.k)
            recon = kernels.sparse_decode(idx, vals, self.W_dec) + self.b_dec
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x.device)
            fired[idx[vals > 0]] = True
            l0 = (vals > 0).sum(-1).float().mean()
            pre = None
        else:
            pre = self.encode_pre(x)
            if arch == "relu":
                f = torch.relu(pre)
            elif arch == "jumprelu":
                f = _JumpReLU.apply(pre, self.log_threshold.exp(), cfg.jumprelu_bandwidth)
            else:
                f = self._batch_topk(pre)
                self._update_threshold(f)
            recon = f @ self.W_dec + self.b_dec
            fired = (f > 0).any(0)
            l0 = (f > 0).sum(-1).float().mean()
        mse = (recon - target).pow(2).sum(-1).mean()
        loss = mse
        if arch == "matryoshka":
            # nested prefixes: every prefix of the dictionary must reconstruct on its own
            loss = (
                sum(
                    ((f[:, :p] @ self.W_dec[:p] + self.b_dec) - target).pow(2).sum(-1).mean()
                    for p in cfg.matryoshka_prefixes[:-1]
                )
                + mse
            )
        if arch == "relu":
            sparsity = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
            loss = loss + cfg.l1_coefficient * sparsity
            out["l1"] = sparsity.detach()
        if arch == "jumprelu":
            l0_ste = _Step.apply(pre, self.log_threshold.exp(), cfg.jumprelu_bandwidth).sum(-1).mean()
            loss = loss + cfg.l0_coefficient * l0_ste
        if cfg.uses_topk and dead is not None and bool(dead.any()):
            aux = self._aux_loss(x, target, recon, dead, pre)
            loss = loss + cfg.aux_coefficient * aux
            out["aux"] = aux.detach()
        out.update(loss=loss, mse=mse.detach(), l0=l0.detach(), fired=fired, recon=recon.detach())
        return out

    def _aux_loss(self, x, target, recon, dead, pre):
        """AuxK (Gao et al. 2024): dead latents reconstruct the residual the live ones left.

        Only the dead latents' pre-activations are computed: the cost scales with their number.
        """
        dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(self.cfg.k_aux or self.cfg.d_in // 2, len(dead_idx))
        if pre is None:
            pre_dead = torch.addmm(self.b_enc[dead_idx], self._centered(x), self.W_enc_T[dead_idx].t())
        else:
            pre_dead = pre[:, dead_idx]
        vals, local = pre_dead.topk(k_aux, dim=-1)
        vals = vals.clamp_min(0)
        residual = (target - recon).detach()
        recon_aux = kernels.sparse_decode(dead_idx[local], vals, self.W_dec)
        denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return (residual - recon_aux).pow(2).sum(-1).mean() / denom

    @torch.no_grad()
    def _update_threshold(self, f: torch.Tensor) -> None:
        positive = f[f > 0]
        if positive.numel():
            current = positive.min()
            old = self.threshold[0]
            new = (
                current if old <= 0 else self.cfg.threshold_momentum * old + (1 - self.cfg.threshold_momentum) * current
            )
            self.threshold.fill_(float(new))

    # ------------------------------------------------------------------ constraints

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row."""
        if self.W_dec.grad is None or self.cfg.architecture == "relu":
            return
        g, w = self.W_dec.grad, self.W_dec
        g -= (g * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.architecture != "relu":
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm, started at the mean."""
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            return new
        median = new
    return median
