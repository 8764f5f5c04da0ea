"""SAE architectures, kernels, files and scaling, each against a plain dense float64 reference."""

from __future__ import annotations

import json

import pytest
import torch

from sae_diff.sae import files, kernels
from sae_diff.sae.model import SAE, SAEConfig, geometric_median

D_IN, D_SAE, K, B = 12, 40, 4, 33
DT = torch.float64


def make(arch, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=K, **kw)
    sae = SAE(cfg, dtype=DT)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.full((D_SAE,), 0.2).log())
    return sae


def ref_pre(sae, x, center=True):
    W_enc = sae.W_enc_T.detach().clone().t().requires_grad_()  # SAELens orientation [d_in, d_sae]
    b_enc, W_dec, b_dec = (t.detach().clone().requires_grad_() for t in (sae.b_enc, sae.W_dec, sae.b_dec))
    pre = ((x - b_dec) if center else x) @ W_enc + b_enc
    return pre, (W_enc, b_enc, W_dec, b_dec)


def grads_of(sae):
    return {"W_enc": sae.W_enc_T.grad.t(), "b_enc": sae.b_enc.grad, "W_dec": sae.W_dec.grad, "b_dec": sae.b_dec.grad}


def check(sae, ref_loss, ref_params, out_loss):
    out_loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(out_loss.detach(), ref_loss.detach(), rtol=1e-10, atol=1e-10)
    for (name, mine), ref in zip(grads_of(sae).items(), ref_params):
        torch.testing.assert_close(mine, ref.grad, rtol=1e-9, atol=1e-10, msg=name)


def mse(recon, target):
    return (recon - target).pow(2).sum(-1).mean()


def test_relu_reference():
    sae, x = make("relu", l1_coefficient=0.7), torch.randn(B, D_IN, dtype=DT)
    pre, params = ref_pre(sae, x)
    f = torch.relu(pre)
    W_dec, b_dec = params[2], params[3]
    ref = mse(f @ W_dec + b_dec, x) + 0.7 * (f * W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(sae.encode(x), f.detach())
    check(sae, ref, params, sae.training_losses(x)["loss"])


def test_topk_sparse_kernels_reference():
    sae, x = make("topk"), torch.randn(B, D_IN, dtype=DT)
    pre, params = ref_pre(sae, x)
    idx = pre.topk(K, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx)).clamp_min(0)
    ref = mse(f @ params[2] + params[3], x)
    torch.testing.assert_close(sae.encode(x), f.detach())
    check(sae, ref, params, sae.training_losses(x)["loss"])


def test_topk_auxk_reference():
    sae, x = make("topk", aux_coefficient=0.5, k_aux=3), torch.randn(B, D_IN, dtype=DT)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    pre, params = ref_pre(sae, x)
    W_dec, b_dec = params[2], params[3]
    idx = pre.topk(K, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx)).clamp_min(0)
    recon = f @ W_dec + b_dec
    residual = (x - recon).detach()
    aux_pre = pre.masked_fill(~dead, float("-inf"))
    aux_idx = aux_pre.topk(3, dim=-1).indices
    f_aux = torch.zeros_like(pre).scatter(-1, aux_idx, pre.gather(-1, aux_idx)).clamp_min(0)
    aux = (residual - f_aux @ W_dec).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    check(sae, mse(recon, x) + 0.5 * aux, params, sae.training_losses(x, dead=dead)["loss"])


def test_batchtopk_reference_and_threshold():
    sae, x = make("batchtopk"), torch.randn(B, D_IN, dtype=DT)
    pre, params = ref_pre(sae, x)
    acts = torch.relu(pre)
    kth = acts.flatten().topk(K * B).values.min()
    f = acts * (acts >= kth)
    check(sae, mse(f @ params[2] + params[3], x), params, sae.training_losses(x)["loss"])
    assert float(sae.threshold[0]) == pytest.approx(float(f.detach()[f.detach() > 0].min()))
    sae.eval()  # inference: JumpReLU at the learned threshold
    with torch.no_grad():
        pre_now = sae.encode_pre(x)
        torch.testing.assert_close(sae.encode(x), pre_now * (pre_now > sae.threshold))


def test_jumprelu_reference_with_straight_through_threshold():
    eps, lam = 0.3, 0.05
    sae, x = make("jumprelu", jumprelu_bandwidth=eps, l0_coefficient=lam), torch.randn(B, D_IN, dtype=DT)
    pre, params = ref_pre(sae, x)
    theta = sae.log_threshold.detach().exp()
    gate = (pre > theta).to(DT)
    f = pre * gate
    recon = f @ params[2] + params[3]
    ref = mse(recon, x) + lam * gate.sum(-1).mean()
    out = sae.training_losses(x)["loss"]
    check(sae, ref, params, out)
    # pseudo-derivative wrt log θ, written out: rectangle kernel K(u) = 1[|u| < 1/2]
    window = (((pre.detach() - theta) / eps).abs() < 0.5).to(DT)
    f_leaf = f.detach().requires_grad_()
    (g_f,) = torch.autograd.grad(mse(f_leaf @ params[2].detach() + params[3].detach(), x), f_leaf)
    d_theta = (g_f * (-theta / eps) * window).sum(0) + lam * ((-1.0 / eps) * window).sum(0) / B
    torch.testing.assert_close(sae.log_threshold.grad, d_theta * theta)


def test_matryoshka_prefix_losses_add():
    sae, x = make("matryoshka", matryoshka_prefixes=[10, 25, D_SAE]), torch.randn(B, D_IN, dtype=DT)
    pre, params = ref_pre(sae, x)
    acts = torch.relu(pre)
    f = acts * (acts >= acts.flatten().topk(K * B).values.min())
    W_dec, b_dec = params[2], params[3]
    ref = sum(mse(f[:, :p] @ W_dec[:p] + b_dec, x) for p in (10, 25, D_SAE))
    check(sae, ref, params, sae.training_losses(x)["loss"])


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_transcoder_reference(arch):
    """Input from one site, target from another; b_dec is an output bias only."""
    torch.manual_seed(1)
    cfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=K, d_out=7, l1_coefficient=0.0, l0_coefficient=0.0)
    sae = SAE(cfg, dtype=DT)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x, y = torch.randn(B, D_IN, dtype=DT), torch.randn(B, 7, dtype=DT)
    pre, params = ref_pre(sae, x, center=False)
    if arch == "topk":
        idx = pre.topk(K, dim=-1).indices
        f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx)).clamp_min(0)
    elif arch == "batchtopk":
        acts = torch.relu(pre)
        f = acts * (acts >= acts.flatten().topk(K * B).values.min())
    elif arch == "jumprelu":
        f = pre * (pre > sae.log_threshold.detach().exp())
    else:
        f = torch.relu(pre)
    check(sae, mse(f @ params[2] + params[3], y), params, sae.training_losses(x, y)["loss"])


def test_kernels_match_dense_in_float32_at_size():
    torch.manual_seed(0)
    x, W_enc_T, b = torch.randn(300, 64), torch.randn(512, 64, requires_grad=True), torch.randn(512, requires_grad=True)
    W_dec = torch.randn(512, 64, requires_grad=True)
    vals, idx = kernels.topk_encode(x, W_enc_T, b, 16)
    out = kernels.sparse_decode(idx, vals, W_dec)
    assert (idx.diff(dim=-1) > 0).all()  # sorted within rows, as sparse matrices need
    g = torch.randn_like(out)
    (out * g).sum().backward()
    mine = [t.grad.clone() for t in (W_enc_T, b, W_dec)]
    for t in (W_enc_T, b, W_dec):
        t.grad = None
    pre = x.double() @ W_enc_T.double().t() + b.double()
    top = pre.topk(16, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top)).clamp_min(0)
    ((f @ W_dec.double()) * g.double()).sum().backward()
    torch.testing.assert_close(out.double(), (f @ W_dec.double()).detach(), rtol=1e-4, atol=1e-4)
    for m, t in zip(mine, (W_enc_T, b, W_dec)):
        torch.testing.assert_close(m.double(), t.grad.double(), rtol=1e-4, atol=1e-3)


def test_decoder_constraint():
    sae = make("topk")
    sae.normalize_decoder()
    x = torch.randn(B, D_IN, dtype=DT)
    sae.training_losses(x)["loss"].backward()
    sae.project_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-12  # no component along the rows
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=DT))


def test_initialization():
    sample = torch.randn(200, D_IN, dtype=DT) + 3.0
    cfg = SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=K)
    sae = SAE(cfg, dtype=DT)
    sae.initialize(sample, seed=0)
    # W_enc = c·W_decᵀ (stored transposed): tied directions, encoder rows of norm c
    torch.testing.assert_close(sae.W_enc_T, sae.W_dec * cfg.encoder_init_norm)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=DT))
    torch.testing.assert_close(sae.b_dec, geometric_median(sample))


def test_geometric_median_minimises_sum_of_distances():
    from scipy.optimize import minimize

    pts = torch.randn(60, 5, dtype=DT) ** 3  # skewed, so median != mean
    ours = geometric_median(pts)
    cost = lambda p: float((pts - torch.as_tensor(p)).norm(dim=1).sum())  # noqa: E731
    ref = minimize(
        cost, pts.mean(0).numpy(), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}
    )
    assert cost(ours) <= ref.fun + 1e-6


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_saelens_layout_round_trip(arch, tmp_path):
    kw = {"matryoshka_prefixes": [10, D_SAE]} if arch == "matryoshka" else {}
    sae = make(arch, hook_name="blocks.3.hook_resid_post", model_name="tiny", **kw)
    x = torch.randn(B, D_IN, dtype=DT)
    if arch in ("batchtopk", "matryoshka"):
        sae.training_losses(x)  # sets the inference threshold
    sae.eval()
    files.save(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == files.SAELENS_ARCH[arch] and cfg["normalize_activations"] == "none"
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (D_IN, D_SAE) and w["W_dec"].shape == (D_SAE, D_IN)
    assert ("threshold" in w) == (cfg["architecture"] == "jumprelu")
    loaded = files.load(tmp_path / "sae", dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))
    (tmp_path / "sae" / files.OURS).unlink()  # as SAELens wrote it: still the same function
    with torch.no_grad():
        torch.testing.assert_close(files.load(tmp_path / "sae", dtype=DT)(x), sae(x))


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_fold_scaling(arch):
    """An SAE trained on s·x, folded, applied to raw x, gives the same reconstruction / s."""
    sae, x, s = make(arch), torch.randn(B, D_IN, dtype=DT), 3.7
    sae.eval()
    with torch.no_grad():
        expected = sae(x * s) / s
        files.fold_scaling(sae, s)
        torch.testing.assert_close(sae(x), expected)
