"""Crosscoders: dense float64 references, BatchTopK's budget, Latent Scaling's closed form, files,
kill -9 resume, and a planted world with directions only the tuned model has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from sae_diff import crosscoder as C
from sae_diff.activations import ActivationStore, write_store
from sae_diff.errors import DataError
from sae_diff.paired import PairedStore

D, SHARED, TUNED, ACTIVE, D_SAE = 16, 24, 4, 3, 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds contention (and the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(n, seed=0, identical=False, base_fraction=0.0):
    """Model 0: ACTIVE of SHARED unit atoms with weights in [0.5, 2.5] plus an offset. Model 1: the
    same, plus on half the tokens one of TUNED atoms that only model 1 has (identical: model 0 = model 1;
    base_fraction: model 0 has them too, at that fraction of model 1's weight)."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(SHARED + TUNED, D, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, SHARED, generator=gen).argsort(1)[:, :ACTIVE]
    weights = torch.rand(n, ACTIVE, generator=gen) * 2 + 0.5
    x0 = (weights[..., None] * atoms[idx]).sum(1) + 0.3
    which = torch.randint(0, 2 * TUNED, (n,), generator=gen)
    on = (which < TUNED)[:, None]
    extra = (torch.rand(n, 1, generator=gen) * 2 + 0.5) * atoms[SHARED + which.clamp_max(TUNED - 1)] * on
    x1 = x0 + extra
    return torch.stack([x1 if identical else x0 + base_fraction * extra, x1], 1), atoms[SHARED:]


def paired_store(folder, acts, shard_tokens=1000):
    stores = [
        ActivationStore(write_store(folder / f"m{m}", acts[:, m], shard_tokens=shard_tokens))
        for m in range(acts.shape[1])
    ]
    return PairedStore(stores)


def random_cc(arch="batchtopk", n_models=2, d=6, d_sae=20, k=3, seed=0, dtype=torch.float32, **kw):
    # independent decoder blocks: each model's decoder differs in direction too, so the references
    # below check that every model reads its own
    cfg = C.CrosscoderConfig(
        n_models=n_models, d_in=d, d_sae=d_sae, k=k, architecture=arch, **{"same_init": False, **kw}
    )
    cc = C.Crosscoder(cfg, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    cc.initialize(torch.randn(50, n_models, d, generator=gen), seed=seed)
    with torch.no_grad():  # uneven decoder norms and scales, so that the norm weighting matters
        cc.W_dec.mul_(torch.rand(d_sae, n_models, 1, generator=gen, dtype=torch.float64).to(dtype) * 2 + 0.1)
        cc.b_enc.copy_(torch.randn(d_sae, generator=gen, dtype=torch.float64).to(dtype) * 0.1)
        cc.input_scale.copy_(torch.rand(n_models, generator=gen, dtype=torch.float64).to(dtype) + 0.5)
    return cc


# ------------------------------------------------------------------------------------ model


def dense_reference(params: dict, x, arch, k, l1_coefficient):
    """The crosscoder written plainly: scale, einsum encoder, manual batch top-k mask on the
    decoder-norm-weighted activations, einsum decoder; loss in the scaled space."""
    xs = x * params["input_scale"][None, :, None]
    pre = torch.einsum("bnd,ndf->bf", xs, params["W_enc"]) + params["b_enc"]
    acts = torch.relu(pre)
    norm_sum = params["W_dec"].norm(dim=2).sum(1)  # Σ_m ‖d_j^m‖
    if arch == "batchtopk":
        weighted = (acts * norm_sum).detach().flatten()
        order = sorted(range(len(weighted)), key=lambda i: -float(weighted[i]))
        mask = torch.zeros(len(weighted), dtype=torch.bool)
        mask[order[: k * len(x)]] = True
        f = acts * mask.view_as(acts)
    else:
        f = acts
    recon_scaled = torch.einsum("bf,fnd->bnd", f, params["W_dec"]) + params["b_dec"]
    loss = (recon_scaled - xs).pow(2).sum(-1).mean(0).sum()
    if arch == "l1":
        loss = loss + l1_coefficient * (f * norm_sum).sum(-1).mean()
    return recon_scaled / params["input_scale"][None, :, None], f, loss


@pytest.mark.parametrize("arch,n_models", [("batchtopk", 2), ("batchtopk", 3), ("l1", 2)])
def test_forward_and_backward_match_a_dense_float64_reference(arch, n_models):
    """Compared: reconstructions, latents, loss and every parameter's gradient of Crosscoder (float64)
    with ``dense_reference`` on fresh random inputs (several batches)."""
    for trial in range(3):
        cc = random_cc(arch, n_models=n_models, seed=trial, dtype=torch.float64, l1_coefficient=0.3).train()
        x = torch.randn(17, n_models, 6, generator=torch.Generator().manual_seed(100 + trial), dtype=torch.float64)
        recon, f = cc(x)
        params = {name: p.detach().clone().requires_grad_(True) for name, p in cc.named_parameters()}
        params["input_scale"] = cc.input_scale.clone()
        ref_recon, ref_f, ref_loss = dense_reference(params, x, arch, cc.cfg.k, 0.3)
        torch.testing.assert_close(f, ref_f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(recon, ref_recon, rtol=1e-12, atol=1e-12)
        out = cc.training_losses(cc.scale_inputs(x))
        torch.testing.assert_close(out["loss"], ref_loss, rtol=1e-12, atol=1e-12)
        out["loss"].backward()
        ref_loss.backward()
        for name, p in cc.named_parameters():
            torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_training_path_matches_the_dense_one(with_dead):
    """Compared: loss, MSE (per model), AuxK term, L0, fired latents, reconstructions, the updated
    threshold and every parameter's gradient of ``training_losses``' sparse BatchTopK path with its
    dense formulation (``dense=True``) on random inputs, in float64 (to 1e-10) and float32 (to 1e-5);
    with dead latents, half the latents are dead and some of them also among the kept entries, so
    that an entry's encoder gradient comes from both the reconstruction and AuxK."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        for trial in range(3):
            gen = torch.Generator().manual_seed(200 + trial)
            x = torch.randn(33, 2, 6, generator=gen, dtype=dtype) * 2
            dead = torch.rand(40, generator=gen) < 0.5 if with_dead else None
            results = []
            for dense in (False, True):
                cc = random_cc(d_sae=40, k=4, seed=trial, dtype=dtype, k_aux=5, aux_coefficient=0.5).train()
                with torch.no_grad():
                    cc.threshold.fill_(0.3 * trial)  # trial 0: the first estimate, then the running mean
                out = cc.training_losses(cc.scale_inputs(x), dead=dead, dense=dense)
                out["loss"].backward()
                results.append((cc, out))
            (cc, out), (ref_cc, ref) = results
            assert set(out) == set(ref) and ("aux" in out) == with_dead
            assert torch.equal(out["fired"], ref["fired"])
            if with_dead:
                assert bool((out["fired"] & dead).any())  # entries both kept and AuxK's
            for key in ("loss", "mse", "mse_per_model", "l0", "recon", *(("aux",) if with_dead else ())):
                torch.testing.assert_close(out[key].detach(), ref[key].detach(), rtol=tol, atol=tol, msg=key)
            torch.testing.assert_close(cc.threshold, ref_cc.threshold, rtol=tol, atol=tol)
            for name, p in cc.named_parameters():
                ref_grad = dict(ref_cc.named_parameters())[name].grad
                torch.testing.assert_close(p.grad, ref_grad, rtol=tol, atol=tol, msg=name)


def test_grouped_flat_topk_keeps_the_same_values_as_topk():
    """Compared: ``_flat_topk``'s values (sorted) with torch.topk's, that its indices are distinct and
    point at its values, on random vectors with runs of zeros and repeated values (ties), for group
    counts that take the grouped path and one that falls back to topk."""
    gen = torch.Generator().manual_seed(5)
    for n, n_keep, groups in ((1320, 132, 8), (4096, 500, 8), (4096, 600, 4), (1000, 7, 16), (96, 20, 8)):
        values = torch.relu(torch.randn(n, generator=gen))  # half zeros
        values[: n // 10] = values[n // 10 : 2 * (n // 10)]  # repeated values
        top_values, top_indices = C._flat_topk(values, n_keep, groups)
        assert len(top_indices) == n_keep and len(set(top_indices.tolist())) == n_keep
        assert torch.equal(values[top_indices], top_values)
        assert torch.equal(top_values.sort().values, values.topk(n_keep).values.sort().values)


def test_batchtopk_keeps_exactly_k_per_token_over_the_batch():
    """Compared: the number of non-zero latents in a training batch with k·B, for several B; and
    the set kept with the k·B largest decoder-norm-weighted activations. In eval mode with a
    threshold: exactly the latents whose weighted activation exceeds it."""
    cc = random_cc(d_sae=40, k=4).train()
    for batch in (1, 5, 32):
        x = torch.randn(batch, 2, 6, generator=torch.Generator().manual_seed(batch)) * 3
        f = cc.encode(x)
        assert int((f > 0).sum()) == 4 * batch
        weighted = torch.relu(cc.encode_pre(cc.scale_inputs(x))) * cc.decoder_norms().sum(1)
        cutoff = weighted.flatten().topk(4 * batch).values[-1]
        assert torch.equal(f > 0, weighted.detach() >= cutoff)
    cc.eval()
    with torch.no_grad():
        cc.threshold.fill_(0.7)
    x = torch.randn(64, 2, 6, generator=torch.Generator().manual_seed(7)) * 3
    weighted = torch.relu(cc.encode_pre(cc.scale_inputs(x))) * cc.decoder_norms().sum(1)
    assert torch.equal(cc.encode(x) > 0, weighted.detach() > 0.7)


def test_config_errors_name_the_value_and_what_was_expected():
    """Compared: the ValueError messages with the bad field, its value and the expectation."""
    with pytest.raises(ValueError, match=r"architecture='topk': expected one of \('batchtopk', 'l1'\)"):
        C.CrosscoderConfig(n_models=2, d_in=4, d_sae=8, architecture="topk")
    with pytest.raises(ValueError, match=r"k=9: expected an integer in \[1, d_sae=8\]"):
        C.CrosscoderConfig(n_models=2, d_in=4, d_sae=8, k=9)
    with pytest.raises(ValueError, match=r"n_models=1: expected 2 or more"):
        C.CrosscoderConfig(n_models=1, d_in=4, d_sae=8, k=2)
    with pytest.raises(ValueError, match=r"model_names=\['a'\]: expected an empty list or 2 names"):
        C.CrosscoderConfig(n_models=2, d_in=4, d_sae=8, k=2, model_names=["a"])
    cfg = C.CrosscoderConfig(n_models=2, d_in=4, d_sae=8, k=2, model_names=["M0", "M1"])
    assert C.CrosscoderConfig(**cfg.to_dict()) == cfg


def test_save_then_load_gives_bit_identical_outputs(tmp_path):
    """Compared: every tensor and the outputs (latents, reconstructions) before saving and after
    loading, with torch.equal; then a flipped byte in the weights is an error naming the file."""
    cc = random_cc(model_names=["M0", "M1"], hook_name="blocks.0.hook_resid_post").eval()
    with torch.no_grad():
        cc.threshold.fill_(0.25)
    folder = C.save(cc, tmp_path / "cc", extra={"training": {"steps": 3}})
    back = C.load(folder)
    assert back.cfg == cc.cfg and not back.training
    for name, tensor in cc.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    x = torch.randn(40, 2, 6, generator=torch.Generator().manual_seed(3))
    (r1, f1), (r2, f2) = cc(x), back(x)
    assert torch.equal(f1, f2) and torch.equal(r1, r2)
    record = json.loads((folder / "cfg.json").read_text())
    assert record["training"] == {"steps": 3} and set(record["sha256"]) == {"crosscoder_weights.safetensors"}
    shared = C.save(random_cc(same_init=True), tmp_path / "shared")  # the flag round-trips both ways
    assert C.load(shared).cfg.same_init and not back.cfg.same_init
    older = json.loads((shared / "cfg.json").read_text())  # written before the flag existed
    del older["config"]["same_init"]
    (shared / "cfg.json").write_text(json.dumps(older))
    assert C.load(shared).cfg.same_init is False  # such crosscoders started their decoders independently
    assert set(load_file(str(folder / "crosscoder_weights.safetensors"))) == {
        "W_enc",
        "b_enc",
        "W_dec",
        "b_dec",
        "threshold",
        "input_scale",
    }
    raw = bytearray((folder / "crosscoder_weights.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (folder / "crosscoder_weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="crosscoder_weights.safetensors: corrupted"):
        C.load(folder)


# ------------------------------------------------------------------------------------ analysis


def test_latent_scaling_matches_least_squares(tmp_path):
    """Compared: ``latent_scaling``'s streamed β (batches of 37 tokens) with torch.linalg.lstsq in
    float64 on all tokens at once, for each latent, model and target (error with the latent added
    back, reconstruction, activation), and the ν ratios with the β ratios."""
    cc = random_cc(d_sae=20, k=4).eval()
    with torch.no_grad():
        cc.threshold.fill_(0.3)  # inference encoding: per token, independent of the batching
    acts = torch.randn(300, 2, 6, generator=torch.Generator().manual_seed(1)) + 0.2
    paired = paired_store(tmp_path, acts, shard_tokens=100)
    latents = [0, 3, 7, 11, 19]
    table = C.latent_scaling(cc, paired, latents, split="train", batch_size=37)
    with torch.no_grad():
        xs = cc.scale_inputs(acts).double()
        f = cc.encode(acts).double()
        recon = cc.decode_scaled(f.float()).double()
    w = cc.W_dec.detach().double()
    for row, j in enumerate(latents):
        assert int(table["latent"][row]) == j
        if float(f[:, j].abs().sum()) == 0:
            assert table["beta_error_m0"].isna()[row]
            continue
        d = w[j, 1]  # the tuned (last) model's decoder vector, for both models
        design = (f[:, j, None] * d).reshape(-1, 1)
        for m in range(2):
            targets = {
                "error": xs[:, m] - recon[:, m] + f[:, j, None] * w[j, m],
                "reconstruction": recon[:, m],
                "activation": xs[:, m],
            }
            for target, y in targets.items():
                beta = torch.linalg.lstsq(design, y.reshape(-1, 1)).solution.item()
                assert table[f"beta_{target}_m{m}"][row] == pytest.approx(beta, rel=1e-9, abs=1e-12), (j, m, target)
        for target in ("error", "reconstruction"):
            ratio = table[f"beta_{target}_m0"][row] / table[f"beta_{target}_m1"][row]
            assert table[f"nu_{target}"][row] == pytest.approx(ratio, rel=1e-12)
    assert int(table["f_sq_sum"].gt(0).sum()) >= 3  # most chosen latents fire: the comparison is not vacuous


def test_latent_table_norms_and_classes():
    """Compared: norms, relative norm, Δnorm, cosine and class of hand-set decoder vectors with the
    values computed by hand (thresholds of Minder et al. 2025)."""
    cfg = C.CrosscoderConfig(n_models=2, d_in=2, d_sae=5, k=1)
    cc = C.Crosscoder(cfg)
    with torch.no_grad():
        cc.W_dec.copy_(
            torch.tensor(
                [
                    [[1.0, 0.0], [0.0, 1.0]],  # shared norms, orthogonal
                    [[0.0, 0.0], [2.0, 0.0]],  # only in M1
                    [[3.0, 0.0], [0.0, 0.0]],  # only in M0
                    [[0.1, 0.0], [1.0, 0.0]],  # ‖d0‖ = 0.1 ‖d1‖: Δnorm 0.95 -> mi_only
                    [[1.0, 0.0], [0.5, 0.0]],  # Δnorm 0.25 -> other
                ]
            )
        )
    table = C.latent_table(cc)
    assert list(table["class"]) == ["shared", "mi_only", "m0_only", "mi_only", "other"]
    assert table["relative_norm"].tolist() == pytest.approx([0.5, 1.0, 0.0, 1 / 1.1, 1 / 3])
    assert table["delta_norm"].tolist() == pytest.approx([0.5, 1.0, 0.0, 0.95, 0.25])
    assert table["norm_m1"].tolist() == pytest.approx([1, 2, 0, 1, 0.5])
    assert table["decoder_cosine"][0] == pytest.approx(0.0) and table["decoder_cosine"][3] == pytest.approx(1.0)
    assert table["decoder_cosine"].isna().tolist() == [False, True, True, False, False]


# ------------------------------------------------------------------------------------ training

TRAIN = dict(batch_size=128, lr=1e-2, checkpoint_every=0, progress=False, warmup_steps=5, dead_tokens=2000)
TRAIN.update(shuffle_buffer=4000, init_sample=512)
N_PLANTED, EPOCHS = 6000, 10


def best_matches(cc, directions):
    """For each planted direction: the latent whose tuned decoder vector is closest, and that cosine."""
    w1 = cc.W_dec.detach()[:, -1]
    cos = directions @ (w1 / w1.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
    return cos.argmax(1), cos.max(1).values


# independent decoder starts find every tuned-only direction in EPOCHS; the shared start (the
# default) needs about twice as long, and at that finds 3 of 4 with this seed (all 4 with seeds 1-3)
@pytest.mark.parametrize("same_init,epochs,found", [(False, EPOCHS, 4), (True, 2 * EPOCHS, 3)])
def test_planted_tuned_only_directions_come_out_tuned_only(tmp_path, same_init, epochs, found):
    """Compared: for each direction planted only in model 1's activations, the best-matching latent's
    cosine (> 0.95), relative decoder norm (> 0.9), class ("mi_only") and Latent Scaling label
    ("genuine"), for at least ``found`` of the 4 directions; and the train log's and evaluation's FVU
    with bounds measured on this world."""
    acts, tuned = planted(N_PLANTED)
    paired = paired_store(tmp_path / "acts", acts)
    cfg = C.CrosscoderConfig(n_models=2, d_in=D, d_sae=D_SAE, k=ACTIVE, model_names=["M0", "M1"], same_init=same_init)
    out = C.train(paired, cfg, tmp_path / "cc", n_tokens=N_PLANTED, epochs=epochs, **TRAIN)
    cc = C.load(out)
    assert not (tmp_path / C.STATE_DIR).exists()  # the default state folder goes once the run has finished
    train_log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert train_log[-1]["fvu"] < train_log[0]["fvu"] and {"dead_fraction", "l0", "fvu_m0", "lr"} <= set(train_log[0])
    scales = json.loads((out / "cfg.json").read_text())["training"]["scales"]
    assert torch.equal(cc.input_scale, torch.tensor(scales, dtype=torch.float32))
    for m in range(2):  # each model's scaled activations have mean norm √d on the training tokens
        assert float((acts[:, m] * scales[m]).norm(dim=1).mean()) == pytest.approx(D**0.5, rel=1e-4)

    latents, cosines = best_matches(cc, tuned)
    assert int((cosines > 0.95).sum()) >= found, cosines
    latents = latents[cosines > 0.95]
    table = C.latent_table(cc).set_index("latent")
    assert (table.loc[latents.tolist(), "relative_norm"] > 0.9).all(), table.loc[latents.tolist()]
    assert (table.loc[latents.tolist(), "class"] == "mi_only").all()
    scaling = C.latent_scaling(cc, paired, latents.tolist(), split="train")
    assert (scaling["scaling_label"] == "genuine").all(), scaling[["latent", "nu_error", "nu_reconstruction"]]

    metrics = C.reconstruction_metrics(cc, paired, split="train")
    assert metrics["models"]["m0"]["fvu"] < 0.2 and metrics["models"]["m1"]["fvu"] < 0.2, metrics
    assert metrics["models"]["m1"]["name"] == "M1" and 2 <= metrics["l0"] <= 4
    stats = C.firing_stats(cc, paired, split="train")
    assert stats["firing_frequency"].sum() == pytest.approx(metrics["l0"])
    # each tuned-only direction is on 1/8 of the tokens; its latent fires on most of those (0.07 measured:
    # the inference threshold drops the weakest occurrences)
    assert stats.set_index("latent").loc[latents.tolist(), "firing_frequency"].between(0.05, 0.15).all()


def test_identical_models_give_no_tuned_only_latents(tmp_path):
    """Compared: the classes of a crosscoder trained on two identical models with "mi_only"
    (none may be), and every live latent's relative norm with 0.5; with independent decoder starts,
    where the norms could drift apart (a shared start keeps them equal by construction:
    ``test_same_init_keeps_identical_models_decoders_identical``)."""
    acts, _ = planted(N_PLANTED, identical=True)
    paired = paired_store(tmp_path / "acts", acts)
    cfg = C.CrosscoderConfig(n_models=2, d_in=D, d_sae=D_SAE, k=ACTIVE, same_init=False)
    cc = C.load(C.train(paired, cfg, tmp_path / "cc", n_tokens=N_PLANTED, epochs=EPOCHS // 2, **TRAIN))
    table = C.firing_stats(cc, paired, split="train")
    assert not (table["class"] == "mi_only").any(), table["class"].value_counts()
    live = table[table["firing_frequency"] > 0.01]
    assert len(live) >= SHARED and (live["relative_norm"] - 0.5).abs().max() < 0.05


def test_l1_shrinks_weak_base_directions_away_and_latent_scaling_flags_it(tmp_path):
    """Complete Shrinkage on a planted world where model 0 carries the "tuned" directions at 0.4 of
    model 1's weight. Compared: with the L1 loss, the classes of the best-matching latents (some come
    out "mi_only") and their Latent Scaling label ("complete_shrinkage", ν^ε near the planted 0.4);
    with BatchTopK, their relative norm with 1/(1 + 0.4) and their classes (never "mi_only")."""
    acts, weak = planted(N_PLANTED, base_fraction=0.4)
    paired = paired_store(tmp_path / "acts", acts)
    found = {}
    for arch in ("l1", "batchtopk"):  # the reference's independent starts: the artefact as published
        cfg = C.CrosscoderConfig(n_models=2, d_in=D, d_sae=D_SAE, k=ACTIVE, architecture=arch, l1_coefficient=1.0,
                                 same_init=False)  # fmt: skip
        cc = C.load(C.train(paired, cfg, tmp_path / arch, n_tokens=N_PLANTED, epochs=EPOCHS, **TRAIN))
        latents, cosines = best_matches(cc, weak)
        found[arch] = C.latent_scaling(cc, paired, latents.tolist(), split="train").assign(cosine=cosines.numpy())
    l1 = found["l1"]
    shrunk = l1[l1["class"] == "mi_only"]
    assert len(shrunk) >= 2, l1  # 3 of 4 measured
    assert (shrunk["scaling_label"] == "complete_shrinkage").all(), shrunk
    assert shrunk["nu_error"].between(0.25, 0.55).all(), shrunk  # 0.36-0.38 measured
    topk = found["batchtopk"]
    assert not (topk["class"] == "mi_only").any(), topk
    clean = topk[topk["cosine"] > 0.95]
    assert len(clean) >= 2 and (clean["relative_norm"] - 1 / 1.4).abs().max() < 0.05, topk


SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from sae_diff.activations import ActivationStore
    from sae_diff.io import setup_logging
    from sae_diff.paired import PairedStore
    from sae_diff import crosscoder as C
    setup_logging()
    torch.set_num_threads(1)
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    paired = PairedStore([ActivationStore(root / "m0"), ActivationStore(root / "m1")])
    cfg = C.CrosscoderConfig(n_models=2, d_in=16, d_sae=64, k=3)
    C.train(paired, cfg, out / "cc", n_tokens=2000, batch_size=128, lr=3e-3, epochs=2, checkpoint_every=10,
            progress=False, warmup_steps=5, dead_tokens=500, shuffle_buffer=1000, init_sample=256,
            work_dir=out / "state")
""")


def test_kill_minus_nine_then_resume_ends_with_identical_weights(tmp_path):
    """Compared: every tensor of the final file and the train log of an uninterrupted run with those
    of a run SIGKILLed after step 20 (in the second epoch, with dead latents under AuxK) and resumed."""
    acts, _ = planted(2000)
    paired_store(tmp_path / "acts", acts, shard_tokens=500)

    def run(out, **env):
        return subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "acts"), str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            timeout=600,
        )

    clean = run(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    killed = run(tmp_path / "resumed", SAE_DIFF_KILL_AFTER_STEP="20")
    assert killed.returncode == -9 and (tmp_path / "resumed" / "state" / "checkpoint.json").exists()
    resumed = run(tmp_path / "resumed")
    assert resumed.returncode == 0 and "resuming from step 20" in resumed.stderr, resumed.stderr
    a = load_file(str(tmp_path / "clean" / "cc" / "crosscoder_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "cc" / "crosscoder_weights.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [(tmp_path / r / "cc" / "train_log.jsonl").read_text() for r in ("clean", "resumed")]
    assert logs[0] == logs[1]
    assert any(json.loads(line)["dead_fraction"] > 0 for line in logs[0].splitlines())
    assert not (tmp_path / "resumed" / "state").exists()  # the finished run leaves no state folder


# ------------------------------------------------------------------------------ spliced CE / KL

SPLICE_TEXTS = ["a nurse walks in", "the pilot flies home at dawn", "judges rule", "x y z", "one more text here"]


@pytest.fixture(scope="module")
def two_tiny_models():
    """Two tiny random Llamas (different seeds) sharing one character tokenizer."""
    from sae_diff import models

    from .conftest import TINY_SPEC

    tok = models.build_char_tokenizer("ascii")
    return [models.build_random_model(dict(TINY_SPEC, seed=seed), tok) for seed in (0, 1)], tok


def _splice_table(texts=SPLICE_TEXTS):
    import pandas as pd

    return pd.DataFrame({"sample_id": range(len(texts)), "prompt_text": "", "text": texts, "split": "eval"})


@torch.no_grad()
def _hand_spliced(loaded, tok, params: dict, layer: int, threshold: float | None):
    """Per model m, in float64 and one unpadded sequence at a time: every model's block output
    captured by a forward hook; the crosscoder written out (scale, einsum encoder, ReLU, threshold
    mask on the decoder-norm-weighted activations, einsum decoder, unscale); model m rerun with a
    hook that puts x̂_m (or zeros) in place of its block output at the kept tokens; CE and KL of
    the next-token distributions by hand."""
    import copy

    from sae_diff import models
    from sae_diff.activations import tokenize

    doubles = [copy.deepcopy(model).double() for model in loaded]
    p = {k: v.double() for k, v in params.items()}
    seqs = tokenize(tok, _splice_table(), 128, True, True)
    out = []
    for m, model in enumerate(doubles):
        totals = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0, "kl_spliced": 0.0, "kl_ablated": 0.0}
        count = 0
        for s in seqs:
            ids = torch.tensor([s.ids])
            keep = torch.from_numpy(s.keep)

            def run(net, edit=None):
                seen = {}

                def hook(_m, _i, output):
                    h = output[0] if isinstance(output, tuple) else output
                    seen["h"] = h.detach().clone()
                    if edit is None:
                        return None
                    h = h.clone()
                    h[0, keep] = edit(h[0, keep])
                    return (h, *output[1:]) if isinstance(output, tuple) else h

                handle = models.blocks(net)[layer].register_forward_hook(hook)
                try:
                    logits = net(input_ids=ids, use_cache=False).logits[0]
                finally:
                    handle.remove()
                return torch.log_softmax(logits, -1), seen["h"][0]

            hidden = [run(net)[1][keep] for net in doubles]  # [T_kept, d] per model
            x = torch.stack(hidden, 1)  # [T_kept, n, d]
            xs = x * p["input_scale"][None, :, None]
            acts = torch.relu(torch.einsum("tnd,ndf->tf", xs, p["W_enc"]) + p["b_enc"])
            if threshold is not None:
                acts = acts * (acts * p["W_dec"].norm(dim=2).sum(1) > threshold)
            recon = (torch.einsum("tf,fnd->tnd", acts, p["W_dec"]) + p["b_dec"]) / p["input_scale"][None, :, None]
            clean = run(model)[0]
            spliced = run(model, lambda h: recon[:, m])[0]
            ablated = run(model, torch.zeros_like)[0]
            for t in range(len(s.ids) - 1):
                if not s.keep[t]:
                    continue
                nxt = s.ids[t + 1]
                totals["clean"] -= float(clean[t, nxt])
                totals["spliced"] -= float(spliced[t, nxt])
                totals["ablated"] -= float(ablated[t, nxt])
                prob = clean[t].exp()
                totals["kl_spliced"] += float((prob * (clean[t] - spliced[t])).sum())
                totals["kl_ablated"] += float((prob * (clean[t] - ablated[t])).sum())
                count += 1
        out.append(({k: v / count for k, v in totals.items()}, count))
    return out


def _fit_to_models(cc, loaded, tok, layer, batchtopk: bool):
    """Scale a random crosscoder to the tiny models' activations (their norm is ~0.1) so that it
    reconstructs at their size and, for batchtopk, a threshold that keeps about a quarter of the
    active latents, midway between two measured values (no tie for float32 to break differently)."""
    from sae_diff import models
    from sae_diff.activations import tokenize

    hidden = []
    for s in tokenize(tok, _splice_table(), 128, True, True):
        per_model = []
        for model in loaded:
            with torch.no_grad(), models.capture(model, [(layer, "resid_post")]) as store:
                models.run_until_stopped(model, input_ids=torch.tensor([s.ids]), use_cache=False)
            per_model.append(store[(layer, "resid_post")][0][torch.from_numpy(s.keep)])
        hidden.append(torch.stack(per_model, 1))
    x = torch.cat(hidden)
    with torch.no_grad():
        cc.input_scale.copy_(cc.input_scale * (32**0.5) / x.norm(dim=-1).mean(0))
        cc.b_dec.mul_(0.05)
        if not batchtopk:
            return None
        weighted = (torch.relu(cc.encode_pre(cc.scale_inputs(x))) * cc.decoder_norms().sum(1)).flatten()
        values = weighted[weighted > 0].sort().values
        i = int(0.75 * len(values))
        threshold = float((values[i] + values[i + 1]) / 2)
        cc.threshold.fill_(threshold)
    return threshold


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_spliced_ce_and_kl_per_model_match_a_float64_hand_computation(two_tiny_models, arch):
    """Compared: ``crosscoder.spliced_metrics`` (float32, batches of 2 right-padded sequences, the
    other model run only up to the layer) with ``_hand_spliced`` (float64, one sequence at a time,
    full forwards with hooks): CE clean / spliced / ablated, CE score and both KLs, per model."""
    loaded, tok = two_tiny_models
    for layer in (0, 1):
        cc = random_cc(arch, d=32, d_sae=64, k=8, seed=layer).eval()
        threshold = _fit_to_models(cc, loaded, tok, layer, arch == "batchtopk")
        params = {name: p.detach() for name, p in cc.named_parameters()} | {"input_scale": cc.input_scale}
        got = C.spliced_metrics(cc, loaded, tok, _splice_table(), layer, batch_size=2)
        hand = _hand_spliced(loaded, tok, params, layer, threshold)
        assert set(got) == {"m0", "m1"}
        for m, (ref, count) in enumerate(hand):
            row = got[f"m{m}"]
            assert row["n_positions"] == count
            assert row["ce_loss_clean"] == pytest.approx(ref["clean"], rel=1e-5)
            assert row["ce_loss_with_spliced"] == pytest.approx(ref["spliced"], rel=1e-5)
            assert row["ce_loss_with_ablation"] == pytest.approx(ref["ablated"], rel=1e-5)
            score = (ref["ablated"] - ref["spliced"]) / (ref["ablated"] - ref["clean"])
            assert row["ce_loss_score"] == pytest.approx(score, rel=1e-3)
            assert row["kl_div_with_spliced"] == pytest.approx(ref["kl_spliced"], rel=1e-3)
            assert row["kl_div_with_ablation"] == pytest.approx(ref["kl_ablated"], rel=1e-3)
            assert ref["kl_spliced"] > 1e-4  # the splice changed the model's predictions


def identity_cc(n_models=2, d=32) -> C.Crosscoder:
    """A crosscoder that reconstructs exactly: latents ±e_i of each model, relu(x) − relu(−x) = x."""
    cc = C.Crosscoder(C.CrosscoderConfig(n_models=n_models, d_in=d, d_sae=2 * n_models * d, architecture="l1"))
    with torch.no_grad():
        for m in range(n_models):
            for i in range(d):
                for sign, j in ((1.0, 2 * (m * d + i)), (-1.0, 2 * (m * d + i) + 1)):
                    cc.W_enc[m, i, j] = sign
                    cc.W_dec[j, m, i] = sign
    return cc.eval()


def test_identity_crosscoder_splices_to_the_clean_model(two_tiny_models):
    """A perfect reconstruction spliced in: CE equals the clean CE, KL is 0 and the CE score 1, for
    each model; zero-ablation still costs loss."""
    loaded, tok = two_tiny_models
    cc = identity_cc()
    x = torch.randn(5, 2, 32)
    torch.testing.assert_close(cc(x)[0], x, rtol=0, atol=1e-6)
    got = C.spliced_metrics(cc, loaded, tok, _splice_table(), 1, batch_size=3)
    for row in got.values():
        assert row["ce_loss_with_spliced"] == pytest.approx(row["ce_loss_clean"], rel=1e-6)
        assert abs(row["kl_div_with_spliced"]) < 1e-6
        assert row["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
        assert row["ce_loss_with_ablation"] > row["ce_loss_clean"] and row["kl_div_with_ablation"] > 1e-3


def _two_split_store(folder, train, eval_, layer=1):
    """A store with both splits (``write_store`` writes one): the two manifests merged."""
    write_store(folder, eval_, split="eval", layer=layer, shard_tokens=300)
    eval_manifest = json.loads((folder / "manifest.json").read_text())
    write_store(folder, train, split="train", layer=layer, shard_tokens=300)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"] += eval_manifest["shards"]
    for key in ("n_tokens", "n_sequences"):
        manifest[key]["eval"] = eval_manifest[key]["eval"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return ActivationStore(folder)


def test_run_writes_each_models_spliced_metrics(tmp_path, two_tiny_models):
    """``run`` on random paired activations: each model's metrics.json entry holds the spliced CE / KL
    of the trained crosscoder, equal to ``spliced_metrics`` on the saved one; 0 samples skips them."""
    loaded, tok = two_tiny_models
    gen = torch.Generator().manual_seed(3)
    acts = torch.randn(800, 2, 32, generator=gen)
    paired = PairedStore([_two_split_store(tmp_path / f"m{m}", acts[:600, m], acts[600:, m]) for m in range(2)])
    samples = _splice_table()
    training = {"tokens": 600, "batch_size": 100, "epochs": 1, "checkpoint_every": 0, "shuffle_buffer": 0}
    opts = {"lr": 1e-3, "seed": 0, "warmup_steps": 0, "decay_fraction": 0.0, "dead_tokens": 10_000,
            "logit_lens_k": 3, "spliced_samples": 3}  # fmt: skip
    cfg = C.CrosscoderConfig(n_models=2, d_in=32, d_sae=64, k=4, model_names=["M0", "M1"])
    record = C.run(paired, cfg, tmp_path / "out", training, opts, samples, loaded, tok, progress=False)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["spliced"] == {"n_samples": 3}
    cc = C.load(tmp_path / "out" / "crosscoder")
    direct = C.spliced_metrics(cc, loaded, tok, samples.head(3), 1)
    for label in ("m0", "m1"):
        for key, value in direct[label].items():
            assert written["models"][label][key] == pytest.approx(value, rel=1e-6), key
        assert written["models"][label]["ce_loss_with_spliced"] == record["models"][label]["ce_loss_with_spliced"]
    skipped = C.run(paired, cfg, tmp_path / "off", training, {**opts, "spliced_samples": 0}, samples, loaded, tok,
                    progress=False)  # fmt: skip
    assert "spliced" not in skipped and "ce_loss_clean" not in skipped["models"]["m0"]
    assert "spliced_samples: 0" in skipped["spliced_skipped"]


def test_mi_only_direction_is_the_top_latents_reconstruction_difference(tmp_path):
    """Compared (float64): ``mi_only_direction`` against the crosscoder's own decode of the top k
    Mi-only latents at their mean activations, tuned model's reconstruction minus the base's, each
    less its decode of zero (the biases); the top k are the genuine Mi-only latents first, then by
    mean activation times the tuned decoder's norm. A crosscoder without Mi-only latents gives 0."""
    import numpy as np

    cc = random_cc(d=8, d_sae=24, seed=5, dtype=torch.float64).eval()
    C.save(cc, tmp_path / "run" / "crosscoder")
    table = C.latent_table(cc)
    rng = np.random.default_rng(0)
    table["mean_activation"] = rng.uniform(0.1, 2.0, len(table))
    table["class"] = "shared"
    mi_only = [3, 7, 11, 19, 20]
    table.loc[mi_only, "class"] = "mi_only"
    table["scaling_label"] = "not_mi_only"
    table.loc[mi_only, "scaling_label"] = ["complete_shrinkage", "genuine", "genuine", "latent_decoupling", "genuine"]
    table.to_parquet(tmp_path / "run" / "latents.parquet")
    genuine = sorted([7, 11, 20], key=lambda j: -table.loc[j, "mean_activation"] * table.loc[j, "norm_m1"])
    for k, top in ((2, genuine[:2]), (3, genuine)):
        f = torch.zeros(1, cc.cfg.d_sae, dtype=torch.float64)
        f[0, top] = torch.as_tensor(table.loc[top, "mean_activation"].to_numpy().copy())
        with torch.no_grad():
            recon = (cc.decode(f) - cc.decode(torch.zeros_like(f)))[0]
        expected = (recon[1] - recon[0]).numpy()
        np.testing.assert_allclose(C.mi_only_direction(tmp_path / "run", k), expected, rtol=1e-12, atol=1e-12)
    table["class"] = "shared"
    table.to_parquet(tmp_path / "run" / "latents.parquet")
    assert not C.mi_only_direction(tmp_path / "run", 3).any()


def test_moved_vectors_are_each_latents_reconstruction_difference():
    """Compared (float64): each row of ``moved_vectors`` against the crosscoder's own decode of that
    latent alone at its mean activation, the last model's reconstruction minus the first's, each less
    its decode of zero (the biases); for all latents and for a chosen subset in a given order."""
    import numpy as np

    cc = random_cc(n_models=3, d=8, d_sae=24, seed=7, dtype=torch.float64).eval()
    mean = np.random.default_rng(1).uniform(0.1, 2.0, cc.cfg.d_sae)
    expected = []
    for j in range(cc.cfg.d_sae):
        f = torch.zeros(1, cc.cfg.d_sae, dtype=torch.float64)
        f[0, j] = mean[j]
        with torch.no_grad():
            recon = (cc.decode(f) - cc.decode(torch.zeros_like(f)))[0]
        expected.append((recon[-1] - recon[0]).numpy())
    expected = np.stack(expected)
    np.testing.assert_allclose(C.moved_vectors(cc, mean), expected, rtol=1e-12, atol=1e-12)
    subset = [9, 2, 17]
    np.testing.assert_allclose(C.moved_vectors(cc, mean[subset], subset), expected[subset], rtol=1e-12, atol=1e-12)


def shifted_world(n, seed=0, scale=1.5):
    """Model 0: ACTIVE of SHARED unit atoms (as ``planted``); model 1: the same plus a fixed unit
    direction u on exactly the tokens where atom 0 is active (a fine-tune that adds a direction to
    one kind of token: no new latent is needed, atom 0's latent can carry it)."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(SHARED + 1, D, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, SHARED, generator=gen).argsort(1)[:, :ACTIVE]
    weights = torch.rand(n, ACTIVE, generator=gen) * 2 + 0.5
    x0 = (weights[..., None] * atoms[idx]).sum(1) + 0.3
    on = (idx == 0).any(1, keepdim=True)
    return torch.stack([x0, x0 + scale * on * atoms[SHARED]], 1), atoms[SHARED]


def two_split_paired(folder, acts, eval_share=6):
    """Paired stores whose last 1/eval_share of the tokens are the eval split (``run`` reports there)."""
    cut = len(acts) - len(acts) // eval_share
    return PairedStore([_two_split_store(folder / f"m{m}", acts[:cut, m], acts[cut:, m]) for m in range(acts.shape[1])])


@pytest.mark.parametrize("same_init", [True, False])
def test_same_init_keeps_identical_models_decoders_identical(tmp_path, same_init):
    """Compared: the two decoders of a crosscoder trained on two identical models, and ``run``'s
    ``moved_norm`` column and ``moved`` record. With ``same_init`` the decoders stay bit-identical
    (the same start and the same gradients), so no latent carries a difference; with independent
    blocks the start's difference stays (median decoder cosine below 0.9 after this training) and
    every latent that fires "moves"."""
    import numpy as np
    import pandas as pd

    acts, _ = planted(N_PLANTED, identical=True)
    paired = two_split_paired(tmp_path / "acts", acts)
    cfg = C.CrosscoderConfig(n_models=2, d_in=D, d_sae=D_SAE, k=ACTIVE, same_init=same_init)
    training = {"tokens": N_PLANTED, "batch_size": 128, "epochs": EPOCHS // 2, "checkpoint_every": 0,
                "shuffle_buffer": 4000}  # fmt: skip
    opts = {"lr": 1e-2, "seed": 0, "warmup_steps": 5, "decay_fraction": 0.2, "dead_tokens": 2000, "logit_lens_k": 3}
    record = C.run(paired, cfg, tmp_path / "run", training, opts, samples=None, progress=False)
    cc = C.load(tmp_path / "run" / "crosscoder")
    table = pd.read_parquet(tmp_path / "run" / "latents.parquet")
    if same_init:
        assert torch.equal(cc.W_dec[:, 0], cc.W_dec[:, 1])
        assert (table["moved_norm"] == 0).all() and table["moved_rank"].isna().all()
        assert record["moved"] == {"n_latents": 0, "total_norm": 0.0}
    else:
        assert float(np.nanmedian(table["decoder_cosine"])) < 0.9
        fired = table["mean_activation"] > 0  # every latent that fires carries some of the start's difference
        assert record["moved"]["n_latents"] == fired.sum() > 0 and table.loc[fired, "moved_rank"].notna().all()


def test_a_direction_added_to_one_kind_of_token_is_the_first_moved_latent(tmp_path):
    """A direction u added by model 1 to the tokens of one shared atom makes no Mi-only latent (atom 0's
    latent carries it); compared: the top latent by ``moved_rank`` moves along u (|cos| > 0.9) and
    is atom 0's latent (its M0 decoder at |cos| > 0.9 with atom 0), and no latent is "mi_only"."""
    import numpy as np
    import pandas as pd

    acts, u = shifted_world(N_PLANTED)
    paired = two_split_paired(tmp_path / "acts", acts)
    cfg = C.CrosscoderConfig(n_models=2, d_in=D, d_sae=D_SAE, k=ACTIVE, same_init=True)
    training = {"tokens": N_PLANTED, "batch_size": 128, "epochs": EPOCHS, "checkpoint_every": 0, "shuffle_buffer": 4000}
    opts = {"lr": 1e-2, "seed": 0, "warmup_steps": 5, "decay_fraction": 0.2, "dead_tokens": 2000, "logit_lens_k": 3}
    C.run(paired, cfg, tmp_path / "run", training, opts, samples=None, progress=False)
    cc = C.load(tmp_path / "run" / "crosscoder", dtype=torch.float64)
    table = pd.read_parquet(tmp_path / "run" / "latents.parquet")
    top = int(table.loc[table["moved_rank"] == 1, "latent"].iloc[0])
    moved = C.moved_vectors(cc, table["mean_activation"].to_numpy()[[top]], [top])[0]
    assert abs(moved @ u.double().numpy()) / np.linalg.norm(moved) > 0.9
    base = cc.W_dec.detach()[top, 0]
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(SHARED + 1, D, generator=gen)
    atom0 = (atoms[0] / atoms[0].norm()).double()
    assert abs(float(base @ atom0 / base.norm())) > 0.9
    assert not (table["class"] == "mi_only").any(), table["class"].value_counts()
