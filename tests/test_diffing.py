"""The same-token record (sae_diff.diffing): agreement across methods by |cosine|, the lens's
aligned latents, the all-iterations crosscoder's per-iteration counts, and the headline layout,
each against a hand computation on planted vectors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sae_diff import diffing


def test_agreement_finds_exactly_the_pairs_above_the_cosine():
    """Two methods share one direction (cos 0.8 by construction) and nothing else."""
    rng = np.random.default_rng(0)
    d = 64
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    w = rng.normal(size=d)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    shared = 0.8 * u + 0.6 * w  # cos(shared, u) = 0.8 exactly
    a = (["a1", "a2"], np.stack([u, rng.normal(size=d)]))
    b = (["b1", "b2"], np.stack([rng.normal(size=d), -shared * 3.0]))
    found = diffing.agreement({"x": a, "y": b}, 0.7)
    assert found == [{"x": "a1", "y": "b2", "cosine": pytest.approx(-0.8)}]
    assert diffing.agreement({"x": a, "y": b}, 0.81) == []
    best = diffing.best_matches(a, b)
    assert best[0]["match"] == "b2" and best[0]["cosine"] == pytest.approx(-0.8)


def test_aligned_latents_rank_by_absolute_cosine():
    d = 8
    eye = np.eye(d)
    lens = (["neutral"], eye[:1] * 2.0)
    decoder = np.stack([eye[1], -eye[0] * 0.5, 0.6 * eye[0] + 0.8 * eye[1]])
    out = diffing.aligned_latents({"adl": lens, "diff_sae": ([10, 11, 12], decoder)}, k=2)
    assert [row["latent"] for row in out["neutral"]["diff_sae"]] == [11, 12]
    assert [row["cosine"] for row in out["neutral"]["diff_sae"]] == pytest.approx([-1.0, 0.6])


def test_all_iterations_block_counts_latents_new_in_each_iteration(tmp_path, monkeypatch):
    """Decoder norms per model (M0, M1, M2) by hand: latent 0 shared, 1 appears at M1, 2 at M2,
    3 fades out of M2; Δnorm = ½((‖d^i‖ − ‖d^0‖)/max + 1), Mi-only above 0.9, M0-only below 0.1."""
    table = pd.DataFrame(
        {
            "latent": [0, 1, 2, 3],
            "norm_m0": [1.0, 0.05, 0.01, 1.0],
            "norm_m1": [1.0, 1.0, 0.02, 1.0],
            "norm_m2": [1.0, 1.0, 1.0, 0.05],
            "mi_only_rank": [np.nan, 1.0, 2.0, np.nan],
            "scaling_label": ["not_mi_only", "genuine", "genuine", "not_mi_only"],
        }
    )
    table.to_parquet(tmp_path / "latents.parquet")
    block = {"top": [1, 2], "n_mi_only": 2, "n_shared": 1, "n_m0_only": 1, "n_other": 0}
    monkeypatch.setattr(diffing, "crosscoder_block", lambda folder, top: (dict(block), ([], np.zeros((0, 0)))))
    out, _ = diffing.all_iterations_block(tmp_path, 10)
    assert out["n_models"] == 3
    assert out["per_iteration"] == {
        "M1": {"n_mi_only_vs_m0": 1, "n_m0_only_vs_mi": 0},
        "M2": {"n_mi_only_vs_m0": 2, "n_m0_only_vs_mi": 1},
    }
    assert out["emerged_at"] == {"M1": 1, "M2": 1}


def test_headline_is_keyed_by_iteration_then_layer():
    records = [
        {
            "pair": "M0_D2__M2_D2",
            "layer": 12,
            "methods": {"adl": {"top": ["her"]}, "kl": {"top": ["she"]}},
            "agreement": [{"adl": "data", "diff_sae": 7, "cosine": 0.9}],
        },
        {"pair": "all_D2", "layer": 12, "methods": {"crosscoder": {"top": [3]}}, "agreement": []},
    ]
    out = diffing.headline(records)
    assert out["adl"]["M2"]["layer12"] == {"top": ["her"], "agrees_with": records[0]["agreement"]}
    assert out["kl"]["M2"]["layer12"]["agrees_with"] == []
    assert out["crosscoder_all"]["layer12"]["data"] == "D2"


# ------------------------------------------------------------------ every diff-SAE latent's best match

D_MATCH, N_DIFF, N_CC = 16, 40, 30


def _method_folders(tmp_path, mi_only: list[int], identical: bool = False, seed: int = 0):
    """A saved diff-SAE (random decoder, latent 5 = -2 x the crosscoder's Mi decoder of latent 7) and
    a saved crosscoder over two models whose latents.parquet gives ``mi_only`` the class mi_only and
    the rest alternately shared / other. Returns (diff-SAE folder, crosscoder folder, W_dec, Mi decoder, classes)."""
    import json

    import torch

    from sae_diff import crosscoder
    from sae_diff.sae import files
    from sae_diff.sae.model import SAE, SAEConfig

    gen = torch.Generator().manual_seed(seed)
    cfg = crosscoder.CrosscoderConfig(n_models=2, d_in=D_MATCH, d_sae=N_CC, k=3)
    cc = crosscoder.Crosscoder(cfg)
    with torch.no_grad():
        cc.W_dec.copy_(torch.randn(N_CC, 2, D_MATCH, generator=gen) * (torch.rand(N_CC, 2, 1, generator=gen) + 0.1))
        cc.W_enc.copy_(torch.randn(2, D_MATCH, N_CC, generator=gen))
    cc_dir = tmp_path / "crosscoder"
    crosscoder.save(cc, cc_dir / "crosscoder")
    classes = np.array(["shared" if j % 2 else "other" for j in range(N_CC)], dtype=object)
    classes[mi_only] = "mi_only"
    pd.DataFrame({"latent": range(N_CC), "class": classes}).to_parquet(cc_dir / "latents.parquet")
    mi_decoder = cc.W_dec.detach().double()[:, -1, :].numpy()

    sae_dir = tmp_path / "diff_sae"
    sae = SAE(SAEConfig(architecture="topk", d_in=D_MATCH, d_sae=N_DIFF, k=4))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(N_DIFF, D_MATCH, generator=gen))
        sae.W_dec[5] = -2.0 * cc.W_dec[7, -1]
        sae.W_enc_T.copy_(sae.W_dec)
    files.save(sae, sae_dir / "sae")
    share = np.sort(np.random.default_rng(seed).random(N_DIFF))[::-1]
    order = np.random.default_rng(seed + 1).permutation(N_DIFF)
    pd.DataFrame({"latent": order, "rank": np.arange(1, N_DIFF + 1), "share": share}).to_parquet(
        sae_dir / "latents.parquet"
    )
    (sae_dir / "metrics.json").write_text(json.dumps({"identical": True} if identical else {"fvu": 0.5}))
    return sae_dir, cc_dir, sae.W_dec.detach().double().numpy(), mi_decoder, classes, order


def _dense_best(source: np.ndarray, target: np.ndarray):
    """|cos| argmax written plainly: every pair's cosine in float64, then the argmax per row."""
    cos = np.array(
        [[float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) for b in target] for a in source], dtype=np.float64
    )
    best = np.abs(cos).argmax(axis=1)
    return best, cos[np.arange(len(source)), best]


def test_every_diff_sae_latent_gets_its_best_crosscoder_match(tmp_path):
    """Compared: ``latent_matches`` (chunked float64 matmul) with ``_dense_best`` on random directions,
    among the Mi-only latents and among all; the planted pair (diff-SAE 5 = -2 x crosscoder 7) has
    cosine -1; ranks and shares follow the diff-SAE's table; parquet keeps the types."""
    mi_only = [3, 7, 11, 20]
    sae_dir, cc_dir, w_dec, mi_dec, classes, order = _method_folders(tmp_path, mi_only)
    table = diffing.latent_matches(sae_dir, cc_dir)
    assert table["latent"].tolist() == list(range(N_DIFF))
    best, cos = _dense_best(w_dec, mi_dec[mi_only])
    assert table["mi_only_match"].tolist() == [mi_only[j] for j in best]
    np.testing.assert_allclose(table["mi_only_cosine"].to_numpy(dtype=float), cos, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(table["mi_only_abs_cosine"].to_numpy(dtype=float), np.abs(cos), rtol=1e-12)
    best, cos = _dense_best(w_dec, mi_dec)
    assert table["match"].tolist() == best.tolist()
    assert table["match_class"].tolist() == classes[best].tolist()
    np.testing.assert_allclose(table["match_cosine"].to_numpy(dtype=float), cos, rtol=1e-12, atol=1e-12)
    assert table.loc[5, "mi_only_match"] == 7 and table.loc[5, "match"] == 7
    assert table.loc[5, "mi_only_cosine"] == pytest.approx(-1.0, abs=1e-6) and table.loc[5, "match_class"] == "mi_only"
    rank_of = {latent: rank for rank, latent in enumerate(order, start=1)}
    assert table["rank"].tolist() == [rank_of[j] for j in range(N_DIFF)]
    path = tmp_path / "matches.parquet"
    table.to_parquet(path, index=False)
    back = pd.read_parquet(path)
    assert dict(back.dtypes.astype(str)) == diffing.MATCH_COLUMNS
    pd.testing.assert_frame_equal(back, table)
    # chunking changes nothing
    index, cosine = diffing.best_by_abs_cosine(w_dec, mi_dec, chunk=7)
    assert index.tolist() == table["match"].tolist()
    np.testing.assert_array_equal(cosine, table["match_cosine"].to_numpy(dtype=float))


def test_without_mi_only_latents_the_any_class_match_still_informs(tmp_path):
    """No Mi-only latent: the Mi-only columns are null (also after parquet), the any-class match is
    the dense argmax; identical models: no rows, the same columns."""
    sae_dir, cc_dir, w_dec, mi_dec, classes, _ = _method_folders(tmp_path, [])
    table = diffing.latent_matches(sae_dir, cc_dir)
    path = tmp_path / "matches.parquet"
    table.to_parquet(path, index=False)
    back = pd.read_parquet(path)
    assert back[["mi_only_match", "mi_only_cosine", "mi_only_abs_cosine"]].isna().all().all()
    best, cos = _dense_best(w_dec, mi_dec)
    assert back["match"].tolist() == best.tolist() and set(back["match_class"]) <= {"shared", "other"}
    np.testing.assert_allclose(back["match_abs_cosine"].to_numpy(dtype=float), np.abs(cos), rtol=1e-12)
    assert back.loc[5, "match"] == 7  # the planted pair, though latent 7 is not Mi-only here

    empty = diffing.latent_matches(*_method_folders(tmp_path / "same", [3], identical=True)[:2])
    assert len(empty) == 0 and dict(empty.dtypes.astype(str)) == diffing.MATCH_COLUMNS


def test_diffing_record_cli_writes_the_matches_beside_the_record(tmp_path):
    """The verb with --matches writes the same table as ``latent_matches``; the crosscoder block carries
    each model's spliced CE score and KL from its metrics.json; without both methods --matches is refused."""
    import json

    from sae_diff import cli

    sae_dir, cc_dir, *_ = _method_folders(tmp_path, [3, 7])
    ranked = pd.read_parquet(cc_dir / "latents.parquet")
    ranked["mi_only_rank"] = np.where(ranked["class"] == "mi_only", ranked["latent"], np.nan)
    ranked["scaling_label"] = np.where(ranked["class"] == "mi_only", "genuine", "not_mi_only")
    ranked.to_parquet(cc_dir / "latents.parquet")
    counts = {"mi_only": 2, "shared": 14, "m0_only": 0, "other": 14}
    models = {f"m{m}": {"fvu": 0.1 * m, "ce_loss_score": 0.9 - m / 10, "kl_div_with_spliced": 0.01 * m} for m in (0, 1)}
    (cc_dir / "metrics.json").write_text(json.dumps({"classes": counts, "scaling_labels": {}, "models": models}))
    spec = json.dumps({"top": 5, "agreement_cosine": 0.7})
    out, matches = tmp_path / "rec" / "layer1.json", tmp_path / "rec" / "layer1.diff_sae_matches.parquet"
    args = ["diffing-record", "--spec", spec, "--pair", "M0_D1__M1_D1", "--layer", "1",
            "--crosscoder", str(cc_dir), "--diff-sae", str(sae_dir), "--out", str(out)]  # fmt: skip
    assert cli.main([*args, "--matches", str(matches)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(matches), diffing.latent_matches(sae_dir, cc_dir))
    record = json.loads(out.read_text())
    top = record["methods"]["diff_sae"]["top"]
    assert [row["latent"] for row in record["methods"]["diff_sae"]["crosscoder_match"]] == top
    block = record["methods"]["crosscoder"]
    assert block["ce_loss_score"] == {"m0": 0.9, "m1": 0.8} and block["kl_div_with_spliced"] == {"m0": 0.0, "m1": 0.01}
    assert "metric" not in record["methods"]["diff_sae"]  # a metric_latents.json is read only when given
    rows = [
        {"latent": 4, "rho_train": 0.6, "rho_eval": 0.5, "p": 0.001, "q": 0.002, "called": True},
        {"latent": 9, "rho_train": -0.5, "rho_eval": -0.1, "p": 0.4, "q": 0.4, "called": False},
    ]
    null = {"draws": 3, "n_called": [0, 1, 0], "p": 0.5, "abs_rho_eval": [0.2, 0.1]}
    found = {"latents": rows, "n_eval": 40, "n_eval_groups": 10, "n_called": 1, "random_directions": null}
    (sae_dir / "metric_latents.json").write_text(json.dumps({"metrics": {"m": found}}))
    assert cli.main([*args, "--metric-latents", str(sae_dir / "metric_latents.json")]) == 0
    metric = json.loads(out.read_text())["methods"]["diff_sae"]["metric"]["m"]
    assert metric["chosen"] == [4, 9] and metric["called"] == [4] and metric["rho_train"] == [0.6, -0.5]
    assert metric["random_directions_called"] == [0, 1, 0] and metric["random_directions_p"] == 0.5
    assert metric["random_directions_abs_rho_eval"] == [0.2, 0.1]
    with pytest.raises(SystemExit):
        cli.main(["diffing-record", "--spec", spec, "--pair", "p", "--layer", "1", "--diff-sae", str(sae_dir),
                  "--out", str(out), "--matches", str(matches)])  # fmt: skip
