"""Sparse TopK kernels with hand-written backward passes (CPU, torch ops).

With k active latents out of d_sae per token, only k encoder columns and k decoder rows
take part in a token's reconstruction. The dense backward touches all d_sae of them; these
functions touch only the active ones:

* ``sparse_decode(idx, vals, W_dec)``: sum_j vals[b, j] * W_dec[idx[b, j]] (embedding_bag);
  backward computes grad_vals only at the active entries (a sampled dense-dense product,
  SDDMM: 3 ms where gathering the rows took 59 ms at batch 4096, k 32, d 576) and
  scatter-adds grad_W_dec through a sparse product.
* ``topk_encode(x, W_enc_T, b_enc, k)``: ReLU(TopK(x @ W_enc_T.T + b_enc)); backward
  gives gradient only to the k active encoder rows.

Indices are sorted within each row before any sparse matrix is built: CSR/COO built from
the unsorted output of ``topk(sorted=False)`` silently gives wrong gradients.

On CUDA (with Triton installed) the same three primitives run as Triton kernels
(``triton_kernels``); ``SAE_DIFF_KERNELS=triton`` forces that path for CPU tensors too,
which only makes sense under Triton's interpreter (``TRITON_INTERPRET=1``, used by tests).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch.nn import functional as F


@functools.lru_cache(maxsize=1)
def _triton_module():
    try:
        from . import triton_kernels
    except ImportError:  # no triton: the torch path serves every device
        return None
    return triton_kernels


def _triton_for(tensor: torch.Tensor):
    """The Triton kernels module when ``tensor`` should use it, else None."""
    if tensor.is_cuda or os.environ.get("SAE_DIFF_KERNELS") == "triton":
        return _triton_module()
    return None


GATHER_CHUNK = 64  # rows per chunk when gathering [rows, k, d] blocks: small blocks stay in cache, no page faults


def _row_sparse(idx: torch.Tensor, vals: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A [B, n_cols] sparse COO matrix from per-row (sorted) column indices and values."""
    batch, k = idx.shape
    rows = torch.arange(batch, device=idx.device).repeat_interleave(k)
    indices = torch.stack([rows, idx.reshape(-1)])
    return torch.sparse_coo_tensor(
        indices, vals.reshape(-1), (batch, n_cols), is_coalesced=True, check_invariants=False
    )


def _gather_dot(idx: torch.Tensor, table: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """out[b, j] = grad[b] . table[idx[b, j]] for row-sorted idx, as an SDDMM on the CPU."""
    batch, k = idx.shape
    if grad.device.type == "cpu":
        crow = torch.arange(0, batch * k + 1, k, device=idx.device)
        with warnings.catch_warnings():  # CSR is "beta" in torch; this use is covered by our tests
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow,
                idx.reshape(-1),
                torch.zeros(batch * k, dtype=grad.dtype),
                (batch, table.shape[0]),
                check_invariants=False,
            )
        return torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0).values().view(batch, k)
    out = torch.empty(idx.shape, dtype=grad.dtype, device=grad.device)
    for start in range(0, batch, GATHER_CHUNK):
        stop = start + GATHER_CHUNK
        rows = table[idx[start:stop]]  # [chunk, k, d]
        out[start:stop] = torch.bmm(rows, grad[start:stop].unsqueeze(-1)).squeeze(-1)
    return out


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, vals, W_dec):
        order = None
        if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
            idx, order = idx.sort(dim=-1)  # sparse patterns need sorted columns per row
            vals = vals.gather(-1, order)
        ctx.save_for_backward(idx, vals, W_dec, order if order is not None else torch.empty(0))
        ctx.sorted_here = order is not None
        tk = _triton_for(W_dec)
        if tk is not None:
            return tk.gather_sum(idx, vals, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        idx, vals, W_dec, order = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        tk = _triton_for(W_dec)
        grad_vals = None
        if ctx.needs_input_grad[1]:
            grad_vals = tk.gather_dot(idx, W_dec, grad_out) if tk else _gather_dot(idx, W_dec, grad_out)
            if ctx.sorted_here:  # back to the caller's order
                grad_vals = torch.empty_like(grad_vals).scatter_(-1, order, grad_vals)
        grad_W = None
        if ctx.needs_input_grad[2]:
            if tk is not None:
                grad_W = tk.scatter_add(idx, vals, grad_out, W_dec.shape[0])
            else:
                grad_W = torch.sparse.mm(_row_sparse(idx, vals, W_dec.shape[0]).t().coalesce(), grad_out)
        return None, grad_vals, grad_W


_BUFFERS: dict = {}


def _scratch(shape, dtype, device) -> torch.Tensor:
    """A reused buffer: fresh allocations over ~32 MB page-fault (about 25 ms each on CPU)."""
    key = (tuple(shape), dtype, str(device))
    if key not in _BUFFERS:
        if len(_BUFFERS) >= 4:  # a few shapes at most (one per SAE width in a run)
            _BUFFERS.clear()
        _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return _BUFFERS[key]


class TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc_T, b_enc, k, low=None):
        # pre-activations are consumed by topk right here, so one scratch buffer serves every call
        if low is not None:  # autocast: the step's largest matmul in its low precision
            pre = torch.addmm(b_enc.to(low), x.to(low), W_enc_T.to(low).t())
        elif x.is_cuda:  # the caching allocator already reuses GPU memory
            pre = torch.addmm(b_enc, x, W_enc_T.t())
        else:
            pre = torch.addmm(b_enc, x, W_enc_T.t(), out=_scratch((x.shape[0], W_enc_T.shape[0]), x.dtype, x.device))
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        idx, order = idx.sort(dim=-1)
        vals = vals.gather(-1, order).clamp_min(0).to(x.dtype)
        ctx.save_for_backward(x, W_enc_T, idx, vals)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, _grad_idx):
        x, W_enc_T, idx, vals = ctx.saved_tensors
        grad_pre = grad_vals * (vals > 0)  # ReLU: no gradient through clipped latents
        grad_x = grad_W = grad_b = None
        tk = _triton_for(x)
        if ctx.needs_input_grad[0]:
            if tk is not None:
                grad_x = tk.gather_sum(idx, grad_pre, W_enc_T)
            else:
                grad_x = F.embedding_bag(idx, W_enc_T, per_sample_weights=grad_pre, mode="sum")
        if ctx.needs_input_grad[1]:
            if tk is not None:
                grad_W = tk.scatter_add(idx, grad_pre, x, W_enc_T.shape[0])
            else:
                grad_W = torch.sparse.mm(_row_sparse(idx, grad_pre, W_enc_T.shape[0]).t().coalesce(), x)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc_T.shape[0], dtype=grad_pre.dtype, device=grad_pre.device)
            grad_b.index_add_(0, idx.reshape(-1), grad_pre.reshape(-1))
        return grad_x, grad_W, grad_b, None, None


def _autocast_dtype(tensor: torch.Tensor):
    """The low-precision dtype when autocast is on for this tensor's device, else None."""
    device_type = tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    # k rows per token: cheap and precision-sensitive, so in the parameters' dtype (also under autocast)
    with torch.autocast(device_type=W_dec.device.type, enabled=False):
        return SparseDecode.apply(idx, vals.to(W_dec.dtype), W_dec)


def topk_encode(x: torch.Tensor, W_enc_T: torch.Tensor, b_enc: torch.Tensor, k: int):
    """Under autocast the pre-activations are computed in its dtype (bf16); the chosen values,
    every gradient and the parameters keep the parameters' dtype."""
    low = _autocast_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return TopKEncode.apply(x.to(W_enc_T.dtype), W_enc_T, b_enc, k, low)
