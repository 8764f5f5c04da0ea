"""The Triton path of the sparse kernels against dense float64 references.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
in a subprocess since the variable must be set before triton is imported); on a machine
with CUDA the same comparison also runs on the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CHECK = textwrap.dedent("""
    import torch
    from sae_diff.sae import kernels, triton_kernels as tk
    torch.manual_seed(0)
    dev = "{device}"
    B, K, D, M = 9, 4, 150, 40          # D > BLOCK_D: masked tails are exercised
    idx = torch.stack([torch.randperm(M)[:K] for _ in range(B)]).to(dev)
    vals, table, grad = torch.randn(B, K, device=dev), torch.randn(M, D, device=dev), torch.randn(B, D, device=dev)
    i64, v64, t64, g64 = idx.cpu(), vals.double().cpu(), table.double().cpu(), grad.double().cpu()
    ref_sum = (v64[..., None] * t64[i64]).sum(1)
    ref_dot = (g64[:, None, :] * t64[i64]).sum(-1)
    ref_scatter = torch.zeros(M, D, dtype=torch.float64).index_add_(0, i64.reshape(-1),
                                                                   (v64[..., None] * g64[:, None, :]).reshape(-1, D))
    torch.testing.assert_close(tk.gather_sum(idx, vals, table).double().cpu(), ref_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tk.gather_dot(idx, table, grad).double().cpu(), ref_dot, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tk.scatter_add(idx, vals, grad, M).double().cpu(), ref_scatter, rtol=1e-5, atol=1e-5)

    # the whole TopK encode + sparse decode with autograd, Triton path, vs a dense float64 reference
    x = torch.randn(B, 24, device=dev)
    W_enc_T = torch.randn(M, 24, device=dev, requires_grad=True)
    b_enc = torch.randn(M, device=dev, requires_grad=True)
    W_dec = torch.randn(M, 24, device=dev, requires_grad=True)
    v, i = kernels.topk_encode(x, W_enc_T, b_enc, K)
    out = kernels.sparse_decode(i, v, W_dec)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    params = [W_enc_T, b_enc, W_dec]
    ref = [p.detach().double().cpu().requires_grad_() for p in params]
    pre = x.double().cpu() @ ref[0].t() + ref[1]
    top = pre.topk(K, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top)).clamp_min(0)
    ((f @ ref[2]) * g.double().cpu()).sum().backward()
    torch.testing.assert_close(out.double().cpu(), (f @ ref[2]).detach(), rtol=1e-4, atol=1e-4)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad.double().cpu(), r.grad, rtol=1e-4, atol=1e-4)
    print("ok")
""")


def _run(device: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHECK.format(device=device)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def test_triton_kernels_in_interpreter_on_cpu():
    result = _run("cpu", {"TRITON_INTERPRET": "1", "SAE_DIFF_KERNELS": "triton"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_triton_kernels_on_cuda():
    result = _run("cuda", {})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
