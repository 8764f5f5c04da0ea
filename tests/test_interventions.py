"""Interventions: hooks checked against plain tensor algebra on a tiny random model, and the
experiment bookkeeping (feature choice, matched controls, effects, skip rules) against hand-built tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import conditions, editing, effects, experiments, interventions, models
from sae_diff.sae.model import SAE, SAEConfig

GREEDY = {
    "n_per_prompt": 1,
    "max_new_tokens": 10,
    "do_sample": False,
    "batch_size": 3,
    "seed": 0,
    "chat_template": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
}


def _sae(d_in: int, arch: str = "topk", d_sae: int = 48, seed: int = 0) -> SAE:
    sae = SAE(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=4))
    sae.initialize(torch.randn(256, d_in, generator=torch.Generator().manual_seed(seed)), seed=seed)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(d_sae, generator=torch.Generator().manual_seed(seed + 1)) * 0.5)
        if arch == "jumprelu":
            sae.log_threshold.fill_(-1.0)
    return sae.eval()


def _prompts(n=5):
    return pd.DataFrame({"prompt_id": np.arange(n), "prompt": [f"the cat {i} sat" for i in range(n)]})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = models.load(tiny_model_dir)
    return model.eval(), tokenizer


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_feature_acts_equal_dense_encode(arch):
    """feature_acts(S) == encode(x)[:, S] (dense float64 encode of the same SAE)."""
    sae = _sae(16, arch).double()
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    chosen = torch.tensor([0, 5, 17, 33, 47])
    with torch.no_grad():
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)  # inference: the learned global threshold
        expected = sae.encode(x)[:, chosen]
        got = editing.feature_acts(sae, x, chosen)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_noop_splice_reproduces_greedy_generation_token_for_token(tiny):
    from sae_diff import data

    model, tokenizer = tiny
    sae = _sae(model.config.hidden_size)
    plain = data.generate(model, tokenizer, _prompts(), GREEDY, keep_ids=True, progress=False)
    for positions in experiments.POSITIONS:
        with editing.intervene(model, sae, 1, "resid_post", editing.Edit("noop", positions=positions)):
            spliced = data.generate(model, tokenizer, _prompts(), GREEDY, keep_ids=True, progress=False)
        assert spliced["completion_ids"].tolist() == plain["completion_ids"].tolist()
    # and the check is not vacuous: a real edit changes them
    strong = editing.Edit("steer", (0,), (50.0,))
    with editing.intervene(model, sae, 1, "resid_post", strong):
        steered = data.generate(model, tokenizer, _prompts(), GREEDY, keep_ids=True, progress=False)
    assert steered["completion_ids"].tolist() != plain["completion_ids"].tolist()


def test_sampled_generation_keeps_the_noop_exact_and_draws_several_texts_per_prompt(tiny):
    """interventions.sampling with do_sample and n_per_prompt (the option for measuring a shift in
    probability rather than in one greedy text): the no-op splice reproduces the sampled texts
    token for token (every batch reseeds), and a prompt's samples differ from one another."""
    from sae_diff import data

    model, tokenizer = tiny
    sae = _sae(model.config.hidden_size)
    sampled = {**GREEDY, "do_sample": True, "n_per_prompt": 3, "top_k": 0, "temperature": 1.0}
    plain = data.generate(model, tokenizer, _prompts(3), sampled, keep_ids=True, progress=False)
    with editing.intervene(model, sae, 1, "resid_post", editing.Edit("noop", positions="all")):
        spliced = data.generate(model, tokenizer, _prompts(3), sampled, keep_ids=True, progress=False)
    assert len(plain) == 9 and spliced["completion_ids"].tolist() == plain["completion_ids"].tolist()
    per_prompt = plain.groupby("prompt_id")["completion_ids"].apply(lambda ids: len({tuple(i) for i in ids}))
    assert (per_prompt > 1).any()


def test_effects_average_a_prompts_samples_before_pairing():
    """Three sampled texts per prompt: the paired effect is the mean over prompts of (the prompt's
    mean under the edit − its mean under the no-op), compared with that sum written out; n_pairs
    counts prompts, not texts."""
    rng = np.random.default_rng(7)
    rows, truth = [], []
    for half, ids in (("select", range(12)), ("report", range(12, 24))):
        for i in ids:
            noop = rng.normal(0.4, 0.1, 3)
            edited = noop + rng.normal(0.15, 0.1, 3)
            if half == "report":
                truth.append(edited.mean() - noop.mean())
            for name, role, values in (
                ("plain", "baseline", noop),
                ("noop", "baseline", noop),
                ("features", "target", edited),
                ("random", "control", noop),
            ):
                for n, value in enumerate(values):
                    rows.append(
                        {"condition": name, "role": role, "alpha": np.nan, "half": half, "features": "1",
                         "prompt_id": i, "n": n, "m": value, "nll_base": 1.0, "repetition": 0.0}
                    )  # fmt: skip
    out = effects.effects(pd.DataFrame(rows), "m", 1.0, "ablation", ["m"], max_perplexity_ratio=2.0)
    assert out["report"]["n_pairs"] == 12 and out["report"]["effect"] == pytest.approx(np.mean(truth), abs=1e-12)


def _block_output(model, ids, layer=1):
    with models.capture(model, [(layer, "resid_post")], stop=False) as store, torch.no_grad():
        logits = model(input_ids=ids).logits
    return store[(layer, "resid_post")], logits


def test_ablation_removes_the_planted_feature_direction(tiny):
    """Plant feature j so it fires on the layer's activations; after ablation the hooked output
    equals x - f_j(x) d_j (dense float64 algebra) and its projection on d_j drops by f_j."""
    model, _ = tiny
    d = model.config.hidden_size
    ids = torch.randint(5, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    x, _ = _block_output(model, ids)
    sae = SAE(SAEConfig(architecture="relu", d_in=d, d_sae=8)).double().eval()
    j = 3
    direction = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc_T.zero_()
        sae.W_dec.copy_(torch.randn(8, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
        sae.W_dec[j] = direction / direction.norm()
        sae.W_enc_T[j] = direction / direction.norm()
        sae.b_dec.zero_()
        sae.b_enc.fill_(-0.0)
        sae.b_enc[j] = 10.0  # fires everywhere
    f_j = torch.relu(x.double() @ sae.W_enc_T[j] + 10.0)
    assert bool((f_j > 0).all())
    captured = {}
    with editing.intervene(model, sae, 1, "resid_post", editing.Edit("ablate", (j,))):
        with models.capture(model, [(1, "resid_post")], stop=True) as store:
            models.run_until_stopped(model, input_ids=ids)
        captured = store[(1, "resid_post")]
    expected = x.double() - f_j[..., None] * sae.W_dec[j]
    torch.testing.assert_close(captured.double(), expected, rtol=1e-5, atol=1e-5)
    unit = sae.W_dec[j]
    drop = (x.double() @ unit) - (captured.double() @ unit)
    torch.testing.assert_close(drop, f_j, rtol=1e-5, atol=1e-5)


def test_clamp_sets_the_feature_to_its_value(tiny):
    """After clamping feature j to v, re-encoding the edited activation gives f_j = v
    (a ReLU SAE with orthonormal encoder = decoder rows, so the algebra is exact)."""
    model, _ = tiny
    d = model.config.hidden_size
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    sae = SAE(SAEConfig(architecture="relu", d_in=d, d_sae=d)).double().eval()
    with torch.no_grad():
        sae.W_dec.copy_(q.t())
        sae.W_enc_T.copy_(q.t())
        sae.b_enc.fill_(5.0)  # every feature fires, so the ReLU is the identity here
        sae.b_dec.zero_()
    ids = torch.randint(5, 90, (2, 9), generator=torch.Generator().manual_seed(4))
    with editing.intervene(model, sae, 1, "resid_post", editing.Edit("clamp", (2, 7), (1.5, 9.0))):
        with models.capture(model, [(1, "resid_post")], stop=True) as store:
            models.run_until_stopped(model, input_ids=ids)
    f = sae.encode(store[(1, "resid_post")].double().reshape(-1, d))
    torch.testing.assert_close(f[:, 2], torch.full_like(f[:, 2], 1.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f[:, 7], torch.full_like(f[:, 7], 9.0), rtol=1e-5, atol=1e-5)


def test_steering_shifts_logits_along_the_decoder_direction(tiny):
    """Steering at the last block adds c*d_j before the final norm: the logit change equals the
    model's own unembedding of (norm(x + c d_j) - norm(x)), and it grows with c; the flipped
    sign moves the other way."""
    model, _ = tiny
    d = model.config.hidden_size
    last = models.n_blocks(model) - 1
    sae = _sae(d)
    j = 11
    ids = torch.randint(5, 90, (2, 10), generator=torch.Generator().manual_seed(7))
    x, clean = _block_output(model, ids, last)
    unembed = model.get_output_embeddings()
    norm = models.final_norm(model)
    unit_logits = unembed(sae.W_dec[j][None]).squeeze(0).detach()  # the direction's own logits
    previous = 0.0
    for c in (2.0, 8.0):
        with editing.intervene(model, sae, last, "resid_post", editing.Edit("steer", (j,), (c,))):
            steered = model(input_ids=ids).logits
        with torch.no_grad():
            expected = unembed(norm(x + c * sae.W_dec[j]))
        torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)
        shift = float(((steered - clean).mean((0, 1)) * unit_logits).sum())
        assert shift > previous
        previous = shift
    with editing.intervene(model, sae, last, "resid_post", editing.Edit("steer", (j,), (-8.0,))):
        flipped = model(input_ids=ids).logits
    assert float(((flipped - clean).mean((0, 1)) * unit_logits).sum()) < 0


def test_generated_only_leaves_the_prompt_alone(tiny):
    """positions=generated: the prefill's activations are untouched, each decoding step is edited."""
    from sae_diff import data

    model, tokenizer = tiny
    sae = _sae(model.config.hidden_size)
    settings = dict(GREEDY, max_new_tokens=3)

    def record(into):
        # registered after the editing hook, so it sees the block's output as edited
        return models.hook_module(model, 1, "resid_post").register_forward_hook(
            lambda _m, _i, out: into.append(editing._first(out).detach().clone())
        )

    plain, edited = [], []
    handle = record(plain)
    data.generate(model, tokenizer, _prompts(2), settings, progress=False)
    handle.remove()
    with editing.intervene(model, sae, 1, "resid_post", editing.Edit("steer", (0,), (30.0,), positions="generated")):
        handle = record(edited)
        data.generate(model, tokenizer, _prompts(2), settings, progress=False)
        handle.remove()
    assert len(plain) == len(edited) == 3  # prefill + 2 cached decoding steps
    assert torch.equal(edited[0], plain[0])  # the prompt is left alone
    assert edited[1].shape[1] == 1  # decoding steps see one new token (KV cache kept)
    # the unedited prefill gives the same first token, so step 1's input matches the plain run's
    # and its output is exactly the plain one plus the steering vector
    torch.testing.assert_close(edited[1], plain[1] + 30.0 * sae.W_dec[0].detach(), rtol=0, atol=1e-5)


def test_prompt_only_edits_the_prefill_alone(tiny):
    """positions=prompt: at the same forward, the hook point's output before and after the edit
    differ by exactly the steering vector in the prefill and not at all in the decoding steps."""
    from sae_diff import data

    model, tokenizer = tiny
    sae = _sae(model.config.hidden_size)
    site = models.hook_module(model, 1, "resid_post")
    before, after = [], []
    # forward hooks run in registration order: raw output, then the edit, then the edited output
    first = site.register_forward_hook(lambda _m, _i, out: before.append(editing._first(out).detach().clone()))
    try:
        with editing.intervene(model, sae, 1, "resid_post", editing.Edit("steer", (0,), (30.0,), positions="prompt")):
            last = site.register_forward_hook(lambda _m, _i, out: after.append(editing._first(out).detach().clone()))
            data.generate(model, tokenizer, _prompts(2), dict(GREEDY, max_new_tokens=3), progress=False)
            last.remove()
    finally:
        first.remove()
    assert len(before) == len(after) == 3 and before[0].shape[1] > 1 and before[1].shape[1] == 1
    steer = (30.0 * sae.W_dec[0].detach()).expand_as(before[0])
    torch.testing.assert_close(after[0] - before[0], steer, rtol=0, atol=1e-5)
    for raw, edited in zip(before[1:], after[1:]):
        assert torch.equal(raw, edited)


def test_select_features_follows_path_order_and_sign():
    probe = pd.DataFrame(
        {
            "feature": np.arange(8),
            "smd": [0.5, -2.0, 1.0, 0.1, -0.3, 2.0, np.nan, 0.7],
            "l1_entry": [3, 0, 1, np.nan, 2, np.nan, np.nan, 4],
        }
    )
    assert conditions.select_features(probe, [5, 1], 3, "promote", "up") == [5, 2, 0]
    assert conditions.select_features(probe, [5, 1], 2, "promote", "down") == [1, 4]
    assert conditions.select_features(probe, [], 3, "any", "up") == [1, 2, 4]
    with pytest.raises(ValueError, match="interventions.sign"):
        conditions.select_features(probe, [], 3, "both", "up")


def test_matched_random_features_are_near_in_firing_frequency():
    rng = np.random.default_rng(0)
    freq = np.exp(rng.uniform(np.log(1e-4), np.log(0.3), size=400))
    stats = pd.DataFrame({"feature": np.arange(400), "freq": freq, "dead": False})
    chosen = [3, 50, 100, 200]
    picks = conditions.matched_random(stats, chosen, seed=1, pool=10)
    assert len(set(picks)) == 4 and not set(picks) & set(chosen)
    for c, p in zip(chosen, picks):
        # within the 10 nearest of 396 log-uniform frequencies: a tight band around the target
        nearest = np.sort(np.abs(np.log(np.delete(freq, chosen)) - np.log(freq[c])))[9]
        assert abs(np.log(freq[p]) - np.log(freq[c])) <= nearest + 1e-12
    assert conditions.matched_random(stats, chosen, seed=1, pool=10) == picks  # deterministic


def test_repetition_rate_and_completion_nll(tiny):
    assert effects.repetition_rate("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert effects.repetition_rate("one two") == 0.0
    model, tokenizer = tiny
    prompt, completion = "hello there", tokenizer("abc def", add_special_tokens=False)["input_ids"]
    nll = effects.completion_nll(model, tokenizer, [prompt, prompt], [completion, []])
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] + completion
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    start = len(ids) - len(completion)
    reference = -np.mean([float(log_p[i - 1, ids[i]]) for i in range(start, len(ids))])
    assert nll[0] == pytest.approx(reference, rel=1e-5)
    assert np.isnan(nll[1])


def _scores(effect_by_alpha: dict, control: float, n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for half in ("select", "report"):

        def add(name, role, alpha, shift, nll=1.0):
            for i in range(n):
                rows.append(
                    {
                        "condition": name,
                        "role": role,
                        "alpha": alpha,
                        "half": half,
                        "prompt_id": i + (n if half == "report" else 0),
                        "features": "1",
                        "m": 0.3 + shift + rng.normal(0, 0.05),
                        "nll_base": nll,
                        "repetition": 0.0,
                    }
                )

        add("plain", "baseline", np.nan, 0.0)
        add("noop", "baseline", np.nan, 0.0)
        for alpha, shift in effect_by_alpha.items():
            add("features", "target", alpha, shift, nll=1.0 + (2.0 if alpha >= 8 else 0.0))
            add("random", "control", alpha, control)
    return pd.DataFrame(rows)


def test_effects_pick_the_largest_coherent_alpha_on_the_select_half():
    scores = _scores({1.0: 0.05, 4.0: 0.3, 8.0: 0.5}, control=0.0)
    out = effects.effects(scores, "m", 1.0, "steering", ["m"], max_perplexity_ratio=2.0)
    assert out["report"]["alpha"] == 4.0  # alpha 8 is stronger but its perplexity e^2 - 1 > 1
    assert out["report"]["effect"] == pytest.approx(0.3, abs=0.03)
    assert out["report"]["ci_low"] > 0.2 and out["report"]["p"] < 0.01
    assert abs(out["report"]["control_effect"]) < 0.05
    assert out["report"]["vs_control"]["p"] < 0.01
    assert out["report"]["perplexity_change"] == pytest.approx(0.0, abs=1e-9)
    ppl8 = [s for s in out["selection"] if s["alpha"] == 8.0][0]["perplexity_change"]
    assert ppl8 == pytest.approx(np.expm1(2.0))


def test_effects_report_a_single_feature_against_its_own_control_when_it_wins_on_the_select_half():
    """Ablation: the group breaks coherence, a single feature moves the metric the expected way:
    the single is reported, against its own matched random feature, not the group's control."""
    rng = np.random.default_rng(1)
    rows = []
    for half in ("select", "report"):

        def add(name, role, shift, nll=1.0, features="7"):
            for i in range(40):
                rows.append(
                    {
                        "condition": name,
                        "role": role,
                        "alpha": np.nan,
                        "half": half,
                        "prompt_id": i + (40 if half == "report" else 0),
                        "features": features,
                        "m": 0.8 + shift + rng.normal(0, 0.05),
                        "nll_base": nll,
                        "repetition": 0.0,
                    }
                )

        add("plain", "baseline", 0.0)
        add("noop", "baseline", 0.0)
        add("features", "target", -0.5, nll=3.0, features="7 9")  # perplexity e^2: incoherent
        add("random", "control", 0.0, features="3 4")
        add("feature_7", "single", -0.2)
        add("random_7", "control", 0.1, features="3")
    out = effects.effects(pd.DataFrame(rows), "m", -1.0, "ablation", ["m"], max_perplexity_ratio=2.0)
    report = out["report"]
    assert report["condition"] == "feature_7" and report["features"] == [7]
    assert report["effect"] == pytest.approx(-0.2, abs=0.03) and report["ci_high"] < 0
    assert report["control_effect"] == pytest.approx(0.1, abs=0.03)  # random_7, not "random"
    assert report["vs_control"]["diff"] == pytest.approx(-0.3, abs=0.04)
    assert {c["condition"] for c in out["selection"]} == {"features", "feature_7"}


def test_conditions_give_each_single_its_own_matched_control():
    conds = conditions.conditions("ablation", [7, 9], [3, 4], {7: 1.0, 9: 1.0, 3: 1.0, 4: 1.0}, [1.0], 2, "all")
    by_name = {c.name: c for c in conds}
    assert by_name["random_7"].features == [3] and by_name["random_9"].features == [4]
    assert by_name["random_7"].role == "control" and by_name["feature_9"].role == "single"
    swept = conditions.conditions("steering", [7], [3], {7: 2.0, 3: 0.5}, [1.0, 4.0], 1, "all")
    assert [(c.name, c.alpha) for c in swept if c.name == "random_7"] == [("random_7", 1.0), ("random_7", 4.0)]
    assert [c.edit.values for c in swept if c.name == "random_7"] == [(0.5,), (2.0,)]


def test_select_attributed_orders_by_attribution_and_sign():
    """By the mean attribution, and by t: a large mean over noisy forks loses to a surer one."""
    table = pd.DataFrame(
        {
            "feature": np.arange(6),
            "attribution": [0.0, 0.5, -0.9, 0.2, -0.1, 0.7],
            "t": [0.0, 4.0, -2.0, 3.0, -5.0, 1.0],
        }
    )
    assert conditions.select_attributed(table, 2, "promote", by="attribution") == [5, 1]
    assert conditions.select_attributed(table, 2, "suppress", by="attribution") == [2, 4]
    assert conditions.select_attributed(table, 3, "any", by="attribution") == [2, 5, 1]
    assert conditions.select_attributed(table, 9, "promote", by="attribution") == [5, 1, 3]  # zeros never chosen
    assert conditions.select_attributed(table, 2, "promote") == [1, 3]
    assert conditions.select_attributed(table, 2, "suppress") == [4, 2]
    with pytest.raises(ValueError, match="rank_by"):
        conditions.select_attributed(table, 2, "promote", by="mean")
    assert experiments.selection_method({"select": {"ablation": "attribution"}}, "ablation") == "attribution"
    assert experiments.selection_method({"select": {"ablation": "attribution"}}, "steering") == "probe"
    with pytest.raises(ValueError, match="expected probe or attribution"):
        experiments.selection_method({"select": {"ablation": "gradient"}}, "ablation")


def test_expected_sign():
    assert effects.expected_sign("up", "promote", "steering") == 1.0
    assert effects.expected_sign("up", "promote", "ablation") == -1.0
    assert effects.expected_sign("down", "promote", "steering") == -1.0
    assert effects.expected_sign("up", "suppress", "steering") == -1.0


def test_prefill_tracker_counts_forwards_per_generate_call(tiny):
    """The first forward of each generate call is the prefill, the others decoding steps, with and
    without padding (transformers 5.24 passes no attention mask when nothing is padded); a plain
    forward outside generate reads its whole input, like a prefill; the model is left unwrapped."""
    from sae_diff import data

    model, tokenizer = tiny
    tracker = editing.PrefillTracker()
    seen = []
    uneven = pd.DataFrame({"prompt_id": [0, 1], "prompt": ["the cat", "a much longer prompt about the cat that sat"]})
    with tracker.track(model):
        # registered after the tracker's own pre-hook, so it reads the verdict for this forward
        probe = model.register_forward_pre_hook(lambda _m, _a: seen.append(tracker.now))
        try:
            data.generate(model, tokenizer, _prompts(2), dict(GREEDY, max_new_tokens=3), progress=False)
            data.generate(model, tokenizer, uneven, dict(GREEDY, max_new_tokens=2), progress=False)
            with torch.no_grad():
                model(input_ids=torch.tensor([[1, 2, 3]]))
        finally:
            probe.remove()
    assert seen == [True, False, False, True, False, True]
    assert "generate" not in vars(model)


# --------------------------------------------------------------------------- skip_reason

SCORERS = [{"name": "command", "metrics": ["m"]}]  # scores metric "m" only
PROBE_OPTS = {"select": "probe"}
ATTRIBUTION_OPTS = {"select": {"ablation": "attribution"}}


def _probe(tmp_path, summary: dict, table: bool):
    """A probe's summary JSON, with (``table``) or without its table beside it."""
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(summary))
    if table:
        pd.DataFrame({"feature": [0], "smd": [1.0]}).to_parquet(path.with_suffix(".parquet"))
    return path


def _attribution(tmp_path, summary: dict):
    """A fork attribution table path whose summary JSON beside it is ``summary``."""
    path = tmp_path / "attribution.parquet"
    path.with_suffix(".json").write_text(json.dumps(summary))
    return path


def test_skip_reason_runs_a_probe_experiment_whose_probe_has_a_table(tmp_path):
    """Compared: the result with a scored metric and the probe's table present, against None."""
    probe = _probe(tmp_path, {"top_features": [0]}, table=True)
    assert interventions.skip_reason("steering", PROBE_OPTS, SCORERS, "m", probe) is None


def test_skip_reason_names_an_unscored_metric_before_anything_else(tmp_path):
    """Compared: the reason for a metric no scorer computes, against the grid's own wording of it,
    even though the probe was skipped too (the metric is checked first) and, for attribution, no
    table was given (an unscored metric is skipped, not a configuration error)."""
    from sae_diff.grid import unscored_metric_reason

    probe = _probe(tmp_path, {"skipped": "too few samples"}, table=False)
    expected = unscored_metric_reason(SCORERS, "other")
    assert expected is not None and "'other'" in expected
    assert interventions.skip_reason("steering", PROBE_OPTS, SCORERS, "other", probe) == expected
    assert interventions.skip_reason("ablation", ATTRIBUTION_OPTS, SCORERS, "other", probe, None) == expected


def test_skip_reason_names_a_skipped_probe(tmp_path):
    """Compared: the reason when the probe left no table, against the probe's own "skipped" text,
    or "no table" when its summary has none."""
    probe = _probe(tmp_path, {"skipped": "3 labelled samples, need 20"}, table=False)
    assert (
        interventions.skip_reason("steering", PROBE_OPTS, SCORERS, "m", probe)
        == f"the probe {probe} was skipped: 3 labelled samples, need 20"
    )
    bare = _probe(tmp_path, {}, table=False)
    assert (
        interventions.skip_reason("steering", PROBE_OPTS, SCORERS, "m", bare)
        == f"the probe {bare} was skipped: no table"
    )


def test_skip_reason_with_attribution_ignores_the_probe_and_names_a_skipped_attribution(tmp_path):
    """Compared: for attribution-picked features, None when the attribution ran (whatever the probe
    did), and the attribution's own "skipped" text when it did not."""
    probe = _probe(tmp_path, {"skipped": "too few samples"}, table=False)
    ran = _attribution(tmp_path, {"n_pairs": 12})
    assert interventions.skip_reason("ablation", ATTRIBUTION_OPTS, SCORERS, "m", probe, ran) is None
    skipped = _attribution(tmp_path, {"skipped": "no fork in 40 prompts"})
    assert (
        interventions.skip_reason("ablation", ATTRIBUTION_OPTS, SCORERS, "m", probe, skipped)
        == f"the attribution {skipped} was skipped: no fork in 40 prompts"
    )
    # steering in the same options still picks by probe, so the skipped probe decides
    assert interventions.skip_reason("steering", ATTRIBUTION_OPTS, SCORERS, "m", probe, ran).startswith("the probe")


def test_skip_reason_refuses_attribution_without_a_table(tmp_path):
    """Compared: the error raised when features are to be picked by attribution and no attribution
    table is given: a ConfigError naming the config key (the CLI prints it and exits 2)."""
    from sae_diff.errors import ConfigError

    probe = _probe(tmp_path, {"top_features": [0]}, table=True)
    with pytest.raises(ConfigError, match=r"interventions\.select\.ablation = attribution: no attribution table"):
        interventions.skip_reason("ablation", ATTRIBUTION_OPTS, SCORERS, "m", probe, None)


def test_experiment_prompts_apply_the_filters_in_order_then_the_cap(tmp_path):
    """Compared: the prompts kept against the rows picked by hand from the YAML's templates x
    fillers (two filters, in order, then max_prompts); fewer than two left is an error naming the file."""
    from sae_diff.errors import DataError
    from sae_diff.interventions import experiment_prompts

    path = tmp_path / "prompts.yaml"
    path.write_text(
        "languages:\n  en:\n    templates: ['A {job}.', 'The {job}.', 'One {job}.']\n"
        "    fillers: {job: [nurse, pilot, cook]}\n"
    )
    kept = experiment_prompts(path, [{"template": [0, 2]}, {"job": ["pilot", "cook"]}], max_prompts=3)
    assert kept["prompt"].tolist() == ["A pilot.", "A cook.", "One pilot."]
    assert experiment_prompts(path, [None, None])["prompt"].tolist()[:2] == ["A nurse.", "A pilot."]
    with pytest.raises(DataError, match="prompts.yaml.*need at least 2"):
        experiment_prompts(path, [{"template": [1]}, {"job": ["cook"]}])


def test_report_half_generates_only_the_chosen_condition_its_control_and_the_baselines():
    """Compared: the report stage's conditions against the names and alphas written out by hand."""
    from sae_diff.interventions import reported_conditions

    steer = conditions.conditions("steering", [7, 9], [3, 4], {7: 1.0, 9: 1.0, 3: 1.0, 4: 1.0}, [1.0, 4.0], 1, "all")
    names = lambda conds: [(c.name, c.alpha) for c in conds]  # noqa: E731
    group = reported_conditions(steer, "features", 4.0, "random")
    assert names(group) == [("plain", None), ("noop", None), ("features", 4.0), ("random", 4.0), ("flipped", 4.0)]
    single = reported_conditions(steer, "feature_7", 1.0, "random_7")
    assert names(single) == [("plain", None), ("noop", None), ("feature_7", 1.0), ("random_7", 1.0)]
    ablate = conditions.conditions("ablation", [7, 9], [3, 4], {7: 1.0, 9: 1.0, 3: 1.0, 4: 1.0}, [1.0], 2, "all")
    assert names(reported_conditions(ablate, "features", None, "random")) == [
        ("plain", None),
        ("noop", None),
        ("features", None),
        ("random", None),
    ]


def test_effects_pair_by_prompt_and_report_the_prompts_an_edit_leaves_undefined():
    """Constructed: the edit adds +0.2 to every prompt and leaves 4 of 20 report prompts without a
    value (NaN): the effect is the paired +0.2 over the 16 defined prompts, undefined_change 0.2."""
    rows = []
    rng = np.random.default_rng(5)
    base = rng.normal(0.5, 0.2, 40)
    for half, ids in (("select", range(20)), ("report", range(20, 40))):
        for name, role, shift in (
            ("plain", "baseline", 0),
            ("noop", "baseline", 0),
            ("features", "target", 0.2),
            ("random", "control", 0),
        ):
            for i in ids:
                value = base[i] + shift
                if name == "features" and half == "report" and i < 24:
                    value = np.nan
                rows.append(
                    {
                        "condition": name,
                        "role": role,
                        "alpha": np.nan,
                        "half": half,
                        "features": "1",
                        "prompt_id": i,
                        "m": value,
                        "nll_base": 1.0,
                        "repetition": 0.0,
                    }
                )
    out = effects.effects(pd.DataFrame(rows), "m", 1.0, "ablation", ["m"], max_perplexity_ratio=2.0)
    report = out["report"]
    assert report["effect"] == pytest.approx(0.2, abs=1e-9) and report["n_pairs"] == 16
    assert report["undefined_change"] == pytest.approx(0.2) and report["paired"]
    assert out["chosen"] == {"condition": "features", "alpha": None, "control": "random", "comparisons": {}}


def test_selection_prefers_a_sure_effect_to_a_large_mean_over_few_prompts():
    """Constructed select half: a single feature moves the metric +0.5 but leaves 16 of 20 prompts
    undefined (4 pairs, wide CI); the group moves it +0.3 on all 20 (tight CI). Compared: the pick
    by the CI bound (the group) against the pick by the mean alone (the single)."""
    rng = np.random.default_rng(7)
    base = rng.normal(0.5, 0.1, 40)
    rows = []
    for half, ids in (("select", range(20)), ("report", range(20, 40))):
        for name, role, shift, lost in (
            ("plain", "baseline", 0.0, 0),
            ("noop", "baseline", 0.0, 0),
            ("features", "target", 0.3, 0),
            ("random", "control", 0.0, 0),
            ("feature_7", "single", 0.5, 16),
            ("random_7", "control", 0.0, 0),
        ):
            for k, i in enumerate(ids):
                value = np.nan if k < lost else base[i] + shift + rng.normal(0, 0.2 if name == "feature_7" else 0.01)
                rows.append(
                    {
                        "condition": name,
                        "role": role,
                        "alpha": np.nan,
                        "half": half,
                        "features": "7",
                        "prompt_id": i,
                        "m": value,
                        "nll_base": 1.0,
                        "repetition": 0.0,
                    }
                )
    out = effects.effects(pd.DataFrame(rows), "m", 1.0, "ablation", ["m"], max_perplexity_ratio=2.0)
    by_name = {s["condition"]: s for s in out["selection"]}
    assert by_name["feature_7"]["effect"] > by_name["features"]["effect"]  # the mean alone would pick it
    assert by_name["feature_7"]["n_pairs"] == 4 and by_name["feature_7"]["undefined_change"] == pytest.approx(0.8)
    assert out["chosen"]["condition"] == "features"


def _dense_sae(d: int, d_sae: int = 24) -> SAE:
    return _sae(d, "relu", d_sae=d_sae, seed=11).double()


def test_direction_edits_equal_their_closed_forms():
    """Compared on fresh random float64 activations: add (x + v), project_out (x - (x.u)u) and
    ablate_matched (x + |sum_j f_j d_j| u, the features' ablation size from a dense encode) against
    the formulas; the edit log's mean |dx| against the mean of those sizes over moved positions."""
    d = 12
    sae = _dense_sae(d)
    x = torch.randn(3, 7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    v = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    u = v / v.norm()
    got = editing.editor(sae, editing.Edit("add", direction=tuple(v.tolist())), "cpu")(x)
    torch.testing.assert_close(got, x + v, rtol=0, atol=1e-12)
    got = editing.editor(sae, editing.Edit("project_out", direction=tuple(v.tolist())), "cpu")(x)
    torch.testing.assert_close(got, x - (x @ u)[..., None] * u, rtol=0, atol=1e-12)
    assert float((got @ u).abs().max()) < 1e-12
    level = editing.Edit("project_out", values=(2.5,), direction=tuple(v.tolist()))  # mean-ablation to 2.5
    got = editing.editor(sae, level, "cpu")(x)
    torch.testing.assert_close(got, x - ((x @ u) - 2.5)[..., None] * u, rtol=0, atol=1e-12)
    torch.testing.assert_close(got @ u, torch.full((3, 7), 2.5, dtype=torch.float64), rtol=0, atol=1e-12)
    chosen = [1, 4, 9]
    with torch.no_grad():
        size = (sae.encode(x.reshape(-1, d))[:, chosen] @ sae.W_dec[chosen]).norm(dim=-1).reshape(3, 7)
    matched = editing.Edit("ablate_matched", tuple(chosen), direction=tuple(u.tolist()))
    got = editing.editor(sae, matched, "cpu")(x)
    torch.testing.assert_close(got, x + size[..., None] * u, rtol=0, atol=1e-12)
    log = editing.EditLog()
    log.add(x, got)
    moved = size[size > 0]
    assert log.edited == int((size > 0).sum()) and log.positions == 21
    assert log.mean_norm == pytest.approx(float(moved.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="direction goes with"):
        editing.Edit("steer", (1,), (1.0,), direction=(1.0,))


def test_random_null_keeps_the_edit_size_and_changes_only_the_features():
    """Steering: each random direction moves x by |sum_j c_j d_j| of the chosen edit (computed by
    hand in float64); each feature draw has as many features, none chosen or excluded, each among
    the pool nearest in log frequency, steered by alpha times its own typical activation.
    Ablation: the directions ablate_matched the chosen features' own |dx|."""
    d, d_sae = 10, 30
    sae = _dense_sae(d, d_sae)
    w_dec = sae.W_dec.detach().numpy()
    rng = np.random.default_rng(0)
    freq = pd.Series(np.exp(rng.uniform(-8, -1, d_sae)))
    live = freq.index
    typical = {j: float(v) for j, v in enumerate(rng.uniform(1, 3, d_sae))}
    chosen = [2, 5]
    target = conditions.Condition(
        "features", "target", editing.Edit("steer", (2, 5), (2.0 * typical[2], 2.0 * typical[5])), 2.0, chosen
    )
    nulls = conditions.null_conditions("steering", target, w_dec, freq, live, typical, 10, 0, 4, [7], "all")
    size = np.linalg.norm(2.0 * typical[2] * w_dec[2].astype(np.float64) + 2.0 * typical[5] * w_dec[5])
    directions = [c for c in nulls if c.name.startswith("null_direction_")]
    drawn = [c for c in nulls if c.name.startswith("null_feature_")]
    assert len(directions) == 5 and len(drawn) == 5 and all(c.role == "null" for c in nulls)
    for c in directions:
        assert c.edit.kind == "add" and np.linalg.norm(c.edit.direction) == pytest.approx(size, rel=1e-12)
    distance = (np.log(freq) - np.log(freq[2])).abs().drop(index=[2, 5, 7]).sort_values(kind="stable")
    for c in drawn:
        assert len(c.features) == 2 and not set(c.features) & {2, 5, 7} and len(set(c.features)) == 2
        assert c.features[0] in set(distance.index[:4])
        assert c.edit.values == pytest.approx(tuple(2.0 * typical[j] for j in c.features))
    ablated = conditions.Condition("features", "target", editing.Edit("ablate", (2, 5)), None, chosen)
    nulls = conditions.null_conditions("ablation", ablated, w_dec, freq, live, typical, 4, 0, 4, [], "all")
    for c in nulls[2:]:
        assert c.edit.kind == "ablate_matched" and c.edit.features == (2, 5)
        assert np.linalg.norm(c.edit.direction) == pytest.approx(1.0, rel=1e-12)


def _null_rows(effects_by_draw):
    return [
        {"condition": f"null_{kind.removesuffix('s')}_{i:03d}", "vs_noop": {"m": {"diff": v}}, "delta_norm": 1.0}
        for i, (kind, v) in enumerate(effects_by_draw)
    ]


def test_random_null_rank_p_is_calibrated_and_finds_a_planted_edit():
    """Simulated report halves of 30 prompts: the no-op, 50 null edits and the target edit, the
    null edits moving each prompt only by noise. Compared: the rank p against (1 + #{null >=
    observed}) / (1 + n) counted by hand; over 400 placebo targets (no effect) the rejection rate
    at 0.05 stays within the binomial range of 5%; a planted +0.5 target is found (p = 1/51) in
    nearly every simulation, its effect estimated at +0.5."""
    rng = np.random.default_rng(0)
    null = [("features", 0.1), ("directions", -0.2), ("features", 0.3), ("directions", 0.0)]
    out = effects.random_null(_null_rows(null), "m", 1.0, 0.1)
    assert out["p"] == pytest.approx((1 + 2) / 5) and out["n_controls"] == 4
    assert out["features"]["p"] == pytest.approx((1 + 2) / 3) and out["directions"]["p"] == pytest.approx(1 / 3)
    assert effects.random_null(_null_rows(null), "m", -1.0, 0.1)["p"] == pytest.approx((1 + 3) / 5)

    def simulate(planted):
        noop = rng.normal(0.5, 0.2, 30)
        draws = [(k, float(np.mean(noop + rng.normal(0, 0.3, 30) - noop))) for k in ["features", "directions"] * 25]
        observed = float(np.mean(noop + planted + rng.normal(0, 0.3, 30) - noop))
        return observed, effects.random_null(_null_rows(draws), "m", 1.0, observed)["p"]

    placebo = [simulate(0.0)[1] for _ in range(400)]
    rate = np.mean(np.array(placebo) <= 0.05)
    assert rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)
    planted = [simulate(0.5) for _ in range(200)]
    assert np.mean([p <= 1 / 51 + 1e-12 for _, p in planted]) >= 0.95
    assert np.mean([e for e, _ in planted]) == pytest.approx(0.5, abs=0.03)


def test_family_wide_benjamini_hochberg_over_every_reported_test():
    """q over the family (every experiment x cell x layer x SAE x metric with a reported p)
    against BH computed by hand: q_(i) = min_{j >= i} p_(j) m / j."""
    ps = [0.01, 0.04, 0.03, 0.2]
    blocks = [
        {"experiment": e, "cell": c, "layer": 12, "sae": "topk", "metric": "m", "report": {"p": p, "null": {"p": p}}}
        for (e, c), p in zip([("steering", "A"), ("ablation", "A"), ("steering", "B"), ("ablation", "B")], ps)
    ]
    blocks.append({"experiment": "steering", "cell": "C", "layer": 12, "sae": "topk", "metric": "m", "report": None})
    order = np.argsort(ps)
    ranked = np.array(ps)[order] * 4 / np.arange(1, 5)
    expected = np.empty(4)
    expected[order] = np.minimum.accumulate(ranked[::-1])[::-1]
    out = effects.family(blocks)
    assert len(out) == 4 and all(v["family_size"] == 4 for v in out.values())
    got = [out[(b["experiment"], b["cell"], 12, "topk", "m")]["q"] for b in blocks[:4]]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_comparison_methods_move_as_far_as_the_sae_group():
    """Difference-in-means steering at each alpha is moved by |sum_j alpha s_j d_j| of the SAE
    group (float64 by hand); ablation projects it out; the prompting baseline is steering's only."""
    d = 8
    sae = _dense_sae(d, 16)
    w_dec = sae.W_dec.detach().numpy()
    typical = {j: 1.0 + j for j in range(16)}
    diffmean = np.arange(1.0, d + 1)
    out = conditions.comparison_conditions(
        "steering", [1, 3], w_dec, {"diffmean": diffmean}, "Be long.", [1, 4], typical, "all"
    )
    assert [c.name for c in out] == ["diffmean", "diffmean", "prompting"] and out[2].instruction == "Be long."
    for c, alpha in zip(out[:2], [1, 4]):
        size = np.linalg.norm(alpha * (2.0 * w_dec[1].astype(np.float64) + 4.0 * w_dec[3]))
        assert c.alpha == alpha and np.linalg.norm(c.edit.direction) == pytest.approx(size, rel=1e-12)
        np.testing.assert_allclose(np.asarray(c.edit.direction) / size, diffmean / np.linalg.norm(diffmean), atol=1e-12)
    out = conditions.comparison_conditions(
        "ablation", [1], w_dec, {"diffmean": diffmean}, "Be long.", [None], typical, "all", {"diffmean": 0.7}
    )
    assert [(c.name, c.edit.kind, c.edit.values) for c in out] == [("diffmean", "project_out", (0.7,))]
    assert (
        conditions.comparison_conditions("steering", [1], w_dec, {"diffmean": np.zeros(d)}, None, [1], typical, "all")
        == []
    )
    # the lens's direction is one more comparison, sized and placed the same way
    adl = np.linspace(-1.0, 2.0, d)
    out = conditions.comparison_conditions(
        "steering", [1, 3], w_dec, {"adl": adl, "diffmean": diffmean}, None, [4], typical, "all"
    )
    assert [c.name for c in out] == ["diffmean", "adl"]
    assert np.linalg.norm(out[1].edit.direction) == pytest.approx(np.linalg.norm(out[0].edit.direction), rel=1e-12)
    np.testing.assert_allclose(np.asarray(out[1].edit.direction) / np.linalg.norm(out[1].edit.direction),
                               adl / np.linalg.norm(adl), atol=1e-12)  # fmt: skip
    out = conditions.comparison_conditions(
        "ablation", [1], w_dec, {"adl": adl}, None, [None], typical, "all", {"adl": -0.3, "diffmean": 0.7}
    )
    assert [(c.name, c.edit.kind, c.edit.values) for c in out] == [("adl", "project_out", (-0.3,))]
    # and the crosscoder's Mi-only direction one more, after the lens
    cross = np.cos(np.arange(d, dtype=np.float64))
    out = conditions.comparison_conditions(
        "steering", [1, 3], w_dec, {"crosscoder": cross, "adl": adl, "diffmean": None}, None, [2], typical, "all"
    )
    assert [c.name for c in out] == ["adl", "crosscoder"]
    size = np.linalg.norm(2 * (2.0 * w_dec[1].astype(np.float64) + 4.0 * w_dec[3]))
    np.testing.assert_allclose(np.asarray(out[1].edit.direction), size * cross / np.linalg.norm(cross), atol=1e-12)
    out = conditions.comparison_conditions(
        "ablation", [1], w_dec, {"crosscoder": cross}, None, [None], typical, "all", {"crosscoder": 0.4}
    )
    assert [(c.name, c.edit.kind, c.edit.values) for c in out] == [("crosscoder", "project_out", (0.4,))]
    # and the diff-SAE's latents behind the metric, last; a zero direction (nothing called) is left out
    behind = np.sin(np.arange(d, dtype=np.float64) + 0.5)
    out = conditions.comparison_conditions(
        "steering", [1, 3], w_dec, {"diff_sae": behind, "crosscoder": 0 * cross}, None, [2], typical, "all"
    )
    assert [c.name for c in out] == ["diff_sae"]
    np.testing.assert_allclose(np.asarray(out[0].edit.direction), size * behind / np.linalg.norm(behind), atol=1e-12)
    out = conditions.comparison_conditions(
        "ablation", [1], w_dec, {"diff_sae": behind}, None, [None], typical, "all", {"diff_sae": -1.5}
    )
    assert [(c.name, c.edit.kind, c.edit.values) for c in out] == [("diff_sae", "project_out", (-1.5,))]
    # the methods come in DIRECTION_COMPARISONS order whatever the dict's order; an unknown name is refused
    with pytest.raises(ValueError, match="'lens'"):
        conditions.comparison_conditions("steering", [1], w_dec, {"lens": adl}, None, [1], typical, "all")


def test_mean_projection_and_firing_at_edits_against_a_direct_forward(tiny):
    """Compared on the tiny model: the mean of x.u over the prompts' tokens (position 0 left out)
    and each feature's firing rate over prompt + completion tokens, against one hand-run forward
    per sequence with the block's output read by a hook (float64)."""
    model, tokenizer = tiny
    d = model.config.hidden_size
    prompts = _prompts(3)
    direction = np.random.default_rng(2).normal(size=d)
    sampling = {"chat_template": False}
    got = interventions.mean_projection(model, tokenizer, 1, "resid_post", prompts, sampling, direction)
    unit = direction / np.linalg.norm(direction)
    rows, seen = [], {}
    handle = models.hook_module(model, 1, "resid_post").register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("x", (out[0] if isinstance(out, tuple) else out).detach())
    )
    try:
        for text in prompts["prompt"]:
            with torch.no_grad():
                model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
            rows.append(seen["x"][0, 1:].double().numpy())
    finally:
        handle.remove()
    assert got == pytest.approx(float((np.concatenate(rows) @ unit).mean()), rel=1e-6)
    sae = _sae(d, "relu", d_sae=16, seed=3)
    generations = prompts.assign(prompt_text=prompts["prompt"], completion_ids=[[5, 6], [7], []])
    freq = interventions.firing_at_edits(model, sae, 1, "resid_post", generations, tokenizer)
    expected, n = np.zeros(16), 0
    handle = models.hook_module(model, 1, "resid_post").register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("x", (out[0] if isinstance(out, tuple) else out).detach())
    )
    try:
        for text, extra in zip(generations["prompt_text"], generations["completion_ids"]):
            with torch.no_grad():
                model(input_ids=torch.tensor([tokenizer(text)["input_ids"] + extra]))
                acts = sae.double().encode(seen["x"][0, 1:].double())
            expected += (acts > 0).sum(0).numpy()
            n += acts.shape[0]
    finally:
        handle.remove()
    np.testing.assert_allclose(freq.to_numpy(), expected / n, atol=1e-12)
