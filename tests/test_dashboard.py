"""The dashboard's documents: built from the stage tables exactly (rows, pages, lineages)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from sae_diff import dashboard, features, grid
from sae_diff.io import write_json

D_SAE = 12


def _example(sample: int, at: int, value: float, width: int = 9) -> dict:
    tokens = [f"t{sample}_{i}" for i in range(width)]
    acts = [0.0] * width
    acts[at] = value
    return {"sample_id": sample, "position": 20 + at, "activation": value, "tokens": tokens, "acts": acts, "at": at}


def _features(folder, seed: int, dead=(11,)):
    """A feature folder: stats.parquet and the token examples of D_SAE features (``dead`` never fire)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    freq = rng.uniform(0.001, 0.1, D_SAE)
    freq[list(dead)] = 0
    stats = pd.DataFrame(
        {
            "feature": np.arange(D_SAE),
            "freq": freq,
            "seq_freq": freq * 3,
            "fire_count": np.ceil(freq * 1000).astype(int),
            "mean_act": np.where(freq > 0, rng.uniform(1, 2, D_SAE), np.nan),
            "max_act": np.where(freq > 0, rng.uniform(3, 4, D_SAE), np.nan),
            "prompt_fires": np.arange(D_SAE),
            "completion_fires": np.arange(D_SAE) * 2,
            "promoted": [[f"p{j}a", f"p{j}b", f"p{j}c", f"p{j}d"] for j in range(D_SAE)],
            "promoted_logit": [[3.0, 2.0, 1.0, 0.5]] * D_SAE,
            "suppressed": [[f"s{j}"] for j in range(D_SAE)],
            "suppressed_logit": [[-1.0]] * D_SAE,
        }
    )
    stats.to_parquet(folder / "stats.parquet")
    views = {
        str(j): {
            "histogram": {"edges": list(np.linspace(0, 4, 21)), "counts": [1] * 20},
            "top": [_example(s, 4, 4.0 - s / 10) for s in range(5)],
            "intervals": [{"label": f"q{i}", "n": 3, "examples": [_example(9, 1, 1.0)]} for i in range(4)],
        }
        for j in range(D_SAE)
        if j not in dead
    }
    features.write_token_examples(folder, views)
    return folder


def _lineages(path):
    """MXDX over M0_D0 → M1_D1: feature j of M1_D1 continues feature (j + 1) % D_SAE of M0_D0;
    feature 3 is born at M1_D1, feature 5 changed (cos 0.2), the rest same."""
    rows = []
    for j in range(D_SAE):
        label = "born" if j == 3 else "changed" if j == 5 else "same"
        rows.append(
            {
                "lineage": j,
                "origin_cell": "M1_D1" if j == 3 else "M0_D0",
                "origin_feature": j,
                "reverted_at": np.nan,
                "feature_M0_D0": -1 if j == 3 else (j + 1) % D_SAE,
                "label_M0_D0": None if j == 3 else "origin",
                "cos_prev_M0_D0": np.nan,
                "cos_origin_M0_D0": np.nan if j == 3 else 1.0,
                "freq_M0_D0": np.nan if j == 3 else 0.01,
                "feature_M1_D1": j,
                "label_M1_D1": label,
                "cos_prev_M1_D1": np.nan if j == 3 else (0.2 if j == 5 else 0.95),
                "cos_origin_M1_D1": np.nan if j == 3 else (0.2 if j == 5 else 0.95),
                "freq_M1_D1": 0.02,
            }
        )
    pd.DataFrame(rows).to_parquet(path)
    return path


def _probe(path, top: list[int]):
    """A probe JSON with its per-feature table beside it: ``top`` in rank order, the rest unranked."""
    rank = np.full(D_SAE, -1)
    rank[top] = np.arange(len(top))
    pd.DataFrame({"feature": np.arange(D_SAE), "rank": rank, "smd": np.linspace(-1, 1, D_SAE)}).to_parquet(
        path.with_suffix(".parquet")
    )
    write_json(path, {"metric": path.stem})
    return path


@pytest.fixture
def tables(tmp_path):
    m1 = _features(tmp_path / "features" / "M1_D1" / "layer3" / "topk", seed=1)
    m0 = _features(tmp_path / "features" / "M0_D0" / "layer3" / "topk", seed=0)
    effects = tmp_path / "effects.json"
    write_json(
        effects,
        {
            "experiment": "steering",
            "metric": "score",
            "cell": "M1_D1",
            "layer": 3,
            "sae": "topk",
            "features": [7, 8],
            "report": {"features": [7], "effect": 0.5, "ci_low": 0.2, "ci_high": 0.8, "p": 0.01, "alpha": 2.0},
        },
    )
    return {
        "m1": m1,
        "m0": m0,
        "lineages": _lineages(tmp_path / "lineages.parquet"),
        "probe": _probe(tmp_path / "score.json", [2, 9]),
        "effects": effects,
        "site": tmp_path / "dashboard",
    }


def _document(tables, **kw):
    return dashboard.sae_document(
        "M1_D1",
        3,
        "topk",
        tables["m1"],
        cell_features={"M0_D0": tables["m0"]},
        lineages={"MXDX": tables["lineages"]},
        probes={"score": tables["probe"]},
        interventions=[tables["effects"]],
        figure_links=["../figures/features/statistics.png"],
        **kw,
    )


def test_rows_are_the_stage_tables(tables):
    """Every feature is a row, its values the stats, lineage and probe tables' values (NaN as null)."""
    doc = _document(tables)
    names = [c["name"] for c in doc["columns"]]
    assert names[:2] == ["feature", "page"]
    stats = pd.read_parquet(tables["m1"] / "stats.parquet")
    assert len(doc["rows"]) == D_SAE and doc["d_sae"] == D_SAE
    for row, (_, want) in zip(doc["rows"], stats.iterrows()):
        got = dict(zip(names, row))
        assert got["feature"] == want["feature"]
        assert got["freq"] == pytest.approx(want["freq"], rel=1e-5)  # 6 significant digits
        if math.isnan(want["max_act"]):
            assert got["max_act"] is None
        else:
            assert got["max_act"] == pytest.approx(want["max_act"], rel=1e-5)
        assert got["promoted"] == " | ".join(want["promoted"][:3])
        assert got["label_MXDX"] == ("born" if got["feature"] == 3 else "changed" if got["feature"] == 5 else "same")
        assert got["probe_rank_score"] == {2: 1, 9: 2}.get(got["feature"])  # 1-based, as on the pages
        assert (got["causal_tests"] is None) == (got["feature"] not in (7, 8))
    json.dumps(doc, allow_nan=False)  # no NaN reaches the browser


def test_pages_for_the_features_that_matter_in_order(tables):
    """Tested first (the reported one with its result), then probe top, then labelled (born before
    changed), then the most frequent; a dead feature never gets a page; max_pages caps it."""
    doc = _document(tables, n_top=2)
    order = list(doc["pages"])
    assert order[:6] == ["7", "8", "2", "9", "3", "5"]
    assert "11" not in doc["pages"]
    assert doc["pages"]["7"]["why"][0].startswith("steering score: +0.50 [+0.20, +0.80], p 0.01")
    assert doc["pages"]["8"]["why"] == ["steering candidate for score (select half)"]
    assert doc["pages"]["3"]["why"][0] == "born at M1_D1 (MXDX)"
    page_flags = {row[0]: row[1] for row in doc["rows"]}
    assert {j for j, flag in page_flags.items() if flag} == {int(j) for j in doc["pages"]}
    assert list(_document(tables, n_top=2, max_pages=3)["pages"]) == ["7", "8", "2"]


def test_a_page_holds_the_examples_and_lineage(tables):
    """Examples trimmed to the window around their token; the lineage lists each step with the
    matched feature of the other cell and that feature's own top examples."""
    doc = _document(tables, window=2, n_lineage_examples=2)
    page = doc["pages"]["7"]
    for example in page["top"]:
        assert len(example["tokens"]) == len(example["acts"]) == 5 and example["at"] == 2
        assert example["acts"][example["at"]] == example["activation"]
    assert [q["label"] for q in page["quantiles"]] == [
        f"{a}–{b}% of max" for a, b in ((0, 25), (25, 50), (50, 75), (75, 100))
    ]
    assert page["logit_lens"]["promoted"][0] == ["p7a", 3.0]
    (block,) = page["lineages"]
    assert block["branch"] == "MXDX" and [s["cell"] for s in block["steps"]] == ["M0_D0", "M1_D1"]
    before, now = block["steps"]
    assert before["feature"] == 8 and before["key"] == "M0_D0/layer3/topk"
    m0 = features.read_token_examples(tables["m0"])["8"]["top"]
    assert [e["sample_id"] for e in before["top"]] == [e["sample_id"] for e in m0[:2]]
    assert now["feature"] == 7 and now["cos_prev"] == pytest.approx(0.95)
    born = doc["pages"]["3"]["lineages"][0]["steps"][0]
    assert born["feature"] is None and born["top"] == []
    assert page["figures"][0] == {"title": "features / statistics", "href": "../figures/features/statistics.png"}


def test_site_files_and_their_names(tables):
    """The workflow's file name for an SAE is the dashboard's slug of its key; the index lists the
    written documents, and the page holds them inline (it opens from disk)."""
    doc = _document(tables)
    path = tables["site"] / "data" / "M1_D1__layer3__topk.json"
    assert grid.dashboard_data("M1_D1", 3, "topk").endswith("/dashboard/data/" + path.name)
    assert dashboard.slug(doc["key"]) == path.stem
    dashboard.write_sae(doc, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    index = dashboard.write_index(tables["site"], [path])
    assert index["saes"][0]["key"] == "M1_D1/layer3/topk" and index["saes"][0]["n_pages"] == len(doc["pages"])
    html = (tables["site"] / "index.html").read_text()
    assert "M1_D1/layer3/topk" in html
    with pytest.raises(ValueError, match="must lie in"):
        dashboard.write_index(tables["site"], [tables["probe"]])


def test_missing_token_examples_is_named(tables):
    (tables["m1"] / features.TOKEN_EXAMPLES).unlink()
    with pytest.raises(FileNotFoundError, match="token_examples.parquet.*feature_stats"):
        _document(tables)


def test_the_cli_takes_every_repeated_flag(tables, tmp_path):
    """The rule passes one flag per file (--cell-features A --cell-features B ...): every one
    counts, so the verb writes exactly the document of the library call with all inputs, and the
    index verb's page holds it."""
    from sae_diff import cli

    effects_b = tmp_path / "ablation.json"
    write_json(effects_b, {**json.loads(tables["effects"].read_text()), "experiment": "ablation", "features": [10]})
    other = _features(tmp_path / "features" / "M9_D9" / "layer3" / "topk", seed=9)
    out = tables["site"] / "data" / "M1_D1__layer3__topk.json"
    spec = json.dumps({"dashboard": {"max_pages": 150, "n_top": 10, "lineage_examples": 3, "context_window": 6}})
    args = ["dashboard-sae", "--spec", spec, "--cell", "M1_D1", "--layer", "3", "--sae", "topk"]
    args += ["--features-dir", str(tables["m1"]), "--cell-features", f"M0_D0={tables['m0']}"]
    args += ["--cell-features", f"M9_D9={other}", "--lineages", f"MXDX={tables['lineages']}"]
    args += ["--probes", f"score={tables['probe']}", "--interventions", str(tables["effects"])]
    args += ["--interventions", str(effects_b), "--out", str(out)]
    assert cli.main(args) in (0, None)
    want = dashboard.sae_document(
        "M1_D1", 3, "topk", tables["m1"], cell_features={"M0_D0": tables["m0"], "M9_D9": other},
        lineages={"MXDX": tables["lineages"]}, probes={"score": tables["probe"]},
        interventions=[tables["effects"], effects_b],
    )  # fmt: skip
    got = json.loads(out.read_text())
    assert got == json.loads(json.dumps(want))
    assert "ablation candidate for score (select half)" in got["pages"]["10"]["why"]
    assert got["pages"]["7"]["lineages"][0]["steps"][0]["top"]  # M0_D0's examples: not dropped by a later flag
    index = tables["site"] / "index.html"
    assert cli.main(["dashboard", "--saes", str(out), "--out", str(index)]) in (0, None)
    assert 'data-key="M1_D1/layer3/topk"' in index.read_text()


def test_same_token_columns_against_a_dense_argmax(tmp_path):
    """Each SAE feature's nearest crosscoder latent (this model's decoder) and diff-SAE latent,
    against a float64 argmax of |cos| over every pair; a planted copy is found with |cos| 1."""
    import torch

    from sae_diff import crosscoder
    from sae_diff.sae import files
    from sae_diff.sae.model import SAE, SAEConfig

    rng = np.random.default_rng(3)
    sae = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=6, k=2))
    cc = crosscoder.Crosscoder(crosscoder.CrosscoderConfig(n_models=2, d_in=8, d_sae=10, k=2))
    diff = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=5, k=2))
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(rng.normal(size=(6, 8))))
        cc.W_dec.copy_(torch.from_numpy(rng.normal(size=(10, 2, 8))))
        cc.W_dec[7, 1] = -3 * sae.W_dec[2]  # feature 2 lives in the tuned decoder of latent 7
        diff.W_dec.copy_(torch.from_numpy(rng.normal(size=(5, 8))))
    files.save(sae, tmp_path / "sae")
    cc_dir, diff_dir = tmp_path / "cc", tmp_path / "diff"
    crosscoder.save(cc, cc_dir / "crosscoder")
    classes = ["shared", "mi_only"] * 5
    pd.DataFrame({"latent": np.arange(10), "class": classes}).to_parquet(cc_dir / "latents.parquet")
    files.save(diff, diff_dir / "sae")
    pd.DataFrame({"latent": [4, 0, 2, 1, 3], "rank": [0, 1, 2, 3, 4]}).to_parquet(diff_dir / "latents.parquet")

    def unit(m):
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    w = sae.W_dec.detach().double().numpy()
    for model in (0, 1):
        got = dashboard.same_token_columns(tmp_path / "sae", model, cc_dir, diff_dir)
        cos = np.abs(unit(w) @ unit(cc.W_dec.detach()[:, model].double().numpy()).T)
        assert got["crosscoder_latent"].tolist() == cos.argmax(1).tolist()
        assert got["crosscoder_cos"] == pytest.approx(cos.max(1))
        assert got["crosscoder_class"].tolist() == [classes[j] for j in cos.argmax(1)]
        cos = np.abs(unit(w) @ unit(diff.W_dec.detach().double().numpy()).T)
        assert got["diff_sae_latent"].tolist() == cos.argmax(1).tolist()
        rank = {4: 1, 0: 2, 2: 3, 1: 4, 3: 5}
        assert got["diff_sae_rank"].tolist() == [rank[j] for j in cos.argmax(1)]
    assert got["crosscoder_latent"][2] == 7 and got["crosscoder_cos"][2] == pytest.approx(1.0)
