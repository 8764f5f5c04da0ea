"""Pretrained SAE layouts: Gemma Scope (npz / safetensors), sparsify folders, SAELens itself."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_diff.sae import files
from sae_diff.sae.model import SAE, SAEConfig

D_IN, D_SAE, B = 10, 24, 17


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def gemma_params(d_out=D_IN):
    return {
        "W_enc": rand(D_IN, D_SAE, seed=1),
        "b_enc": rand(D_SAE, seed=2) * 0.1,
        "W_dec": rand(D_SAE, d_out, seed=3),
        "b_dec": rand(d_out, seed=4),
        "threshold": rand(D_SAE, seed=5).abs() * 0.5,
    }


def gemma_reference(p, x):
    """Gemma Scope's JumpReLU, as its release describes it: no b_dec subtraction on the input."""
    pre = x.double() @ p["W_enc"].double() + p["b_enc"].double()
    f = torch.relu(pre) * (pre > p["threshold"].double())
    return f @ p["W_dec"].double() + p["b_dec"].double()


@pytest.mark.parametrize("suffix", ["npz", "safetensors"])
@pytest.mark.parametrize("transcoder", [False, True])
def test_gemma_scope(tmp_path, suffix, transcoder):
    p = gemma_params(d_out=7 if transcoder else D_IN)
    path = tmp_path / f"params.{suffix}"
    if suffix == "npz":
        np.savez(path, **{k: v.numpy() for k, v in p.items()})
    else:
        save_file(p, str(path))
    sae = files.load_any(tmp_path, transcoder=transcoder, dtype=torch.float64)
    assert sae.cfg.architecture == "jumprelu" and sae.apply_b_dec_to_input is False
    x = rand(B, D_IN, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(sae(x.double()), gemma_reference(p, x))


def test_npz_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "params.npz"
    np.savez(path, W_enc=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        files.load_gemma_scope(path)


def test_sparsify_folder(tmp_path):
    enc, bias, W_dec, b_dec = (
        rand(D_SAE, D_IN, seed=1),
        rand(D_SAE, seed=2),
        rand(D_SAE, D_IN, seed=3),
        rand(D_IN, seed=4),
    )
    save_file(
        {"encoder.weight": enc, "encoder.bias": bias, "W_dec": W_dec, "b_dec": b_dec}, str(tmp_path / "sae.safetensors")
    )
    (tmp_path / "cfg.json").write_text(
        json.dumps({"expansion_factor": 2, "normalize_decoder": True, "num_latents": D_SAE, "k": 3, "d_in": D_IN})
    )
    sae = files.load_any(tmp_path, dtype=torch.float64)
    x = rand(B, D_IN, seed=9).double()
    # sparsify: relu(encoder(x - b_dec)), keep the top k, decode with W_dec plus b_dec
    pre = torch.relu((x - b_dec.double()) @ enc.double().t() + bias.double())
    top = pre.topk(3, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), f @ W_dec.double() + b_dec.double())


def test_wrong_shape_names_the_tensor(tmp_path):
    p = gemma_params()
    p["b_enc"] = p["b_enc"][:-1]
    save_file(p, str(tmp_path / "params.safetensors"))
    with pytest.raises(ValueError, match=r"b_enc has shape \(23,\), expected \(24,\)"):
        files.load_any(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None, reason="sae-lens is not importable here")
@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelens_loads_our_files_with_equal_outputs(tmp_path, arch):
    from sae_lens import SAE as LensSAE

    torch.manual_seed(0)
    sae = SAE(
        SAEConfig(
            architecture=arch, d_in=D_IN, d_sae=D_SAE, k=4, hook_name="blocks.0.hook_resid_post", model_name="tiny"
        )
    )
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
        if arch == "jumprelu":
            sae.log_threshold.fill_(np.log(0.2))
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    sae.eval()
    files.save(sae, tmp_path / "sae")
    theirs = LensSAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = torch.randn(B, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
