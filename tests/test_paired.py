"""Same-token readers: rows of several models' stores line up token by token, or stop with the row."""

from __future__ import annotations

import pytest
import torch

from sae_diff.activations import ActivationStore, write_store
from sae_diff.errors import ActivationStoreError
from sae_diff.paired import DifferenceStore, PairedStore


def _meta(n):
    return {"token_ids": torch.arange(n) % 17, "sample_idx": torch.arange(n) // 10, "position": torch.arange(n) % 10}


def _stores(tmp_path, n_models=3, n=250, d=6, meta=None):
    gen = torch.Generator().manual_seed(0)
    acts = [torch.randn(n, d, generator=gen) for _ in range(n_models)]
    meta = meta or _meta(n)
    stores = [
        ActivationStore(write_store(tmp_path / f"m{i}", a, shard_tokens=64, meta=meta)) for i, a in enumerate(acts)
    ]
    return acts, stores


def test_paired_rows_are_each_models_activation_of_the_same_token(tmp_path):
    acts, stores = _stores(tmp_path)
    paired = PairedStore(stores)
    # unshuffled: row i of model m is exactly row i of store m
    rows = torch.cat(list(paired.iter_batches(100)))
    assert torch.equal(rows, torch.stack(acts, 1))
    # shuffled: the rows are a permutation of the same (model-stacked) rows, never mixing tokens across models
    shuffled = torch.cat(list(paired.iter_batches(50, shuffle_buffer=128, seed=3)))
    key = lambda t: sorted(map(tuple, t.reshape(len(t), -1).tolist()))  # noqa: E731
    assert key(shuffled) == key(rows) and not torch.equal(shuffled, rows)
    assert torch.equal(torch.cat(list(paired.iter_batches(50, shuffle_buffer=128, seed=3))), shuffled)


def test_difference_store_reads_tuned_minus_base(tmp_path):
    acts, stores = _stores(tmp_path, n_models=2)
    diff = DifferenceStore(stores[0], stores[1])
    got = torch.cat(list(diff.iter_batches(70)))
    torch.testing.assert_close(got, (acts[1].double() - acts[0].double()).float(), rtol=0, atol=0)
    assert diff.d_model == 6 and diff.n_tokens() == 250


def test_different_tokens_stop_with_the_row(tmp_path):
    _, stores = _stores(tmp_path, n_models=1)
    meta = _meta(250)
    meta["token_ids"][70] = 99
    other = ActivationStore(write_store(tmp_path / "other", torch.randn(250, 6), shard_tokens=64, meta=meta))
    with pytest.raises(ActivationStoreError, match=r"train-00001.safetensors: token_ids differs .* at row 6 \(99 vs"):
        list(PairedStore([stores[0], other]).iter_batches(64))


def test_different_lengths_are_an_error_before_any_shard_is_read(tmp_path):
    _, stores = _stores(tmp_path, n_models=1)
    short = ActivationStore(write_store(tmp_path / "short", torch.randn(200, 6), shard_tokens=64))
    with pytest.raises(ActivationStoreError, match="train split's shards differ"):
        PairedStore([stores[0], short])
    wide = ActivationStore(write_store(tmp_path / "wide", torch.randn(250, 8), shard_tokens=64))
    with pytest.raises(ActivationStoreError, match="'d_model' differs"):
        DifferenceStore(stores[0], wide)
