"""Acausal crosscoders: one sparse dictionary shared by several models' activations of the same tokens.

A crosscoder reads the same token under ``n`` models (``PairedStore`` rows ``[B, n, d]``), encodes
the concatenation into one latent vector and decodes it with one decoder per model:

    x̃_m  = s_m · x_m                                   (per-model input scale, E‖s_m x_m‖ = √d)
    pre   = Σ_m x̃_m · W_enc[m] + b_enc                  W_enc [n, d, d_sae], b_enc [d_sae]
    f     = sparsify(relu(pre))                          [B, d_sae]
    x̂_m  = (f · W_dec[:, m] + b_dec[m]) / s_m           W_dec [d_sae, n, d], b_dec [n, d]

Latent j has one decoder vector per model, d_j^m = W_dec[j, m]; its norms say in which models the
latent writes (Lindsey et al. 2024, "Sparse Crosscoders"). Decoder norms are free (never
renormalised): they carry that information. Everything below (norms, Latent Scaling) is measured
in the scaled space, where the models' activations have the same mean norm and are comparable.

Architectures (following saprmarks/dictionary_learning ``CrossCoder`` / ``BatchTopKCrossCoder``
and its crosscoder trainers, as used by Minder et al. 2025):

* ``batchtopk`` (default): over the whole batch keep the k·B largest values of
  relu(pre)_j · Σ_m ‖d_j^m‖ (activations weighted by the latent's summed decoder norms, so that
  scaling a latent's encoder down and its decoder up changes nothing); the kept latents take their
  unweighted value relu(pre)_j. During training a running estimate of the smallest kept weighted
  value becomes the inference threshold (f_j = relu(pre)_j where relu(pre)_j Σ_m‖d_j^m‖ > θ), as in
  our SAE's batchtopk. Loss: Σ_m ‖x̃_m − x̂̃_m‖² + AuxK for dead latents (Gao et al. 2024).
  Training steps go through the k·B kept entries only (sparse decode and sparse gradients; see
  "sparse training" below); only the forward encode is a dense matmul.
* ``l1``: f = relu(pre), loss = Σ_m ‖x̃_m − x̂̃_m‖² + λ Σ_j f_j Σ_m ‖d_j^m‖ (the original
  crosscoder loss). Kept to show its artefacts: the L1 term drives a decoder whose model explains
  little of a latent to exactly zero ("complete shrinkage") and splits shared concepts into
  model-specific latents ("latent decoupling"), both of which make latents look model-specific
  when they are not (Minder et al. 2025, arXiv:2504.02922). Latent Scaling (``latent_scaling``)
  detects both.

Files (``save`` / ``load``; a folder written atomically, replaced only if this tool wrote it):

    <folder>/crosscoder_weights.safetensors
        W_enc        [n_models, d_in, d_sae]  float32
        b_enc        [d_sae]
        W_dec        [d_sae, n_models, d_in]
        b_dec        [n_models, d_in]
        threshold    [d_sae]      batchtopk inference threshold on relu(pre)·Σ_m‖d^m‖ (0: none yet,
                                  and then inference falls back to batch top-k, which depends on the batch)
        input_scale  [n_models]   s_m above; the weights act on scaled inputs, encode/decode on raw ones
    <folder>/cfg.json
        {"format": "sae-diff-crosscoder/1", "config": CrosscoderConfig.to_dict(), ...extra,
         "sha256": {"crosscoder_weights.safetensors": <hex>}}   (verified by load)
    <folder>/train_log.jsonl   (train only: one JSON object per logged step)

Latent classes (``latent_table``) use Minder et al.'s Δnorm; Latent Scaling labels are explained
at ``latent_scaling``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ActivationStoreError, DataError, TrainingError
from .io import (
    atomic_dir,
    atomic_path,
    check_replaceable,
    crash_point,
    discard_checkpoint,
    sha256_file,
    verify_checksums,
    write_json,
)
from .sae import kernels
from .sae.model import dictionary_seed, geometric_median
from .sae.train import _guarded, estimate_scale, lr_factor

log = logging.getLogger(__name__)

ARCHITECTURES = ("batchtopk", "l1")
FORMAT = "sae-diff-crosscoder/1"
WEIGHTS = "crosscoder_weights.safetensors"
CONFIG = "cfg.json"

# Latent classes from decoder norms, with Minder et al. 2025 ("Overcoming Sparsity Artifacts in
# Crosscoders to Interpret Chat-Tuning", arXiv:2504.02922, Sec. 2; diffing-toolkit's crosscoder
# latent table uses the same cut-offs) on
#     Δnorm_j = ½ ((‖d_j^last‖ − ‖d_j^first‖) / max(‖d_j^first‖, ‖d_j^last‖) + 1)  ∈ [0, 1]:
# tuned-only (Mi-only) Δnorm > 0.9 (‖d^first‖ < 0.2 ‖d^last‖), base-only (M0-only) Δnorm < 0.1,
# shared 0.4 ≤ Δnorm ≤ 0.6, everything else "other".
MI_ONLY_MIN = 0.9
M0_ONLY_MAX = 0.1
SHARED_RANGE = (0.4, 0.6)

# Latent Scaling labels for Mi-only latents (Minder et al. 2025, Sec. 3). ν^ε = β^ε_base / β^ε_tuned
# measures how much of the latent's (tuned-decoder) direction the *base* model's reconstruction
# error still holds although the base decoder was shrunk away; ν^r = β^r_base / β^r_tuned how much
# of it the base model's reconstruction (by other latents) holds. The paper reads high ν^ε as
# Complete Shrinkage and high ν^r with low ν^ε as Latent Decoupling and keeps latents low on both;
# its code (science-of-finetuning diffing-toolkit / sparsity-artifacts-crosscoders) ranks chat-only
# latents by the rank sum of the two ratios (after dropping ratios outside [-0.1, 2]) and compares
# with shared latents (ν ≈ 1) instead of applying fixed cut-offs. The cut-offs here are ours:
# ν^ε > 0.2 -> "complete_shrinkage" (the base error holds more than a fifth of the tuned scale),
# else ν^r > 0.5 -> "latent_decoupling" (the base reconstruction carries the direction at more than
# half the tuned scale), else "genuine". On our planted worlds (tests/test_crosscoder.py) genuine
# tuned-only latents measure ν^ε ≈ -0.03…0 and ν^r ≈ 0.1…0.3 (shared ones ≈ 1); directions present
# in the base at 0.4 of the tuned weight and shrunk away by L1 measure ν^ε ≈ 0.37. A latent that
# never fires, or whose tuned β is ~0, is "unmeasured".
NU_ERROR_MAX = 0.2
NU_RECONSTRUCTION_MAX = 0.5
STATE_DIR = ".crosscoder_state"  # a run's checkpoints, beside its output; removed once it has finished


@dataclass
class CrosscoderConfig:
    n_models: int
    d_in: int
    d_sae: int
    architecture: str = "batchtopk"
    k: int = 32  # batchtopk: mean active latents per token
    l1_coefficient: float = 1.0  # l1: λ of Σ_j f_j Σ_m ‖d_j^m‖
    k_aux: int | None = None  # AuxK latents per token (default d_in // 2, as dictionary_learning)
    aux_coefficient: float = 1 / 32  # batchtopk: AuxK weight (0 turns it off)
    threshold_momentum: float = 0.99  # batchtopk: running estimate of the inference threshold
    # encoder block m of latent j starts as encoder_init_norm · d_j^m, the decoder blocks as random
    # directions of norm 1/√n (so the concatenated decoder vector is a unit vector)
    encoder_init_norm: float = 3**-0.5
    # every model's decoder (and encoder) block of latent j starts at the same direction (the
    # reference crosscoder's same_init_for_all_layers, off by default there): a difference between
    # the decoders is then learnt from the models' activations, not left over from the init, and
    # two identical models keep identical decoders. Independent blocks (False) keep the init's
    # differences in an unconverged crosscoder: decoder cosine ~0.5 between two identical models on
    # the planted example (config/examples/planted.yaml), where the change then hides among them
    same_init: bool = True
    model_names: list[str] = field(default_factory=list)
    hook_name: str = ""

    def __post_init__(self):
        def need(ok: bool, what: str, value, expected: str):
            if not ok:
                raise ValueError(f"crosscoder config {what}={value!r}: expected {expected}")

        need(self.architecture in ARCHITECTURES, "architecture", self.architecture, f"one of {ARCHITECTURES}")
        for name in ("n_models", "d_in", "d_sae"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
        need(self.n_models >= 2, "n_models", self.n_models, "2 or more (a crosscoder compares models)")
        need(self.d_in >= 1, "d_in", self.d_in, "a positive integer")
        need(self.d_sae >= 1, "d_sae", self.d_sae, "a positive integer")
        if self.architecture == "batchtopk":
            need(
                isinstance(self.k, int) and 1 <= self.k <= self.d_sae,
                "k",
                self.k,
                f"an integer in [1, d_sae={self.d_sae}]",
            )
        need(self.l1_coefficient >= 0, "l1_coefficient", self.l1_coefficient, "a non-negative number")
        need(self.k_aux is None or self.k_aux >= 1, "k_aux", self.k_aux, "None or a positive integer")
        need(self.aux_coefficient >= 0, "aux_coefficient", self.aux_coefficient, "a non-negative number")
        need(0 <= self.threshold_momentum < 1, "threshold_momentum", self.threshold_momentum, "a number in [0, 1)")
        need(
            math.isfinite(self.encoder_init_norm) and self.encoder_init_norm > 0,
            "encoder_init_norm",
            self.encoder_init_norm,
            "a positive number",
        )
        self.model_names = [str(name) for name in self.model_names]
        need(
            not self.model_names or len(self.model_names) == self.n_models,
            "model_names",
            self.model_names,
            f"an empty list or {self.n_models} names (one per model)",
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- sparse training

# BatchTopK keeps k·B of the B·d_sae latent activations of a batch (32k of 4.7M at the demo's
# shapes). Training goes through those entries as flat row-major lists (row, latent, value): the
# decode, its two gradients and the encoder's weight gradient are gathers and scatter-sums over
# the entries (embedding_bag, sampled dense-dense products) instead of four dense [B, d_sae]
# matmuls; only the forward encode stays dense (batch top-k needs every pre-activation).


def _sort_indices(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``index.sort(-1)`` for non-negative integer indices below 2**53, through float64 keys: on CPU
    torch's integer sort is ~40x slower than its float sort (250 vs 6 ms for 32k int64)."""
    if index.device.type != "cpu":
        return index.sort(dim=-1)
    values, order = index.double().sort(dim=-1)
    return values.long(), order


TOPK_GROUPS = 8  # _flat_topk's number of interleaved groups


def _flat_topk(values: torch.Tensor, n_keep: int, groups: int = TOPK_GROUPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``values.topk(n_keep, sorted=False)`` of a flat tensor, as (values, indices), through group maxima.

    torch's CPU topk of a few thousand out of millions is one slow single-threaded pass (~90 ms for
    32k of 4.7M). Split the values into ``groups`` interleaved slices of length L = N / groups and
    call column c the values c, c + L, c + 2L, …; the n_keep columns with the largest maxima
    contain n_keep values at least the smallest of those maxima, so every value of the top n_keep
    lies in them (up to ties): one topk over the L column maxima and one over the n_keep · groups
    values of the chosen columns give the same set (ties broken arbitrarily, as topk's own are).
    """
    n = values.numel()
    if n % groups or n // groups < n_keep:
        top = values.topk(n_keep, sorted=False)
        return top.values, top.indices
    columns = values.view(groups, n // groups)
    chosen = columns.amax(0).topk(n_keep, sorted=False).indices
    candidates = columns.index_select(1, chosen).view(-1)  # [groups, n_keep] flattened
    top = candidates.topk(n_keep, sorted=False)
    slot = top.indices % n_keep
    return top.values, (top.indices // n_keep) * (n // groups) + chosen.index_select(0, slot)


def _offsets(index: torch.Tensor, n: int) -> torch.Tensor:
    """CSR offsets [n + 1] of the groups of a sorted index with values in [0, n)."""
    crow = torch.zeros(n + 1, dtype=torch.long, device=index.device)
    crow[1:] = torch.bincount(index, minlength=n).cumsum(0)
    return crow


def _by_column(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> tuple:
    """Entries (rows, cols) grouped by column, ordered by row within each (so sums over them are
    deterministic): (order, rows in that order, CSR offsets [n_cols + 1] of the groups)."""
    order = _sort_indices(cols * n_rows + rows)[1]
    return order, rows.index_select(0, order), _offsets(cols.index_select(0, order), n_cols)


def _scatter_rows(by_column: tuple, vals: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """out[c] = Σ_{e: cols[e] = c} vals[e] · dense[rows[e]] ([n_cols, dense.shape[1]]), i.e. Gᵀ·dense for
    the sparse matrix G with entries (rows, cols, vals) given as ``_by_column``; repeated entries add up."""
    order, rows, offsets = by_column
    weights = vals.index_select(0, order).to(dense.dtype)  # (x[idx] is ~100x slower than index_select on CPU)
    return F.embedding_bag(rows, dense, offsets[:-1], mode="sum", per_sample_weights=weights)


def _entry_dots(rows: torch.Tensor, cols: torch.Tensor, crow: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
    """out[e] = left[rows[e]] · right[cols[e]] for row-major entries (CSR offsets ``crow``, columns sorted
    within rows): a sampled dense-dense product on the CPU, row gathers in chunks elsewhere."""
    if left.device.type == "cpu":
        with warnings.catch_warnings():  # CSR is "beta" in torch; this use is covered by the tests
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow, cols, torch.zeros(len(cols), dtype=left.dtype), (len(left), len(right)), check_invariants=False
            )
            return torch.sparse.sampled_addmm(pattern, left, right.t(), beta=0.0).values()
    out = torch.empty(len(rows), dtype=left.dtype, device=left.device)
    chunk = 1 << 14
    for start in range(0, len(rows), chunk):
        stop = start + chunk
        out[start:stop] = (left[rows[start:stop]] * right[cols[start:stop]]).sum(-1)
    return out


class _EntryEncode(torch.autograd.Function):
    """vals[e] = acts[rows[e], cols[e]] with acts = relu(xs_flat @ W_enc + b_enc) [B, d_sae], computed
    by the caller without autograd. The pre-activations' gradient is nonzero only at the entries, so
    grad W_enc = xs_flatᵀ · G is a scatter-sum of input rows into the used columns (G: the entries'
    gradients through the ReLU) and grad b_enc an index_add; repeated entries add up."""

    @staticmethod
    def forward(ctx, W_enc, b_enc, xs_flat, acts, rows, cols, *by_column):
        vals = acts.reshape(-1).index_select(0, rows * acts.shape[1] + cols)
        ctx.save_for_backward(xs_flat, cols, vals, *by_column)
        ctx.n_latents = acts.shape[1]
        return vals

    @staticmethod
    def backward(ctx, grad_vals):
        xs_flat, cols, vals, *by_column = ctx.saved_tensors
        grad_pre = grad_vals * (vals > 0)  # ReLU: no gradient through clipped latents
        grad_W = grad_b = None
        if ctx.needs_input_grad[0]:  # [d_sae, n·d] scatter-sum, transposed into W_enc's layout
            grad_W = _scatter_rows(by_column, grad_pre, xs_flat).t().contiguous()
        if ctx.needs_input_grad[1]:
            grad_b = torch.zeros(ctx.n_latents, dtype=grad_pre.dtype, device=grad_pre.device)
            grad_b.index_add_(0, cols, grad_pre)
        return grad_W, grad_b, None, None, None, None, None, None, None


class _EntryDecode(torch.autograd.Function):
    """out[r] = Σ_{e: rows[e] = r} vals[e] · W_dec[cols[e]] ([B, n·d]) for row-major entries (CSR
    offsets ``crow``, columns sorted within rows). Backward: grad vals[e] = grad_out[rows[e]] ·
    W_dec[cols[e]] (sampled dense-dense product), grad W_dec a scatter-sum of grad_out rows into the
    used decoder rows."""

    @staticmethod
    def forward(ctx, vals, W_dec, rows, cols, crow, *by_column):
        ctx.save_for_backward(vals, W_dec, rows, cols, crow, *by_column)
        return F.embedding_bag(cols, W_dec, crow[:-1], mode="sum", per_sample_weights=vals.to(W_dec.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        vals, W_dec, rows, cols, crow, *by_column = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = _entry_dots(rows, cols, crow, grad_out, W_dec)
        if ctx.needs_input_grad[1]:
            grad_W = _scatter_rows(by_column, vals, grad_out)
        return grad_vals, grad_W, None, None, None, None, None, None


class Crosscoder(nn.Module):
    """Acausal crosscoder; ``encode``/``decode``/``forward`` take and give raw activations [B, n, d]."""

    def __init__(self, cfg: CrosscoderConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        n, d, d_sae = cfg.n_models, cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(n, d, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, n, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(n, d, dtype=dtype))
        self.register_buffer("threshold", torch.zeros(d_sae, dtype=dtype))
        self.register_buffer("input_scale", torch.ones(n, dtype=dtype))

    # ------------------------------------------------------------------ init

    def initialize(self, sample: torch.Tensor | None = None, seed: int = 0) -> None:
        """Random decoder directions (norm 1/√n per model; one per latent for every model with
        ``same_init``), W_enc = c·W_decᵀ, b_dec = each model's geometric median of ``sample``
        (scaled activations [N, n, d])."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if cfg.same_init:
                w = torch.randn(cfg.d_sae, 1, cfg.d_in, generator=gen, dtype=torch.float64).repeat(1, cfg.n_models, 1)
            else:
                w = torch.randn(self.W_dec.shape, generator=gen, dtype=torch.float64)
            w /= w.norm(dim=2, keepdim=True) * math.sqrt(cfg.n_models)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.permute(1, 2, 0) * (cfg.encoder_init_norm * math.sqrt(cfg.n_models)))
            self.b_enc.zero_()
            self.threshold.zero_()
            if sample is not None and len(sample):
                self.b_dec.copy_(torch.stack([geometric_median(sample[:, m].double()) for m in range(cfg.n_models)]))

    # ------------------------------------------------------------------ scaled space

    def scale_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.input_scale[:, None]

    def decoder_norms(self) -> torch.Tensor:
        """‖d_j^m‖ as [d_sae, n_models]."""
        return self.W_dec.norm(dim=2)

    def encode_pre(self, xs: torch.Tensor) -> torch.Tensor:
        """Pre-activations [B, d_sae] of scaled inputs [B, n, d]."""
        n, d, d_sae = self.W_enc.shape
        return torch.addmm(self.b_enc, xs.reshape(len(xs), n * d), self.W_enc.view(n * d, d_sae))

    def _batch_topk(self, acts: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
        n_keep = min(self.cfg.k * acts.shape[0], acts.numel())
        keep = weighted.flatten().topk(n_keep, sorted=False).indices
        mask = torch.zeros(acts.numel(), dtype=torch.bool, device=acts.device).scatter(0, keep, True)
        return acts * mask.view_as(acts)

    def encode_scaled(self, xs: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(self.encode_pre(xs))
        if self.cfg.architecture == "l1":
            return acts
        weighted = acts * self.decoder_norms().sum(1)
        if not self.training and bool((self.threshold > 0).any()):
            return acts * (weighted > self.threshold)
        return self._batch_topk(acts, weighted)

    def decode_scaled(self, f: torch.Tensor) -> torch.Tensor:
        d_sae, n, d = self.W_dec.shape
        return (f @ self.W_dec.view(d_sae, n * d)).view(len(f), n, d) + self.b_dec

    # ------------------------------------------------------------------ raw activations

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B, d_sae] of raw activations [B, n, d] (inference semantics in eval mode)."""
        return self.encode_scaled(self.scale_inputs(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstructions [B, n, d]."""
        return self.decode_scaled(f) / self.input_scale[:, None]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    # ------------------------------------------------------------------ training

    def training_losses(self, xs: torch.Tensor, dead: torch.Tensor | None = None, *, dense: bool = False) -> dict:
        """Loss terms for one batch of *scaled* inputs [B, n, d]; ``dead``: bool [d_sae] (AuxK).

        BatchTopK trains through the kept entries only (``_sparse_losses``); ``dense=True`` computes
        the same loss with dense [B, d_sae] latents (the plain formulation, kept as its reference).
        """
        cfg = self.cfg
        if cfg.architecture == "batchtopk" and not dense:
            return self._sparse_losses(xs, dead)
        acts = torch.relu(self.encode_pre(xs))
        norms = self.decoder_norms()
        out: dict = {}
        if cfg.architecture == "l1":
            f = acts
        else:
            weighted = acts * norms.sum(1)
            f = self._batch_topk(acts, weighted)
            if self.training:
                self._update_threshold(f * norms.sum(1).detach())
        recon = self.decode_scaled(f)
        per_model = (recon - xs).pow(2).sum(-1).mean(0)  # [n]
        mse = per_model.sum()
        loss = mse
        if cfg.architecture == "l1":
            sparsity = (f * norms.sum(1)).sum(-1).mean()
            loss = loss + cfg.l1_coefficient * sparsity
            out["l1"] = sparsity.detach()
        elif self._aux_active(dead):
            aux = self._aux_loss(xs, recon, dead, acts, norms)
            loss = loss + cfg.aux_coefficient * aux
            out["aux"] = aux.detach()
        fired = (f > 0).any(0)
        l0 = (f > 0).sum(-1).float().mean()
        out.update(loss=loss, mse=mse.detach(), mse_per_model=per_model.detach(), l0=l0.detach(), fired=fired)
        out["recon"] = recon.detach()
        return out

    def _aux_active(self, dead: torch.Tensor | None) -> bool:
        return self.cfg.aux_coefficient > 0 and dead is not None and bool(dead.any())

    def _aux_loss(self, xs, recon, dead, acts, norms):
        """AuxK: the top dead latents (by weighted activation) reconstruct the residual the live ones left."""
        d_sae, n, d = self.W_dec.shape
        dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(self.cfg.k_aux or self.cfg.d_in // 2, len(dead_idx))
        acts_dead = acts[:, dead_idx]
        local = (acts_dead * norms[dead_idx].sum(1)).detach().topk(k_aux, dim=-1).indices
        vals = acts_dead.gather(1, local)
        recon_aux = kernels.sparse_decode(dead_idx[local], vals, self.W_dec.view(d_sae, n * d))
        return self._aux_ratio(xs, recon, recon_aux)

    @staticmethod
    def _aux_ratio(xs, recon, recon_aux):
        """AuxK's loss: the dead latents' reconstruction of the residual, normalised by its variance."""
        residual = (xs - recon).detach().reshape(len(xs), -1)
        denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return (residual - recon_aux).pow(2).sum(-1).mean() / denom

    @torch.no_grad()
    def _select(self, xs: torch.Tensor, dead: torch.Tensor | None) -> dict:
        """BatchTopK's kept entries of a training batch, without autograd: the dense encode (one
        matmul) and batch top-k, as flat row-major lists ``rows``, ``cols`` (CSR row offsets
        ``crow``) and their weighted values; plus AuxK's entries (``aux_cols`` [B, k_aux], sorted
        per row) when latents are dead. ``acts`` is relu(pre) [B, d_sae]."""
        cfg = self.cfg
        batch, d_sae = len(xs), cfg.d_sae
        norm_sum = self.decoder_norms().sum(1)
        acts = self.encode_pre(xs).relu_()
        weighted = acts * norm_sum
        n_keep = min(cfg.k * batch, acts.numel())
        top_values, top_indices = _flat_topk(weighted.view(-1), n_keep)
        flat, order = _sort_indices(top_indices)  # row-major: sorted columns within each row
        rows, cols = flat // d_sae, flat % d_sae
        kept = top_values.index_select(0, order)
        sel = {"acts": acts, "rows": rows, "cols": cols, "crow": _offsets(rows, batch), "weighted": kept}
        if self._aux_active(dead):
            dead_idx = dead.nonzero().squeeze(1)
            k_aux = min(cfg.k_aux or cfg.d_in // 2, len(dead_idx))
            local = weighted.index_select(1, dead_idx).topk(k_aux, dim=-1).indices
            sel["aux_cols"] = _sort_indices(dead_idx.index_select(0, local.reshape(-1)).view_as(local))[0]
        return sel

    def _sparse_losses(self, xs: torch.Tensor, dead: torch.Tensor | None) -> dict:
        """BatchTopK's loss through its kept entries: the encoder's and the decoder's gradients are
        sparse products over the B·k kept entries (and AuxK's), never dense [B, d_sae] ones."""
        batch = len(xs)
        d_sae, n, d = self.W_dec.shape
        xs_flat = xs.reshape(batch, n * d)
        W_dec = self.W_dec.view(d_sae, n * d)
        sel = self._select(xs, dead)
        rows, cols = sel["rows"], sel["cols"]
        aux_cols = sel.get("aux_cols")
        kept_by_column = _by_column(rows, cols, batch, d_sae)
        if aux_cols is not None:  # one encoder backward for both sets of entries
            k_aux = aux_cols.shape[1]
            aux_rows = torch.arange(batch, device=xs.device).repeat_interleave(k_aux)
            all_rows, all_cols = torch.cat([rows, aux_rows]), torch.cat([cols, aux_cols.reshape(-1)])
            all_by_column = _by_column(all_rows, all_cols, batch, d_sae)
        else:
            all_rows, all_cols, all_by_column = rows, cols, kept_by_column
        W_enc = self.W_enc.view(n * d, d_sae)
        vals_all = _EntryEncode.apply(W_enc, self.b_enc, xs_flat, sel["acts"], all_rows, all_cols, *all_by_column)
        vals = vals_all[: len(rows)]
        if self.training:
            self._update_threshold(sel["weighted"])
        recon = _EntryDecode.apply(vals, W_dec, rows, cols, sel["crow"], *kept_by_column).view(batch, n, d) + self.b_dec
        per_model = (recon - xs).pow(2).sum(-1).mean(0)  # [n]
        mse = per_model.sum()
        loss = mse
        out: dict = {}
        if aux_cols is not None:
            crow_aux = torch.arange(0, batch * k_aux + 1, k_aux, device=xs.device)
            aux_flat = aux_cols.reshape(-1)
            aux_by_column = _by_column(aux_rows, aux_flat, batch, d_sae)
            recon_aux = _EntryDecode.apply(vals_all[len(rows) :], W_dec, aux_rows, aux_flat, crow_aux, *aux_by_column)
            aux = self._aux_ratio(xs, recon, recon_aux)
            loss = loss + self.cfg.aux_coefficient * aux
            out["aux"] = aux.detach()
        positive = (vals.detach() > 0).to(xs.dtype)
        fired = torch.bincount(cols, weights=positive, minlength=d_sae) > 0
        l0 = positive.sum().float() / batch
        out.update(loss=loss, mse=mse.detach(), mse_per_model=per_model.detach(), l0=l0, fired=fired)
        out["recon"] = recon.detach()
        return out

    @torch.no_grad()
    def _update_threshold(self, weighted_kept: torch.Tensor) -> None:
        if not weighted_kept.numel():
            return
        current = torch.where(weighted_kept > 0, weighted_kept, math.inf).min()  # the smallest positive one
        if math.isfinite(current):
            old = self.threshold[0]
            momentum = self.cfg.threshold_momentum
            self.threshold.fill_(float(current if old <= 0 else momentum * old + (1 - momentum) * current))


# ---------------------------------------------------------------------------- files


def save(cc: Crosscoder, folder: str | Path, extra: dict | None = None) -> Path:
    """Write the crosscoder atomically (layout in the module docstring); ``extra`` joins cfg.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in cc.state_dict().items()}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        record = {"format": FORMAT, "config": cc.cfg.to_dict(), **(extra or {})}
        record["sha256"] = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
        (tmp / CONFIG).write_text(json.dumps(record, indent=2, default=str))
    return folder


def load(folder: str | Path, dtype: torch.dtype = torch.float32) -> Crosscoder:
    """A crosscoder written by ``save`` (checksums verified), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: missing (expected a crosscoder folder written by sae-diff)")
    record = json.loads(cfg_path.read_text())
    if record.get("format") != FORMAT:
        raise DataError(f"{cfg_path}: format {record.get('format')!r}, expected {FORMAT!r}")
    verify_checksums(
        folder, record.get("sha256", {}), cfg_path, f"rebuild the crosscoder: delete {folder} and train it again"
    )
    # written before same_init existed: those started their decoders independently
    cc = Crosscoder(CrosscoderConfig(**{"same_init": False, **record["config"]}), dtype=dtype)
    tensors = load_file(str(folder / WEIGHTS))
    expected = {name: tuple(t.shape) for name, t in cc.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise DataError(f"{folder / WEIGHTS}: tensors {found}, expected {expected}")
    cc.load_state_dict(tensors)
    return cc.eval()


# ---------------------------------------------------------------------------- training


def _check_paired(paired, cfg: CrosscoderConfig) -> None:
    if (paired.n_models, paired.d_model) != (cfg.n_models, cfg.d_in):
        raise TrainingError(
            f"paired activations have {paired.n_models} models of width {paired.d_model}; "
            f"the crosscoder config expects n_models={cfg.n_models}, d_in={cfg.d_in}"
        )


def _state_tensors(cc: Crosscoder, opt, since_fired) -> dict:
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in cc.state_dict().items()}
    for pid, pstate in opt.state_dict()["state"].items():
        for key, value in pstate.items():
            tensors[f"adam.{pid}.{key}"] = torch.as_tensor(value).cpu().clone()
    tensors["since_fired"] = since_fired.cpu().clone()
    return tensors


def _load_state(cc: Crosscoder, opt, tensors: dict) -> torch.Tensor:
    cc.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = opt.state_dict()
    for key, value in tensors.items():
        if key.startswith("adam."):
            pid, name = key[5:].split(".", 1)
            state["state"].setdefault(int(pid), {})[name] = value
    opt.load_state_dict(state)
    return tensors["since_fired"]


def train(
    paired,
    cfg: CrosscoderConfig,
    out_dir: str | Path,
    n_tokens: int,
    batch_size: int = 4096,
    lr: float = 1e-4,
    seed: int = 0,
    epochs: int = 1,
    checkpoint_every: int = 200,
    progress: bool = True,
    *,
    warmup_steps: int = 50,
    decay_fraction: float = 0.2,
    dead_tokens: int = 200_000,
    shuffle_buffer: int = 1 << 18,
    init_sample: int = 4096,
    log_every: int = 10,
    work_dir: str | Path | None = None,
    device: str = "cpu",
    extra: dict | None = None,
) -> Path:
    """Train a crosscoder on ``n_tokens`` paired training tokens (times ``epochs``); write it to ``out_dir``.

    Each model's activations are scaled so that E‖s_m x_m‖ = √d (``estimate_scale`` per store); the
    scales are stored in the file. b_dec starts at each model's geometric median, Adam with warmup +
    linear decay (``sae.train.lr_factor``). A latent unfired for ``dead_tokens`` tokens is dead (AuxK,
    logged ``dead_fraction``). Every ``checkpoint_every`` steps the full state goes to ``work_dir``
    (default ``<out_dir>/../.crosscoder_state/<name>``): a killed run resumes there and ends with the
    same weights as an uninterrupted one. The final folder appears atomically.
    """
    from safetensors.torch import load_file, save_file

    from .progress import bar as progress_bar

    out_dir = Path(out_dir)
    check_replaceable(out_dir)  # a user's folder at the output path: an error before training
    _check_paired(paired, cfg)
    steps_per_epoch = max(1, min(n_tokens, paired.n_tokens("train")) // batch_size)
    total_steps = steps_per_epoch * epochs
    work_dir = Path(work_dir or out_dir.parent / STATE_DIR / out_dir.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        scales = [estimate_scale(store) for store in paired.stores]
        first = next(iter(paired.iter_batches(init_sample)))
    except ActivationStoreError as exc:
        raise TrainingError(f"before step 0 (input scaling and init): {exc}") from None
    scale_t = torch.tensor(scales, dtype=torch.float32)

    torch.manual_seed(seed)
    cc = Crosscoder(cfg)
    with torch.no_grad():
        cc.input_scale.copy_(scale_t)
    cc.initialize(cc.scale_inputs(first), seed=dictionary_seed(seed, "crosscoder"))  # not an SAE's start
    cc.to(device).train()
    try:
        opt = torch.optim.Adam(cc.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(cc.parameters(), lr=lr)
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)

    ckpt_tensors, ckpt_json = work_dir / "checkpoint.safetensors", work_dir / "checkpoint.json"
    fingerprint = {
        "config": cfg.to_dict(),
        "total_steps": total_steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "epochs": epochs,
        "scales": scales,
    }
    start_step, logs = 0, []
    if ckpt_json.exists() and ckpt_tensors.exists():
        meta = json.loads(ckpt_json.read_text())
        if meta.get("fingerprint") == json.loads(json.dumps(fingerprint)):
            since_fired = _load_state(cc, opt, load_file(str(ckpt_tensors))).to(device)
            start_step, logs = meta["step"], meta["logs"]
            log.info("resuming from step %d of %d", start_step, total_steps)
        else:
            log.warning("%s: checkpoint of a different run; starting afresh", ckpt_json)

    def stream():
        for epoch in range(epochs):  # each epoch reshuffles with its own seed
            batches = paired.iter_batches(batch_size, shuffle_buffer=shuffle_buffer, seed=seed + epoch, drop_last=True)
            for _, batch in zip(range(steps_per_epoch), batches):
                yield batch

    name = out_dir.name
    bar = progress_bar(total=total_steps, initial=start_step, desc=f"train crosscoder {name}", enabled=progress)
    step = start_step
    for step, batch in enumerate(_guarded(stream(), lambda: step)):
        if step >= total_steps:
            break
        if step < start_step:
            continue  # the stream is deterministic: skip what the checkpoint already saw
        xs = cc.scale_inputs(batch.to(device))
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, total_steps, warmup_steps, decay_fraction)
        dead = since_fired >= dead_tokens
        out = cc.training_losses(xs, dead=dead)
        if not torch.isfinite(out["loss"]):
            raise TrainingError(f"crosscoder {name}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        since_fired += len(xs)
        since_fired[out["fired"]] = 0
        if step % log_every == 0 or step == total_steps - 1:
            variance = (xs - xs.mean(0)).pow(2).sum(-1).mean(0)  # [n]
            fvu = (out["mse_per_model"] / variance.clamp_min(1e-12)).tolist()
            logs.append(
                {
                    "step": step,
                    "tokens": (step + 1) * batch_size,
                    "loss": float(out["loss"].detach()),
                    "mse": float(out["mse"]),
                    "fvu": float(out["mse"] / variance.sum().clamp_min(1e-12)),
                    **{f"fvu_m{m}": v for m, v in enumerate(fvu)},
                    "l0": float(out["l0"]),
                    "dead_fraction": float((since_fired >= dead_tokens).float().mean()),
                    "threshold": float(cc.threshold[0]),
                    "lr": opt.param_groups[0]["lr"],
                }
            )
        bar.update(1)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
            with atomic_path(ckpt_tensors) as tmp:
                save_file(_state_tensors(cc, opt, since_fired), str(tmp))
            write_json(ckpt_json, {"step": step + 1, "fingerprint": fingerprint, "logs": logs})
            crash_point("SAE_DIFF_KILL_AFTER_STEP", str(step + 1))
    bar.close()

    cc.cpu().eval()
    training = {"n_tokens": total_steps * batch_size, "epochs": epochs, "steps": total_steps, "lr": lr, "seed": seed}
    training.update(scales=scales, batch_size=batch_size, dead_tokens=dead_tokens, models=list(paired.names))
    training["dead_latents"] = int((since_fired >= dead_tokens).sum())
    save(cc, out_dir, extra={"training": training, **(extra or {})})
    with atomic_path(out_dir / "train_log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in logs))
    discard_checkpoint(work_dir, (ckpt_tensors, ckpt_json), state_parent=STATE_DIR)
    return out_dir


# ---------------------------------------------------------------------------- analysis


def _model_label(cc: Crosscoder, m: int) -> str:
    return f"m{m}"


@torch.no_grad()
def latent_table(cc: Crosscoder):
    """One row per latent: decoder norms, relative norms, decoder cosines and a class.

    Columns: ``latent``; ``norm_m0`` … ``norm_m{n-1}`` (‖d_j^m‖ in the scaled space);
    ``relative_norm`` = ‖d^last‖ / (‖d^first‖ + ‖d^last‖) (Lindsey et al. 2024); for n > 2 also
    ``relative_norm_m{i}`` = ‖d^i‖ / (‖d^0‖ + ‖d^i‖) and ``decoder_cosine_m{i}`` against model 0;
    ``delta_norm`` = Minder et al.'s Δnorm (first vs last, see ``MI_ONLY_MIN``); ``decoder_cosine``
    between the first and last model's decoder vectors (NaN where one is zero); ``class`` in
    {"shared", "mi_only", "m0_only", "other"} from Δnorm with the module's thresholds.
    """
    import numpy as np
    import pandas as pd

    w = cc.W_dec.detach().double().cpu()  # [d_sae, n, d]
    norms = w.norm(dim=2)
    n = cc.cfg.n_models
    data: dict = {"latent": np.arange(cc.cfg.d_sae)}
    for m in range(n):
        data[f"norm_{_model_label(cc, m)}"] = norms[:, m].numpy()

    def relative(i):
        total = norms[:, 0] + norms[:, i]
        return torch.where(total > 0, norms[:, i] / total.clamp_min(1e-300), torch.nan).numpy()

    def cosine(i):
        denom = norms[:, 0] * norms[:, i]
        dots = (w[:, 0] * w[:, i]).sum(-1)
        return torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.nan).numpy()

    data["relative_norm"] = relative(n - 1)
    if n > 2:
        for i in range(1, n):
            data[f"relative_norm_{_model_label(cc, i)}"] = relative(i)
    biggest = torch.maximum(norms[:, 0], norms[:, n - 1])
    delta = 0.5 * ((norms[:, n - 1] - norms[:, 0]) / biggest.clamp_min(1e-300) + 1)
    data["delta_norm"] = torch.where(biggest > 0, delta, torch.nan).numpy()
    data["decoder_cosine"] = cosine(n - 1)
    if n > 2:
        for i in range(1, n):
            data[f"decoder_cosine_{_model_label(cc, i)}"] = cosine(i)
    table = pd.DataFrame(data)
    dn = table["delta_norm"]
    table["class"] = np.select(
        [dn > MI_ONLY_MIN, dn < M0_ONLY_MAX, (dn >= SHARED_RANGE[0]) & (dn <= SHARED_RANGE[1])],
        ["mi_only", "m0_only", "shared"],
        default="other",
    )
    return table


def _eval_batches(paired, split: str, batch_size: int):
    return paired.iter_batches(batch_size, split=split)


@torch.no_grad()
def firing_stats(cc: Crosscoder, paired, split: str = "eval", batch_size: int = 4096):
    """``latent_table(cc)`` plus ``firing_frequency`` (fraction of tokens with f_j > 0),
    ``mean_activation`` (over all tokens), ``mean_active_activation`` (over firing tokens) and
    ``max_activation``, streamed over ``split`` in float64."""
    _check_paired(paired, cc.cfg)
    cc.eval()
    fires = torch.zeros(cc.cfg.d_sae, dtype=torch.float64)
    total = torch.zeros(cc.cfg.d_sae, dtype=torch.float64)
    peak = torch.zeros(cc.cfg.d_sae, dtype=torch.float64)
    n = 0
    for batch in _eval_batches(paired, split, batch_size):
        f = cc.encode(batch.to(cc.W_enc.dtype)).double()
        fires += (f > 0).sum(0)
        total += f.sum(0)
        peak = torch.maximum(peak, f.max(0).values)
        n += len(f)
    if n == 0:
        raise ValueError(f"no tokens in the {split} split")
    table = latent_table(cc)
    table["firing_frequency"] = (fires / n).numpy()
    table["mean_activation"] = (total / n).numpy()
    table["mean_active_activation"] = torch.where(fires > 0, total / fires.clamp_min(1), torch.nan).numpy()
    table["max_activation"] = peak.numpy()
    return table


@torch.no_grad()
def latent_scaling(cc: Crosscoder, paired, latents=None, split: str = "eval", batch_size: int = 4096):
    """Latent Scaling (Minder et al. 2025, Sec. 3): per latent j and model m, the closed-form

        β_m = argmin_β Σ_t ‖β f_j(t) d_j − y_m(t)‖²
            = Σ_t f_j(t) ⟨d_j, y_m(t)⟩ / (‖d_j‖² Σ_t f_j(t)²)

    with d_j the *last* (tuned) model's decoder vector for every m, in the scaled space, for targets
      * ``error``:          y = x_m − x̂_m + f_j d_j^m   (the reconstruction error with latent j's own
                                                        contribution to model m added back) -> β^ε_m
      * ``reconstruction``: y = x̂_m                     (model m's reconstruction)           -> β^r_m
      * ``activation``:     y = x_m                      (model m's activation)               -> β^a_m
    (the targets of the reference code, science-of-finetuning's latent_scaling ``load_*_error`` /
    ``load_*_reconstruction`` / ``load_*_activation``). Ratios ``nu_error`` = β^ε_first / β^ε_last and
    ``nu_reconstruction`` = β^r_first / β^r_last (for n > 2 also ``nu_error_m{i}`` etc. for every
    model i against the last) and ``scaling_label`` ("genuine" / "complete_shrinkage" /
    "latent_decoupling" / "unmeasured", thresholds ``NU_ERROR_MAX`` and ``NU_RECONSTRUCTION_MAX``),
    given to Mi-only latents only (``class`` from ``latent_table``); other latents get "not_mi_only"
    (their ν are still reported: a shared latent has ν ≈ 1).

    ``latents``: indices (default: every latent). Sums are accumulated in float64 over batches, so
    memory is O(batch · len(latents)).
    """
    import numpy as np

    _check_paired(paired, cc.cfg)
    cc.eval()
    n = cc.cfg.n_models
    idx = torch.arange(cc.cfg.d_sae) if latents is None else torch.as_tensor(list(latents), dtype=torch.long)
    idx = idx.reshape(-1)
    w = cc.W_dec.detach().double()[idx]  # [K, n, d]
    d_tuned = w[:, n - 1]  # [K, d]
    own = (w * d_tuned[:, None]).sum(-1)  # ⟨d_j^last, d_j^m⟩ [K, n]
    sq_norm = d_tuned.pow(2).sum(-1)  # [K]
    sum_f2 = torch.zeros(len(idx), dtype=torch.float64)
    sum_act = torch.zeros(len(idx), n, dtype=torch.float64)  # Σ f ⟨d, x_m⟩
    sum_rec = torch.zeros(len(idx), n, dtype=torch.float64)  # Σ f ⟨d, x̂_m⟩
    for batch in _eval_batches(paired, split, batch_size):
        xs = cc.scale_inputs(batch.to(cc.W_enc.dtype))
        f = cc.encode_scaled(xs)
        recon = cc.decode_scaled(f)
        fj = f[:, idx].double()  # [B, K]
        sum_f2 += fj.pow(2).sum(0)
        for m in range(n):
            sum_act[:, m] += (fj * (xs[:, m].double() @ d_tuned.T)).sum(0)
            sum_rec[:, m] += (fj * (recon[:, m].double() @ d_tuned.T)).sum(0)
    sum_err = sum_act - sum_rec + sum_f2[:, None] * own
    denom = (sq_norm * sum_f2)[:, None]
    measured = denom > 0

    def beta(numerator):
        return torch.where(measured, numerator / denom.clamp_min(1e-300), torch.nan)

    betas = {"error": beta(sum_err), "reconstruction": beta(sum_rec), "activation": beta(sum_act)}
    table = latent_table(cc).iloc[idx.numpy()].reset_index(drop=True)
    table = table[["latent", "class", "relative_norm", "delta_norm"]].copy()
    table["f_sq_sum"] = sum_f2.numpy()
    for target, values in betas.items():
        for m in range(n):
            table[f"beta_{target}_{_model_label(cc, m)}"] = values[:, m].numpy()
    for target, values in betas.items():
        tuned = values[:, n - 1]
        for m in range(n - 1):
            ratio = torch.where(tuned.abs() > 1e-12, values[:, m] / tuned, torch.nan).numpy()
            table[f"nu_{target}" if m == 0 else f"nu_{target}_{_model_label(cc, m)}"] = ratio
    nu_e, nu_r = table["nu_error"].to_numpy(), table["nu_reconstruction"].to_numpy()
    table["scaling_label"] = np.select(
        [
            table["class"].to_numpy() != "mi_only",
            ~np.isfinite(nu_e) | ~np.isfinite(nu_r),
            nu_e > NU_ERROR_MAX,
            nu_r > NU_RECONSTRUCTION_MAX,
        ],
        ["not_mi_only", "unmeasured", "complete_shrinkage", "latent_decoupling"],
        default="genuine",
    )
    return table


@torch.no_grad()
def reconstruction_metrics(cc: Crosscoder, paired, split: str = "eval", batch_size: int = 4096) -> dict:
    """Per model (raw activations): FVU, explained variance, MSE, cosine, … from
    ``evaluate.ReconstructionAccumulator`` (SAELens's definitions, float64 sums); the latent
    statistics (L0 of the shared code, dead fraction) are the same for every model and also given
    at the top level. Returns ``{"n_tokens", "l0", "dead_fraction", "n_dead", "models": {"m0": {...}, ...}}``."""
    from .evaluate import ReconstructionAccumulator

    _check_paired(paired, cc.cfg)
    cc.eval()
    accs = [ReconstructionAccumulator(cc.cfg.d_sae) for _ in range(cc.cfg.n_models)]
    for batch in _eval_batches(paired, split, batch_size):
        batch = batch.to(cc.W_enc.dtype)
        recon, f = cc(batch)
        for m, acc in enumerate(accs):
            acc.add(batch[:, m], recon[:, m], f)
    if accs[0].n == 0:
        raise ValueError(f"no tokens in the {split} split")
    keep = ("explained_variance", "fvu", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias")
    models = {}
    for m, acc in enumerate(accs):
        metrics = acc.metrics()
        models[_model_label(cc, m)] = {key: float(metrics[key]) for key in keep}
        if cc.cfg.model_names:
            models[_model_label(cc, m)]["name"] = cc.cfg.model_names[m]
    first = accs[0].metrics()
    return {
        "n_tokens": int(first["n_tokens"]),
        "l0": float(first["l0"]),
        "dead_fraction": float(first["dead_fraction"]),
        "n_dead": int(first["n_dead"]),
        "models": models,
    }


# the spliced metrics of each model, as metrics.json names them (evaluate.spliced_metrics says "sae")
SPLICED_KEYS = {
    "ce_loss_clean": "ce_loss_clean",
    "ce_loss_with_sae": "ce_loss_with_spliced",
    "ce_loss_with_ablation": "ce_loss_with_ablation",
    "ce_loss_score": "ce_loss_score",
    "kl_div_with_sae": "kl_div_with_spliced",
    "kl_div_with_ablation": "kl_div_with_ablation",
    "kl_div_score": "kl_div_score",
    "n_positions": "n_positions",
}
SPLICED_BATCH_SIZE = 8  # sequences per forward, as evaluation.spliced_batch_size's default


def _resid_post(model, layer: int, batch: dict) -> torch.Tensor:
    """Block ``layer``'s output [B, T, d] of ``model`` on the batch (the blocks above do not run)."""
    from . import models

    site = (layer, "resid_post")
    with models.capture(model, [site]) as store:
        models.run_until_stopped(
            model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    return store[site]


@torch.no_grad()
def spliced_metrics(
    cc: Crosscoder,
    loaded: list,
    tokenizer,
    table,
    layer: int,
    max_length: int = 128,
    batch_size: int = SPLICED_BATCH_SIZE,
    exclude_special: bool = True,
    exclude_first: bool = True,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Per model m: CE loss and KL with the crosscoder's reconstruction of model m spliced into
    model m after block ``layer`` (resid_post), against the clean model and the layer
    zero-ablated: ``evaluate.spliced_metrics`` (SAELens's definitions) with the crosscoder in
    place of an SAE.

    Every model reads the same texts of ``table`` (tokenized once, with ``tokenizer``: the paired
    stores hold the same token ids under every model). At each kept token the crosscoder encodes
    the concatenation of all models' activations of that token — model m's own block output and
    the other models' outputs of the same batch, run up to the layer — and model m's part of the
    decode is spliced in. ``loaded``: the models, in the crosscoder's order.

    Returns ``{"m0": {ce_loss_clean, ce_loss_with_spliced, ce_loss_with_ablation, ce_loss_score,
    kl_div_with_spliced, kl_div_with_ablation, kl_div_score, n_positions}, ...}``.
    """
    from . import evaluate

    if len(loaded) != cc.cfg.n_models:
        raise ValueError(f"{len(loaded)} models for a crosscoder over {cc.cfg.n_models}")
    cc.eval()
    weights = cc.W_enc

    def reconstruct_for(m: int):
        def reconstruct(hidden: torch.Tensor, batch: dict) -> torch.Tensor:
            parts = []
            for j, model in enumerate(loaded):
                h = hidden if j == m else _resid_post(model, layer, batch)
                parts.append(h[batch["keep"].to(h.device)].to(device=weights.device, dtype=weights.dtype))
            recon, _ = cc(torch.stack(parts, 1))
            return recon[:, m]

        return reconstruct

    out = {}
    for m, model in enumerate(loaded):
        metrics, _ = evaluate.spliced_metrics(
            model, tokenizer, None, table, layer, max_length=max_length, batch_size=batch_size,
            exclude_special=exclude_special, exclude_first=exclude_first, device=device,
            progress=progress, reconstruct=reconstruct_for(m),
        )  # fmt: skip
        out[_model_label(cc, m)] = {new: metrics[old] for old, new in SPLICED_KEYS.items()}
    return out


def _spliced_or_reason(cc: Crosscoder, paired, samples, lens_models, tokenizer, opts: dict, place, progress: bool):
    """``spliced_metrics`` on the first ``opts["spliced_samples"]`` eval samples, tokenized as the
    stores were; or (None, why it was skipped)."""
    from . import evaluate, models

    n_samples = int(opts.get("spliced_samples", 0) or 0)
    manifest = paired.stores[-1].manifest
    if n_samples == 0:
        return None, "disabled in the config (diffing.crosscoder.spliced_samples: 0)"
    if samples is None or tokenizer is None or not lens_models or any(m is None for m in lens_models):
        return None, "no models or samples given"
    hook_point = manifest.get("hook_point")
    if hook_point != "resid_post":
        return None, f"splicing is implemented for the residual stream; this crosscoder reads {hook_point}"
    eval_rows = samples[samples["split"] == "eval"].head(n_samples)
    if eval_rows.empty:
        return None, "no eval samples"
    place = models.as_placement(place)
    masking = manifest.get("masking", {})
    with place.precision():
        per_model = spliced_metrics(
            cc, lens_models, tokenizer, eval_rows, int(manifest["layer"]),
            max_length=int(manifest.get("max_length") or 128),
            exclude_special=masking.get("exclude_special_tokens", True),
            exclude_first=masking.get("exclude_first_position", True),
            device=place.device, progress=progress,
        )  # fmt: skip
    return {label: evaluate.json_ready(values) for label, values in per_model.items()}, None


# --------------------------------------------------------------------------- workflow stage


class _DecoderView:
    """One model's decoder rows of a crosscoder, read like an SAE's by ``features.logit_lens``."""

    def __init__(self, cc: Crosscoder, m: int):
        self.W_dec = cc.W_dec.detach()[:, m, :]


def ranked_mi_only(table, top: int | None = None):
    """Mi-only latents, genuine ones (Latent Scaling) first, each group by the tuned model's share
    of the code: mean activation (train split) times the tuned decoder's norm."""
    last = f"norm_m{sum(c.startswith('norm_m') for c in table.columns) - 1}"
    mi = table[table["class"] == "mi_only"].copy()
    mi["weight"] = mi["mean_activation"] * mi[last]
    mi["genuine"] = mi.get("scaling_label", "genuine") == "genuine"
    mi = mi.sort_values(["genuine", "weight"], ascending=[False, False], kind="stable")
    return mi if top is None else mi.head(top)


def ranked_moved(table, top: int | None = None):
    """The latents whose decoders moved (``moved_rank``, written by ``run``), most moved first."""
    moved = table.dropna(subset=["moved_rank"]).sort_values("moved_rank")
    return moved if top is None else moved.head(top)


def moved_vectors(cc: Crosscoder, mean_activation, latents=None):
    """What each latent adds to the last model's reconstruction and not to the first's at its mean
    activation, in raw activation space (float64 [len(latents), d]):

        moved_j = mean_activation_j · (d_j^Mi / s_Mi − d_j^M0 / s_M0)

    (``d_j^m`` the latent's decoder for model m, ``s_m`` that model's input scale). Summed over
    every latent this is the difference between the two models' mean reconstructions (less b_dec);
    one latent's row says where the change sits when it rides on a latent both models share, e.g. a
    direction that a fine-tune adds to some tokens' activations: the latent of those tokens keeps
    firing in both models and its Mi decoder moves. With ``same_init`` a row is zero unless the two
    models' activations differ. ``mean_activation`` is indexed like ``latents`` (default: all)."""
    import numpy as np

    ids = torch.arange(cc.cfg.d_sae) if latents is None else torch.from_numpy(np.array(latents, dtype=np.int64))
    weights = torch.from_numpy(np.array(mean_activation, dtype=np.float64))  # copies: parquet's are read-only
    with torch.no_grad():  # on the CPU, in float64, wherever the crosscoder lives
        w = cc.W_dec.detach().double().cpu()[ids]
        raw = w / cc.input_scale.detach().double().cpu()[None, :, None]  # [k, n, d]: each latent's decoder per model
        return (weights[:, None] * (raw[:, -1] - raw[:, 0])).numpy()


def mi_only_direction(out_dir: str | Path, k: int):
    """What the crosscoder's top ``k`` Mi-only latents (``ranked_mi_only``: genuine first) add to the
    tuned model's activations and not to the base model's, on average, in raw activation space
    (float64 numpy [d]):

        v = Σ_j  mean_activation_j · (d_j^Mi / s_Mi − d_j^M0 / s_M0)

    (``moved_vectors`` summed over them: the difference between the two models' reconstructions from
    those latents alone). ``out_dir`` is a crosscoder run's folder (``run``); the first and
    last models are M0 and Mi. A zero vector when the crosscoder has no Mi-only latent: then there is
    nothing of the crosscoder's to steer with. The interventions steer M0 with it, and project it
    out of Mi, as the lens's direction is (``conditions.comparison_conditions``)."""
    import numpy as np
    import pandas as pd

    out_dir = Path(out_dir)
    top = ranked_mi_only(pd.read_parquet(out_dir / "latents.parquet"), k)
    cc = load(out_dir / "crosscoder", dtype=torch.float64)
    if top.empty:
        return np.zeros(cc.cfg.d_in, dtype=np.float64)
    return moved_vectors(cc, top["mean_activation"].to_numpy(), top["latent"].to_numpy()).sum(0)


def run(
    paired,
    cfg: CrosscoderConfig,
    out_dir: Path,
    training: dict,
    opts: dict,
    samples,
    lens_models: list | None = None,
    tokenizer=None,
    features_opts: dict | None = None,
    device: str = "cpu",
    progress: bool = True,
    place=None,
) -> dict:
    """Train a crosscoder on one same-token pair (or set), then describe every latent.

    Writes, beside the crosscoder folder ``out_dir/crosscoder``: ``latents.parquet`` (``latent_table``
    + firing statistics on the train split, which ranks, + Latent Scaling of the Mi-only latents on
    the train split + each model's logit lens of its own decoder + ``moved_norm`` = ‖moved_j‖ of
    ``moved_vectors`` and ``moved_rank``, 1 for the largest, none where it is 0), ``examples.json``
    (top and quantile-sampled contexts per latent on the eval split) and ``metrics.json`` (per-model
    reconstruction on the eval split, class counts, Latent Scaling label counts, ``moved``).

    With the models (``lens_models``, in the crosscoder's order), their ``tokenizer`` and
    ``opts["spliced_samples"]`` > 0, each model's entry of ``metrics.json`` also holds the spliced
    CE / KL (``spliced_metrics``) on the first that many eval samples of ``samples``, and
    ``spliced`` says how many; else ``spliced_skipped`` says why. ``place``: a models.Placement
    for the spliced forwards (default: ``device``, float32).
    """
    import numpy as np
    import pandas as pd

    from . import features
    from .io import write_json, write_parquet

    out_dir = Path(out_dir)
    folder = train(
        paired,
        cfg,
        out_dir / "crosscoder",
        n_tokens=training["tokens"],
        batch_size=training["batch_size"],
        lr=opts["lr"],
        seed=opts["seed"],
        epochs=training["epochs"],
        checkpoint_every=training["checkpoint_every"],
        progress=progress,
        warmup_steps=opts["warmup_steps"],
        decay_fraction=opts["decay_fraction"],
        dead_tokens=opts["dead_tokens"],
        shuffle_buffer=training["shuffle_buffer"],
        work_dir=out_dir / STATE_DIR,
        device=device,
    )
    cc = load(folder).to(device)
    table = firing_stats(cc, paired, split="train")
    mi_only = table.index[table["class"] == "mi_only"].to_numpy()
    if len(mi_only):
        scaling = latent_scaling(cc, paired, latents=mi_only, split="train")
        keep = [c for c in scaling.columns if c.startswith(("beta_", "nu_")) or c in ("scaling_label", "f_sq_sum")]
        table = table.merge(scaling[["latent", *keep]], on="latent", how="left")
    table["scaling_label"] = table.get("scaling_label", pd.Series(index=table.index, dtype=object)).fillna(
        "not_mi_only"
    )
    for m, model in enumerate(lens_models or []):
        if model is None:
            continue
        lens = features.logit_lens(_DecoderView(cc, m), model, tokenizer, k=opts["logit_lens_k"])
        table = table.merge(
            lens[["feature", "promoted", "suppressed"]].rename(
                columns={"feature": "latent", "promoted": f"promoted_m{m}", "suppressed": f"suppressed_m{m}"}
            ),
            on="latent",
        )
    ranked = ranked_mi_only(table)
    table["mi_only_rank"] = pd.Series(range(1, len(ranked) + 1), index=ranked.index)
    moved = moved_vectors(cc, table["mean_activation"].to_numpy(), table["latent"].to_numpy())
    table["moved_norm"] = np.linalg.norm(moved, axis=1)
    by_moved = table[table["moved_norm"] > 0].sort_values("moved_norm", ascending=False, kind="stable")
    table["moved_rank"] = pd.Series(range(1, len(by_moved) + 1), index=by_moved.index)
    examples = {}
    if features_opts is not None:
        result = features.run(
            cc, paired, samples["sample_id"].to_numpy(), batch_size=features_opts["batch_size"],
            n_examples=features_opts["n_examples"], context_window=features_opts["context_window"],
            tokenizer=tokenizer, device=device, progress=progress,
        )  # fmt: skip
        examples = {str(k): v for k, v in result.examples.items()}
    metrics = reconstruction_metrics(cc, paired, split="eval")
    spliced, skipped = _spliced_or_reason(cc, paired, samples, lens_models, tokenizer, opts, place or device, progress)
    for label, values in (spliced or {}).items():
        metrics["models"][label].update(values)
    if spliced:
        n_eval = int((samples["split"] == "eval").sum())
        metrics["spliced"] = {"n_samples": min(int(opts["spliced_samples"]), n_eval)}
    else:
        metrics["spliced_skipped"] = skipped
    counts = table["class"].value_counts().to_dict()
    record = {
        **metrics,
        "classes": {name: int(counts.get(name, 0)) for name in ("mi_only", "shared", "m0_only", "other")},
        "scaling_labels": {str(k): int(v) for k, v in table["scaling_label"].value_counts().items()},
        # the change as it rides on latents: the norm of Σ_j moved_j (the mean reconstructions'
        # difference, less b_dec) and how many latents carry any of it
        "moved": {"n_latents": len(by_moved), "total_norm": float(np.linalg.norm(moved.sum(0)))},
        "thresholds": {
            "mi_only_delta_norm_above": MI_ONLY_MIN,
            "m0_only_delta_norm_below": M0_ONLY_MAX,
            "shared_delta_norm": list(SHARED_RANGE),
            "nu_error_max": NU_ERROR_MAX,
            "nu_reconstruction_max": NU_RECONSTRUCTION_MAX,
        },
    }
    write_parquet(table, out_dir / "latents.parquet")
    write_json(out_dir / "examples.json", examples)
    write_json(out_dir / "metrics.json", record)
    log.info("crosscoder %s: classes %s, Latent Scaling %s", out_dir, record["classes"], record["scaling_labels"])
    return record
