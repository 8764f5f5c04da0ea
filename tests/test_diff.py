"""SAE diffs on planted cases, and thresholds calibrated on seed pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_diff import diff
from sae_diff.sae.model import SAE, SAEConfig

D, N_SAME, N_CHANGED, N_REMOVED = 64, 80, 20, 20


def sae_with_decoder(rows: np.ndarray) -> SAE:
    sae = SAE(SAEConfig(architecture="topk", d_in=rows.shape[1], d_sae=len(rows), k=4))
    with torch.no_grad():
        sae.W_dec.copy_(torch.as_tensor(rows))
        sae.W_enc_T.copy_(torch.as_tensor(rows) * 0.5)
    return sae


def planted():
    """B = A's first 80 rows (permuted, tiny noise), the next 20 rotated to cos 0.7,
    the last 20 replaced by fresh random directions."""
    rng = np.random.default_rng(0)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    a = unit(rng.standard_normal((N_SAME + N_CHANGED + N_REMOVED, D)))
    b = a.copy()
    b[:N_SAME] = unit(a[:N_SAME] + 0.01 * rng.standard_normal((N_SAME, D)))
    for i in range(N_SAME, N_SAME + N_CHANGED):
        u = rng.standard_normal(D)
        u -= (u @ a[i]) * a[i]
        b[i] = 0.7 * a[i] + np.sqrt(1 - 0.49) * u / np.linalg.norm(u)
    b[N_SAME + N_CHANGED :] = unit(rng.standard_normal((N_REMOVED, D)))
    perm = rng.permutation(len(b))  # B's row j is the original row perm[j]
    return a, b[perm], perm


def test_planted_permuted_perturbed_removed_and_added_are_labelled_exactly():
    a, b, perm = planted()
    sae_a, sae_b = sae_with_decoder(a), sae_with_decoder(b)
    thresholds = diff.Thresholds(same=0.9, new=0.45, same_quantile=0.05, new_quantile=0.001, n_null=0)
    table = diff.weight_diff(sae_a, sae_b)
    labels = diff.label(table["dec_cos_match"].to_numpy(), thresholds)
    where_in_b = np.argsort(perm)  # original row i sits at B row where_in_b[i]
    assert (labels[:N_SAME] == "same").all()
    assert (table["match"].to_numpy()[:N_SAME] == where_in_b[:N_SAME]).all()
    assert (labels[N_SAME : N_SAME + N_CHANGED] == "changed").all()
    np.testing.assert_allclose(table["dec_cos_match"].to_numpy()[N_SAME : N_SAME + N_CHANGED], 0.7, atol=1e-6)
    assert (labels[N_SAME + N_CHANGED :] == "new").all()  # died: nothing in B resembles them
    # B's view: exactly the 20 fresh directions are new (born)
    born = diff.label(diff.weight_diff(sae_b, sae_a)["dec_cos_match"].to_numpy(), thresholds) == "new"
    assert set(np.nonzero(born)[0]) == set(where_in_b[N_SAME + N_CHANGED :])


def test_weight_diff_columns_against_dense_math():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((30, 8)), rng.standard_normal((30, 8))
    sae_a, sae_b = sae_with_decoder(a * 2.0), sae_with_decoder(b)
    table = diff.weight_diff(sae_a, sae_b, aligned=True)
    ua, ub = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(table["dec_cos_same"], (ua * ub).sum(1), atol=1e-6)  # weights held in float32
    np.testing.assert_allclose(table["dec_norm"], 2 * np.linalg.norm(a, axis=1), rtol=1e-6)
    cos_within = ua @ ua.T
    np.fill_diagonal(cos_within, -np.inf)
    np.testing.assert_allclose(table["max_cos_within"], cos_within.max(1), atol=1e-6)
    # the Hungarian matching maximises the total cosine: no other permutation of B does better
    from itertools import permutations

    small_a, small_b = ua[:6], ub[:6]
    partner, cos = diff.match(small_a, small_b)
    best = max(sum(small_a[i] @ small_b[p[i]] for i in range(6)) for p in permutations(range(6)))
    assert cos.sum() == pytest.approx(best)
    assert diff.mmcs(table) == pytest.approx(float(np.nanmean(table["dec_cos_match"])))


def test_calibration_quantiles_and_label_edges():
    null = np.linspace(0.0, 1.0, 1001)
    t = diff.calibrate(null, same_quantile=0.05, new_quantile=0.01)
    assert t.same == pytest.approx(0.05) and t.new == pytest.approx(0.01)
    assert list(diff.label(np.array([0.05, 0.04, 0.01, 0.0, np.nan]), t)) == [
        "same",
        "changed",
        "changed",
        "new",
        "new",
    ]
    with pytest.raises(ValueError, match="quantiles"):
        diff.calibrate(null, same_quantile=0.01, new_quantile=0.05)


def test_seed_pair_calibration_holds_on_an_independent_seed_pair(tmp_path):
    """Thresholds from seeds (0, 1) call at most ~5% of features changed between seeds (2, 3)."""
    from sae_diff.activations import ActivationStore, write_store
    from sae_diff.sae import files
    from sae_diff.sae.train import TrainSpec, train
    from tests.test_sae_training import planted as planted_acts

    acts, _ = planted_acts(n=30_000)
    store = ActivationStore(write_store(tmp_path / "acts", acts, shard_tokens=5000))
    specs = [
        TrainSpec(
            name=f"s{seed}",
            sae=SAEConfig(architecture="topk", d_in=16, d_sae=64, k=3),
            lr=1e-2,
            warmup_steps=5,
            seed=seed,
            dead_tokens=2000,
            init_sample=512,
        )
        for seed in range(4)
    ]
    outs = train(
        store,
        specs,
        [tmp_path / s.name for s in specs],
        n_tokens=30_000,
        batch_size=128,
        epochs=2,
        shuffle_buffer=6000,
        checkpoint_every=0,
        progress=False,
    )
    saes = [files.load(o) for o in outs]
    null = diff.weight_diff(saes[0], saes[1])["dec_cos_match"].to_numpy()
    thresholds = diff.calibrate(null, same_quantile=0.05)
    second = diff.weight_diff(saes[2], saes[3])["dec_cos_match"].to_numpy()
    not_same = float((diff.label(second, thresholds) != "same").mean())
    print(f'seed-pair calibration: {not_same:.3f} of features not "same" on the independent pair')
    assert not_same <= 0.08, (not_same, thresholds)  # 5% by construction, plus sampling noise at 64 features


def _stats(n, dead=()):
    import pandas as pd

    dead_mask = np.zeros(n, dtype=bool)
    dead_mask[list(dead)] = True
    return pd.DataFrame(
        {"feature": np.arange(n), "dead": dead_mask, "freq": np.where(dead_mask, 0.0, 0.1), "enc_norm": np.ones(n)}
    )


THRESHOLDS = diff.Thresholds(same=0.9, new=0.45, same_quantile=0.05, new_quantile=0.001, n_null=0)


def one_hot_sae(rows: np.ndarray) -> SAE:
    """A TopK SAE with k = 1 whose encoder reads its decoder rows: a token along one row fires that
    feature alone when the rows are orthonormal."""
    sae = sae_with_decoder(rows)
    sae.cfg.k = 1
    return sae


def tokens_along(rows: np.ndarray, cell: int, per: int = 16, seed: int = 0):
    """A cell's eval tokens: ``per`` tokens along each row (magnitudes 1–3), two tokens per prompt."""
    from sae_diff.presence import Tokens

    rng = np.random.default_rng(seed + cell)
    acts = np.repeat(rows, per, axis=0) * rng.uniform(1, 3, (len(rows) * per, 1))
    n = len(acts)
    identity = np.stack([np.full(n, cell), np.arange(n), np.zeros(n, dtype=np.int64)], axis=1)
    return Tokens(torch.from_numpy(acts.astype(np.float32)), np.arange(n) // 2, identity.astype(np.int64))


def test_step_labels_died_absent_or_collapsed_born_present_unmatched_and_inactive():
    """An orthonormal world of 40 features. B keeps 28 (3 with a collapsed encoder), rotates 4 to cos
    0.7 with a new direction, and replaces 5 by fresh directions; 3 more A features are re-cut by B's
    dictionary (B's decoder row is another direction, cos 0.3) while B's tokens still carry them
    along A's direction. Feature 39 never fires on A's tokens. Died: exactly the 5 replaced (absent
    from B's tokens) and the 3 collapsed; born: the 5 fresh and 39; the re-cut are 'changed'
    (unmatched, present), not dead; the rotated are 'changed'."""
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((64, 64)))[0]
    a = q[:40]
    b = a.copy()
    rotated, replaced, recut, collapsed = [28, 29, 30, 31], [32, 33, 34, 35, 36], [37, 38], [0, 1, 2]
    for j, i in enumerate(rotated):
        b[i] = 0.7 * q[i] + np.sqrt(1 - 0.49) * q[40 + j]
    for j, i in enumerate(replaced):
        b[i] = q[44 + j]
    for j, i in enumerate(recut):
        b[i] = 0.3 * q[i] + np.sqrt(1 - 0.09) * q[50 + j]
    sae_a, sae_b = one_hot_sae(a), one_hot_sae(b)
    with torch.no_grad():
        sae_b.W_enc_T[torch.as_tensor(collapsed)] *= 0.05
    tokens_a = tokens_along(a[:39], cell=0)  # feature 39 never fires on A's tokens
    carried = b.copy()
    carried[recut] = a[recut]  # B's tokens carry the re-cut features along A's direction
    carried[collapsed] = a[collapsed]
    tokens_b = tokens_along(carried, cell=1)
    table, summary = diff.compare(
        sae_a, sae_b, tokens_a, tokens_b, THRESHOLDS, aligned=False, collapse=0.1, absent_below=0.25
    )
    labels, reasons = table["label"].to_numpy(), table["died_reason"].to_numpy()
    assert set(np.nonzero(reasons == "absent")[0]) == set(replaced)
    assert set(np.nonzero(reasons == "norm_collapse")[0]) == set(collapsed)
    assert labels[39] == "inactive"
    assert (labels[rotated] == "changed").all() and (labels[recut] == "changed").all()
    assert table["unmatched"].to_numpy()[recut].all() and not table["unmatched"].to_numpy()[rotated].any()
    assert (labels[3:28] == "same").all()
    # born: B's fresh rows, absent from A's tokens, and B's row 39, which A's tokens never carried
    assert set(summary["born"]) == set(replaced) | {39}
    assert not summary["paired_tokens"]
    assert summary["counts"] == {
        "same": 25,
        "changed": 6,
        "died": 8,
        "inactive": 1,
        "died_absent": 5,
        "died_norm_collapse": 3,
        "unmatched": 2,
        "born": 6,
    }
    # the presence columns are the presence module's own verdicts, point and interval
    from sae_diff import presence

    on_b, _ = presence.both_ways(sae_a, sae_b, tokens_a, tokens_b)
    np.testing.assert_array_equal(table["presence_high"].to_numpy(), on_b["presence_high"].to_numpy())


def test_same_tokens_through_an_unchanged_model_have_no_deaths_or_births():
    """The identical control in miniature: two SAEs of one world (B's rows slightly perturbed and
    permuted) on the same tokens: paired, every feature present at ratio 1, nothing died or born."""
    q = np.linalg.qr(np.random.default_rng(1).standard_normal((32, 32)))[0][:20]
    perm = np.random.default_rng(2).permutation(20)
    noisy = q + 0.01 * np.random.default_rng(3).standard_normal(q.shape)
    sae_a, sae_b = one_hot_sae(q), one_hot_sae(noisy[perm] / np.linalg.norm(noisy[perm], axis=1, keepdims=True))
    tokens = tokens_along(q, cell=0)
    table, summary = diff.compare(sae_a, sae_b, tokens, tokens, THRESHOLDS, False, 0.1, 0.25)
    assert summary["paired_tokens"]
    np.testing.assert_allclose(table["presence"], 1.0)
    assert summary["counts"].get("died", 0) == 0
    assert summary["counts"]["born"] == 0 and (table["label"] == "same").all()


def test_lineages_follow_matches_and_catch_a_reversion():
    """Three cells: feature 0 rotates away (changed) then comes back (reverted); feature 1 stays;
    feature 2 dies at step 1; a new direction is born at step 2."""
    from sae_diff import evolution

    q = np.linalg.qr(np.random.default_rng(4).standard_normal((32, 32)))[0]
    base, orth, fresh, other = q[:4], q[4:5], q[5:6], q[6:7]
    away = 0.7 * base[:1] + np.sqrt(1 - 0.49) * orth
    c0 = base
    c1 = np.concatenate([away, base[1:2], other, base[3:4]])
    c2 = np.concatenate([base[:1], base[1:2], fresh, base[3:4]])
    decoders = [c0, c1, c2]
    saes = [one_hot_sae(m) for m in decoders]
    tokens = [tokens_along(m, cell=c) for c, m in enumerate(decoders)]
    stats = [_stats(4), _stats(4), _stats(4)]
    steps, born = [], []
    for t in range(2):
        table, summary = diff.compare(saes[t], saes[t + 1], tokens[t], tokens[t + 1], THRESHOLDS, False, 0.1, 0.25)
        steps.append(table)
        born.append(np.asarray(summary["born"]))
    cells = ["M0_D0", "M1_D1", "M2_D2"]
    table, counts = evolution.lineages(cells, steps, born, decoders, stats, THRESHOLDS)
    first = table[table["origin_feature"] == 0].iloc[0]
    assert first["label_M1_D1"] == "changed" and first["reverted_at"] == "M2_D2"
    assert first["cos_origin_M2_D2"] == pytest.approx(1.0)
    assert counts[0]["changed"] == 1 and counts[0]["died"] == 1 and counts[0]["born"] == 1
    assert counts[1]["reverted"] == 1 and counts[1]["born"] == 1 and counts[1]["died"] == 1
    assert table.loc[table["origin_feature"] == 1, "label_M2_D2"].item() == "same"


def test_calibration_record_against_a_plain_count():
    """Compared: the seed baseline's changed fraction and MMCS against a loop over the null's
    cosines in float64 (a NaN cosine, no partner, counts as not 'same'; MMCS skips it); with an
    ``alive`` mask (by feature id, the table in another order) the fraction over live features only."""
    import pandas as pd

    rng = np.random.default_rng(11)
    cos = np.clip(rng.normal(0.8, 0.15, 500), -1, 1)
    cos[rng.choice(500, 7, replace=False)] = np.nan
    null = pd.DataFrame({"feature": np.arange(500), "dec_cos_match": cos})
    thresholds = diff.calibrate(cos, 0.1, 0.01)
    record = diff.calibration_record(null, thresholds)
    changed = sum(1 for c in cos if not (c >= thresholds.same)) / len(cos)
    finite = [float(c) for c in cos if c == c]
    assert record["changed_fraction"] == pytest.approx(changed, abs=1e-12)
    assert record["n_features"] == 500
    assert record["mmcs"] == pytest.approx(sum(finite) / len(finite), abs=1e-12)
    assert record["thresholds"] == thresholds.to_dict()

    alive = rng.random(500) < 0.7
    shuffled = null.sample(frac=1.0, random_state=3)
    record = diff.calibration_record(shuffled, thresholds, alive)
    live = [c for f, c in enumerate(cos) if alive[f]]
    assert record["changed_fraction"] == pytest.approx(sum(1 for c in live if not (c >= thresholds.same)) / len(live))
    assert record["n_features"] == len(live)
    assert diff.calibration_record(null, thresholds, np.zeros(500, bool))["changed_fraction"] == 0.0


def test_evolution_reads_exactly_the_files_it_is_given(tmp_path):
    """Compared: evolution.run on files laid out as the workflow writes them (and handed over in
    shuffled order) against evolution.lineages called on the same objects in memory."""
    import json
    from pathlib import Path

    import pandas as pd

    from sae_diff import evolution, grid, nulls
    from sae_diff.sae import files

    rng = np.random.default_rng(5)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    decoders = [unit(rng.standard_normal((6, 16)))]
    for _ in range(2):
        nxt = decoders[-1].copy()
        nxt[0] = unit(nxt[:1] + 0.8 * rng.standard_normal((1, 16)))[0]  # one feature moves each step
        decoders.append(nxt)
    cells = ["M0_D0", "M1_D1", "M2_D2"]
    spec = {"saes": {"topk": {}}, "grid": {"branches": ["MXDX"]}, "data": {d: {} for d in ("D0", "D1", "D2")}}
    stats = [_stats(6) for _ in cells]
    saes_files, stats_files, diff_files = [], [], []
    for cell, rows, table in zip(cells, decoders, stats):
        files.save(sae_with_decoder(rows), tmp_path / grid.sae_dir(cell, 1, "topk"))
        saes_files.append(str(tmp_path / grid.sae_weights(cell, 1, "topk")))
        path = tmp_path / grid.feature_stats(cell, 1, "topk")
        path.parent.mkdir(parents=True)
        table.to_parquet(path)
        stats_files.append(str(path))
    steps, born = [], []
    for t in range(2):
        table, summary = diff.compare(
            sae_with_decoder(decoders[t]),
            sae_with_decoder(decoders[t + 1]),
            tokens_along(decoders[t], cell=t),
            tokens_along(decoders[t + 1], cell=t + 1),
            THRESHOLDS,
            False,
            0.1,
            0.25,
        )
        steps.append(table)
        born.append(np.asarray(summary["born"]))
        path = tmp_path / grid.diff_json(cells[t], cells[t + 1], 1, "topk")
        path.parent.mkdir(parents=True)
        table.to_parquet(path.with_suffix(".parquet"))
        path.write_text(json.dumps({"a": cells[t], "b": cells[t + 1], "layer": 1, "sae": "topk", **summary}))
        diff_files.append(str(path))
    calibration = tmp_path / grid.calibration_json(1, "topk")
    calibration.parent.mkdir(parents=True)
    calibration.write_text(json.dumps({"thresholds": THRESHOLDS.to_dict(), "changed_fraction": 0.05}))
    null_pairs = [{"same": 5 - j % 2, "changed": j % 2, "died": 0, "born": 1} for j in range(5)]
    null = tmp_path / grid.null_json(1, "topk")
    null.parent.mkdir(parents=True)
    null.write_text(json.dumps({"pairs": null_pairs, "cell_tokens": 100}))
    spec["diff"] = {"convergence": {"max_fvu_drop": 0.05, "max_init_cos": 0.5, "min_cross_init": 0.5}}

    out = evolution.run(spec, 1, diff_files[::-1], [str(calibration)], saes_files[::-1], stats_files[::-1], [str(null)])
    unit_decoders = [diff.unit_rows(sae_with_decoder(m).W_dec) for m in decoders]
    expected, counts = evolution.lineages(cells, steps, born, unit_decoders, stats, THRESHOLDS)
    got = out["topk"]["branches"]["MXDX"]
    assert got["steps"] == counts and got["cells"] == cells
    pd.testing.assert_frame_equal(got["lineages"], expected)
    assert out["topk"]["seed_baseline_changed_fraction"] == 0.05
    # each step's diff counts beside the null (nulls.versus on the very summaries written above)
    written = [json.loads(Path(p).read_text())["counts"] for p in diff_files]
    assert [{k: v for k, v in s.items() if k not in ("from", "to")} for s in got["steps_vs_null"]] == [
        nulls.versus(c, null_pairs) for c in written
    ]
    summed = {k: sum(c.get(k, 0) for c in written) for k in nulls.LABELS}
    assert got["totals_vs_null"] == nulls.versus(summed, null_pairs, 2)
    # no training log: no held-out curve, so no verdict that the SAEs converged
    assert out["topk"]["unconverged"] and not out["topk"]["convergence"]["cells"]["M0_D0"]["fvu_flat"]
    with pytest.raises(KeyError):  # a step whose diff was not handed over is not looked up on disk
        evolution.run(spec, 1, diff_files[:1], [str(calibration)], saes_files, stats_files, [str(null)])


def test_ranked_orders_every_flagged_feature_by_the_mass_it_moved():
    """Compared: diff.ranked against a plain loop that lists A's died and changed features with B's
    mass minus A's (through A's encoder) and B's born ones with B's minus A's (through B's), sorted
    by the absolute shift, largest first."""
    q = np.linalg.qr(np.random.default_rng(7).standard_normal((32, 32)))[0]
    a = q[:10]
    b = a.copy()
    b[0] = q[20]  # replaced: A's 0 dies, B's 0 is born
    b[1] = 0.7 * q[1] + np.sqrt(0.51) * q[21]  # rotated: changed
    tokens_a, tokens_b = tokens_along(a, cell=0), tokens_along(b, cell=1)
    table, summary = diff.compare(one_hot_sae(a), one_hot_sae(b), tokens_a, tokens_b, THRESHOLDS, False, 0.1, 0.5)
    got = diff.ranked(table, summary)
    expected = []
    for row in table.itertuples():
        if row.label in ("died", "changed"):
            expected.append(("a", row.feature, row.label, row.other_mass - row.own_mass))
    for j, feature in enumerate(summary["born"]):
        own, other = summary["born_presence"]["own_mass"][j], summary["born_presence"]["other_mass"][j]
        expected.append(("b", feature, "born", own - other))
    expected.sort(key=lambda r: -abs(r[3]))
    assert [(r.side, r.feature, r.label) for r in got.itertuples()] == [r[:3] for r in expected]
    np.testing.assert_allclose(got["shift"], [r[3] for r in expected])
    assert {("a", 0, "died"), ("b", 0, "born"), ("a", 1, "changed")} <= {tuple(r[:3]) for r in expected}
