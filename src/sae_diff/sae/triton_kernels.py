"""Triton kernels for the sparse TopK path on CUDA (the CPU path lives in ``kernels``).

Three primitives cover the forward and backward of ``sparse_decode`` and ``topk_encode``:

* ``gather_sum(idx, vals, table)``:   out[b] = Σ_j vals[b, j] · table[idx[b, j]]      [B, D]
* ``gather_dot(idx, table, grad)``:   out[b, j] = grad[b] · table[idx[b, j]]         [B, K]
* ``scatter_add(idx, vals, src, n)``: out[idx[b, j]] += vals[b, j] · src[b]          [n, D]

Accumulation is in float32 whatever the storage dtype. ``scatter_add`` uses atomic adds,
so on a GPU the summation order (and the last bits) can vary between runs. The kernels
also run in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how the
test suite checks them on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 128


@triton.jit
def _gather_sum_kernel(idx_ptr, vals_ptr, table_ptr, out_ptr, K, D, stride_table, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, K):
        row = tl.load(idx_ptr + b * K + j)
        weight = tl.load(vals_ptr + b * K + j).to(tl.float32)
        acc += weight * tl.load(table_ptr + row * stride_table + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * D + offs, acc, mask=mask)


@triton.jit
def _gather_dot_kernel(idx_ptr, grad_ptr, table_ptr, out_ptr, K, D, stride_table, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    row = tl.load(idx_ptr + b * K + j)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < D
        g = tl.load(grad_ptr + b * D + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(table_ptr + row * stride_table + offs, mask=mask, other=0.0).to(tl.float32)
        acc += g * w
    tl.store(out_ptr + b * K + j, tl.sum(acc, axis=0))


@triton.jit
def _scatter_add_kernel(idx_ptr, vals_ptr, src_ptr, out_ptr, K, D, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    src = tl.load(src_ptr + b * D + offs, mask=mask, other=0.0).to(tl.float32)
    for j in range(0, K):
        row = tl.load(idx_ptr + b * K + j)
        weight = tl.load(vals_ptr + b * K + j).to(tl.float32)
        tl.atomic_add(out_ptr + row * D + offs, weight * src, mask=mask)


def _grid_d(batch: int, width: int):
    return (batch, triton.cdiv(width, BLOCK_D))


def gather_sum(idx: torch.Tensor, vals: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    idx, vals = idx.contiguous(), vals.contiguous()
    table = table if table.stride(1) == 1 else table.contiguous()
    batch, k = idx.shape
    out = torch.empty((batch, table.shape[1]), dtype=torch.float32, device=table.device)
    _gather_sum_kernel[_grid_d(batch, table.shape[1])](
        idx, vals, table, out, k, table.shape[1], table.stride(0), BLOCK=BLOCK_D
    )
    return out.to(table.dtype)


def gather_dot(idx: torch.Tensor, table: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    idx, grad = idx.contiguous(), grad.contiguous()
    table = table if table.stride(1) == 1 else table.contiguous()
    batch, k = idx.shape
    out = torch.empty((batch, k), dtype=torch.float32, device=grad.device)
    _gather_dot_kernel[(batch, k)](idx, grad, table, out, k, table.shape[1], table.stride(0), BLOCK=BLOCK_D)
    return out.to(grad.dtype)


def scatter_add(idx: torch.Tensor, vals: torch.Tensor, src: torch.Tensor, n_rows: int) -> torch.Tensor:
    idx, vals, src = idx.contiguous(), vals.contiguous(), src.contiguous()
    batch, k = idx.shape
    out = torch.zeros((n_rows, src.shape[1]), dtype=torch.float32, device=src.device)
    _scatter_add_kernel[_grid_d(batch, src.shape[1])](idx, vals, src, out, k, src.shape[1], BLOCK=BLOCK_D)
    return out.to(src.dtype)
