"""Scaling out on one machine: streamed activations (cache: false), device-map loading,
placement resolution and bf16 autocast (exercised on the CPU; CUDA takes the same code path)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import activations, features, models
from sae_diff.activations import ActivationStore, ActivationStoreError, open_stores
from sae_diff.config import ConfigError
from sae_diff.sae import kernels
from sae_diff.sae.model import SAEConfig
from sae_diff.sae.train import TrainSpec, train

OPTS = {
    "dtype": "float32",
    "batch_size": 3,
    "max_length": 40,
    "shard_tokens": 60,
    "exclude_special_tokens": True,
    "exclude_first_position": True,
}
TEXTS = [
    "she is a nurse",
    "he flies planes",
    "a judge rules",
    "bread at dawn",
    "a quiet miner",
    "the dancer spins",
    "soup for two",
    "a long day at the mill",
    "x",
    "plans and wires",
    "a tall ship at sea",
    "the baker's hands",
    "three quick notes",
    "rain on the roof",
]


@pytest.fixture
def samples(write_samples):
    return write_samples(TEXTS)


def _extract(model_dir, samples, out, cache, dtype="float32", place="cpu"):
    spec = {
        "model": "M0",
        "data": "D0",
        "layers": [0, 1],
        "hook_points": ["resid_post", "mlp_out"],
        "activations": dict(OPTS, dtype=dtype, cache=cache),
    }
    return activations.extract(spec, model_dir, samples, out, place=place, progress=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_shards_equal_cached_shards(tiny_model_dir, samples, tmp_path, dtype):
    """cache: false writes the eval split only; every train shard computed on read equals the
    cached extraction's file tensor for tensor (values in the storage dtype, ids, positions)."""
    _extract(tiny_model_dir, samples, tmp_path / "cached", cache=True, dtype=dtype)
    _extract(tiny_model_dir, samples, tmp_path / "streamed", cache=False, dtype=dtype)
    for site in ("layer0", "layer1", "layer1/mlp_out"):
        cached = ActivationStore(tmp_path / "cached" / site)
        folder = tmp_path / "streamed" / site
        on_disk = sorted(p.name for p in folder.glob("*.safetensors"))
        assert on_disk and all(name.startswith("eval-") for name in on_disk)
        assert not ActivationStore(folder).cached and cached.cached
        assert ActivationStore(folder).manifest["n_tokens"] == cached.manifest["n_tokens"]
        (streamed,) = open_stores([folder], tiny_model_dir, samples)
        for split in ("train", "eval"):
            a, b = list(cached.iter_shards(split)), list(streamed.iter_shards(split))
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                assert x.keys() == y.keys()
                for key in x:
                    assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (site, split, key)


def test_uncached_store_without_the_model_is_a_clear_error(tiny_model_dir, samples, tmp_path):
    _extract(tiny_model_dir, samples, tmp_path / "s", cache=False)
    store = ActivationStore(tmp_path / "s" / "layer0")
    with pytest.raises(ActivationStoreError, match="activations.cache: false"):
        list(store.iter_shards("train"))
    with pytest.raises(ActivationStoreError, match="needs the model and the samples"):
        open_stores([tmp_path / "s" / "layer0"])
    # a samples table that no longer matches the extraction's plan is refused, not silently used
    table = pd.read_parquet(samples)
    table.loc[table["split"] == "train", "text"] = "changed"
    other = tmp_path / "other.parquet"
    table.to_parquet(other)
    (changed,) = open_stores([tmp_path / "s" / "layer0"], tiny_model_dir, other)
    with pytest.raises(ActivationStoreError, match="no longer tokenizes"):
        list(changed.iter_shards("train"))


def _spec(name):
    return TrainSpec(
        name=name,
        sae=SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4),
        lr=1e-3,
        warmup_steps=2,
        init_sample=64,
        dead_tokens=500,
    )


def test_sae_trained_from_the_model_equals_one_trained_from_the_cache(tiny_model_dir, samples, tmp_path):
    """Same data in the same order: the streamed and the cached run end with identical weights,
    the paired (transcoder-style) reader included."""
    _extract(tiny_model_dir, samples, tmp_path / "cached", cache=True)
    _extract(tiny_model_dir, samples, tmp_path / "streamed", cache=False)
    weights = {}
    for kind in ("cached", "streamed"):
        folders = [tmp_path / kind / "layer1", tmp_path / kind / "layer1" / "mlp_out"]
        store, target = open_stores(folders, tiny_model_dir, samples)
        out = tmp_path / f"sae_{kind}"
        train(
            store,
            [_spec("topk")],
            [out],
            n_tokens=10_000,
            batch_size=16,
            shuffle_buffer=64,
            seed=3,
            checkpoint_every=0,
            progress=False,
            epochs=2,
        )
        weights[kind] = _tensors(out)
        assert store.n_tokens("train") > 16
    assert weights["cached"].keys() == weights["streamed"].keys()
    for key in weights["cached"]:
        assert torch.equal(weights["cached"][key], weights["streamed"][key]), key


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


def test_feature_pass_from_the_model_equals_the_cached_one(tiny_model_dir, samples, tmp_path):
    """Feature statistics and per-sample pooling read the train split too: streamed = cached."""
    _extract(tiny_model_dir, samples, tmp_path / "cached", cache=True)
    _extract(tiny_model_dir, samples, tmp_path / "streamed", cache=False)
    (store,) = open_stores([tmp_path / "cached" / "layer1"])
    train(
        store,
        [_spec("topk")],
        [tmp_path / "sae"],
        n_tokens=2000,
        batch_size=16,
        shuffle_buffer=0,
        checkpoint_every=0,
        progress=False,
    )
    from sae_diff.sae import files

    sae = files.load(tmp_path / "sae")
    ids = pd.read_parquet(samples)["sample_id"].to_numpy()
    a = features.run(sae, store, ids, progress=False)
    (streamed,) = open_stores([tmp_path / "streamed" / "layer1"], tiny_model_dir, samples)
    b = features.run(sae, streamed, ids, progress=False)
    pd.testing.assert_frame_equal(a.stats, b.stats)
    for key in a.pooled:
        assert torch.equal(a.pooled[key], b.pooled[key]), key
    raw_a = features.pool_raw(store, ids)
    raw_b = features.pool_raw(streamed, ids)
    np.testing.assert_array_equal(raw_a, raw_b)


def test_placement_resolution():
    cpu = models.placement({"device": "cpu"})
    assert cpu == models.Placement("cpu", None, "off")  # auto autocast: off on the CPU
    assert models.placement({"device": "cpu", "autocast": "bf16"}).autocast == "bf16"
    assert models.as_placement("cpu") == cpu
    with pytest.raises(ConfigError, match="autocast"):
        models.placement({"device": "cpu", "autocast": "fp8"})
    with models.placement({"device": "cpu", "autocast": "bf16"}).precision():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with cpu.precision():
        assert not torch.is_autocast_enabled("cpu")


def test_device_map_loading_gives_the_same_model(tiny_model_dir, caplog):
    """device_map loads through accelerate (weights placed as read; on a machine without CUDA
    everything lands on the CPU); same logits as a plain load."""
    plain, tok = models.load(tiny_model_dir)
    with caplog.at_level("INFO", logger="sae_diff.models"):
        mapped, _ = models.load(tiny_model_dir, device_map="auto")
    assert "placed with device_map=auto: ['cpu']" in caplog.text
    ids = tok(["she is a nurse"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, mapped(ids).logits)
    assert models.site_device(mapped, 1, "resid_post") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device_map"):
        models.load(tiny_model_dir, device_map="everywhere")


def test_bf16_extraction_is_close_to_float32_and_not_equal(tiny_model_dir, samples, tmp_path):
    """autocast: bf16 really runs the forward in bfloat16 (values differ) and stays close
    (relative error of the stored rows well under bf16's 2^-8 per op times depth)."""
    _extract(tiny_model_dir, samples, tmp_path / "fp32", cache=True)
    _extract(tiny_model_dir, samples, tmp_path / "bf16", cache=True, place=models.Placement("cpu", None, "bf16"))
    a = ActivationStore(tmp_path / "fp32" / "layer1").all("train")
    b = ActivationStore(tmp_path / "bf16" / "layer1").all("train")
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.05


def test_topk_encode_under_autocast_matches_a_bf16_reference():
    """Under bf16 autocast the pre-activations are bf16 matmuls: values match a float64 reference
    computed from bf16-rounded inputs (to bf16 output rounding), gradients stay float32 and equal
    the float64 gradient of the same selected entries."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    W = torch.randn(128, 32, generator=gen, requires_grad=True)
    b = torch.randn(128, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vals, idx = kernels.topk_encode(x, W, b, 8)
    assert vals.dtype == torch.float32
    r = lambda t: t.detach().to(torch.bfloat16).double()  # noqa: E731
    pre = r(x) @ r(W).T + r(b)
    ref = pre.gather(-1, idx).clamp_min(0)
    assert torch.allclose(vals.double(), ref, rtol=1e-2, atol=1e-2)
    # the chosen entries are (up to bf16 ties) the reference's top 8
    top = pre.topk(8, dim=-1).values[:, -1:]
    assert bool((pre.gather(-1, idx) >= top - 0.05 * top.abs() - 0.05).all())
    weights = torch.randn(vals.shape, generator=gen)
    (vals * weights).sum().backward()
    assert W.grad.dtype == torch.float32
    expected = torch.zeros(128, 32, dtype=torch.float64)
    g = weights.double() * (vals > 0)
    for row in range(64):
        expected.index_add_(0, idx[row], g[row][:, None] * x[row].double()[None])
    assert torch.allclose(W.grad.double(), expected, atol=1e-5)


def test_sae_training_under_bf16_autocast_learns_like_float32(tmp_path):
    """bf16 autocast in training: parameters stay float32 and the final loss is close to float32's."""
    from sae_diff.activations import write_store

    gen = torch.Generator().manual_seed(1)
    atoms = torch.nn.functional.normalize(torch.randn(48, 16, generator=gen), dim=1)
    idx = torch.stack([torch.randperm(48, generator=gen)[:3] for _ in range(6000)])
    acts = (torch.rand(6000, 3, 1, generator=gen) * 2 + 0.5).mul(atoms[idx]).sum(1)
    store = ActivationStore(write_store(tmp_path / "acts", acts, shard_tokens=1000))
    final = {}
    for mode in ("off", "bf16"):
        out = tmp_path / mode
        spec = TrainSpec(
            name=mode,
            sae=SAEConfig(architecture="topk", d_in=16, d_sae=48, k=3),
            lr=1e-2,
            warmup_steps=5,
            init_sample=512,
            dead_tokens=2000,
        )
        train(
            store,
            [spec],
            [out],
            n_tokens=6000,
            batch_size=64,
            shuffle_buffer=2000,
            seed=0,
            checkpoint_every=0,
            progress=False,
            epochs=3,
            place=models.Placement("cpu", None, mode),
        )
        weights = _tensors(out)
        assert all(t.dtype == torch.float32 for t in weights.values())
        logs = pd.read_json(out / "train_log.jsonl", lines=True)
        final[mode] = (float(logs["fvu"].head(3).mean()), float(logs["fvu"].tail(5).mean()))
    for first, last in final.values():  # both learn: FVU well below where they started
        assert last < 0.5 * first
    assert abs(final["bf16"][1] - final["off"][1]) < 0.03
