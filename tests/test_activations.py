"""Activation extraction and store: values vs a plain forward, masking, resume after kill -9, reader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import activations, models
from sae_diff.activations import ActivationStore, ActivationStoreError

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
]


@pytest.fixture
def samples(write_samples):
    return write_samples(TEXTS)


def _spec(layers=(0, 2), **opts):
    return {
        "model": "M0",
        "data": "D0",
        "layers": list(layers),
        "hook_points": ["resid_post", "mlp_out"],
        "activations": dict(OPTS, **opts),
    }


def test_extraction_equals_plain_forward_on_kept_tokens(tiny_model_dir, samples, tmp_path):
    """Every stored row equals hidden_states[L + 1] of an unpadded single-sample forward (float32).

    (Only blocks before the last: HF applies the final norm to the last entry of hidden_states.)
    """
    out = tmp_path / "M0_D0"
    activations.extract(_spec(layers=[0, 1]), tiny_model_dir, samples, out, progress=False)
    model, tok = models.load(tiny_model_dir)
    table = pd.read_parquet(samples)
    special = set(tok.all_special_ids)
    for layer in (0, 1):
        store = ActivationStore(out / f"layer{layer}")
        for split in ("train", "eval"):
            rows = list(store.iter_shards(split))
            acts = torch.cat([r["acts"] for r in rows])
            sample_idx = torch.cat([r["sample_idx"] for r in rows])
            position = torch.cat([r["position"] for r in rows])
            token_ids = torch.cat([r["token_ids"] for r in rows])
            in_prompt = torch.cat([r["in_prompt"] for r in rows])
            assert store.n_tokens(split) == len(acts) > 0
            for sid in sample_idx.unique().tolist():
                row = table.iloc[sid]
                assert row["split"] == split
                prompt_ids = tok(row["prompt_text"])["input_ids"] if row["prompt_text"] else []
                ids = (prompt_ids + tok(row["text"], add_special_tokens=not prompt_ids)["input_ids"])[:40]
                with torch.no_grad():
                    hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]
                keep = [p for p, t in enumerate(ids) if p > 0 and t not in special]
                mine = sample_idx == sid
                assert position[mine].tolist() == keep  # position 0 and special tokens excluded
                assert token_ids[mine].tolist() == [ids[p] for p in keep]
                assert in_prompt[mine].tolist() == [p < len(prompt_ids) for p in keep]
                torch.testing.assert_close(acts[mine], hidden[keep], rtol=1e-5, atol=1e-5)


def test_manifest_describes_the_store(tiny_model_dir, samples, tmp_path):
    out = tmp_path / "cell"
    paths = activations.extract(_spec(dtype="float16"), tiny_model_dir, samples, out, progress=False)
    assert set(paths) == {(0, "resid_post"), (0, "mlp_out"), (2, "resid_post"), (2, "mlp_out")}
    assert paths[(2, "mlp_out")] == out / "layer2" / "mlp_out" / "manifest.json"
    manifest = json.loads(paths[(2, "resid_post")].read_text())
    assert manifest["hook_name"] == "blocks.2.hook_resid_post" and manifest["d_model"] == 32
    assert manifest["dtype"] == "float16" and manifest["masking"]["exclude_first_position"] is True
    assert len(manifest["shards"]) > 2  # small shard_tokens: several shards per split
    assert sum(s["n_tokens"] for s in manifest["shards"]) == sum(manifest["n_tokens"].values())
    store = ActivationStore(out / "layer2")
    assert store.load_shard(store.shards()[0])["acts"].dtype == torch.float16


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sae_diff", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_kill_minus_nine_then_resume_gives_identical_bytes(tiny_model_dir, samples, tmp_path):
    spec = json.dumps(_spec(dtype="float16"))
    base = [
        "extract",
        "--spec",
        spec,
        "--model",
        "M0",
        "--data",
        "D0",
        "--model-dir",
        str(tiny_model_dir),
        "--samples",
        str(samples),
        "--no-progress",
        "--threads",
        "1",
    ]
    clean = tmp_path / "clean" / "M0_D0"  # same cell name: the manifest records it
    assert _cli(*base, "--out-dir", str(clean)).returncode == 0

    resumed = tmp_path / "resumed" / "M0_D0"
    killed = _cli(*base, "--out-dir", str(resumed), env={"SAE_DIFF_KILL_AFTER_SHARD": "train-00001.safetensors"})
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    done = sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors"))
    assert done and not list(resumed.rglob("manifest.json"))
    mtimes = {p: (resumed / p).stat().st_mtime_ns for p in done}

    again = _cli(*base, "--out-dir", str(resumed))
    assert again.returncode == 0, again.stderr
    assert "2 already done" in again.stderr
    assert all((resumed / p).stat().st_mtime_ns == t for p, t in mtimes.items())  # finished shards kept
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file())
    for rel in files:
        assert (clean / rel).read_bytes() == (resumed / rel).read_bytes(), rel


def test_changed_inputs_discard_old_shards(tiny_model_dir, samples, tmp_path):
    out = tmp_path / "cell"
    activations.extract(_spec(), tiny_model_dir, samples, out, progress=False)
    first = ActivationStore(out / "layer0").all()
    activations.extract(_spec(max_length=6), tiny_model_dir, samples, out, progress=False)
    second = ActivationStore(out / "layer0").all()
    assert len(second) < len(first)


def test_non_finite_storage_is_a_clear_error(tiny_model_dir, samples, tmp_path):
    blown = tmp_path / "blown"
    shutil.copytree(tiny_model_dir, blown)
    model, tok = models.load(blown)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)  # residual stream far beyond float16's range
    model.save_pretrained(blown)
    info = json.loads((blown / models.MODEL_INFO).read_text())  # an edit on purpose: record its checksums
    (blown / models.MODEL_INFO).write_text(json.dumps({**info, "sha256": models.checksums(blown)}))
    with pytest.raises(ActivationStoreError, match="non-finite activation in float16.*sample"):
        activations.extract(_spec(dtype="float16", layers=[0]), blown, samples, tmp_path / "c", progress=False)


def test_corrupted_shard_is_named(tiny_model_dir, samples, tmp_path):
    out = tmp_path / "cell"
    activations.extract(_spec(), tiny_model_dir, samples, out, progress=False)
    store = ActivationStore(out / "layer0")
    victim = out / "layer0" / store.shards()[1]["file"]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ActivationStoreError, match=f"{victim.name}: sha256 does not match"):
        list(store.iter_batches(8))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ActivationStoreError, match="no activation manifest"):
        ActivationStore(tmp_path)


def test_shuffle_buffer_yields_every_token_once(tiny_model_dir, samples, tmp_path):
    out = tmp_path / "cell"
    activations.extract(_spec(), tiny_model_dir, samples, out, progress=False)
    store = ActivationStore(out / "layer2")
    plain = torch.cat(list(store.iter_batches(7)))
    torch.testing.assert_close(plain, store.all())  # no shuffle: shard order, token order
    shuffled = torch.cat(list(store.iter_batches(7, shuffle_buffer=50, seed=1)))
    again = torch.cat(list(store.iter_batches(7, shuffle_buffer=50, seed=1)))
    other = torch.cat(list(store.iter_batches(7, shuffle_buffer=50, seed=2)))
    torch.testing.assert_close(shuffled, again)
    assert not torch.equal(shuffled, plain) and not torch.equal(shuffled, other)
    # the same multiset of rows: sort rows lexicographically and compare
    key = lambda t: t[np.lexsort(t.numpy().T[::-1])]  # noqa: E731
    torch.testing.assert_close(key(shuffled), key(plain))
    batches = list(store.iter_batches(7, shuffle_buffer=50, seed=1, drop_last=True))
    assert all(len(b) == 7 for b in batches)


def test_a_character_the_tokenizer_cannot_read_stops_extraction_naming_the_row(tiny_model_dir, write_samples, tmp_path):
    """The tiny model's character vocabulary has no '∂': it would silently become <unk>."""
    from sae_diff.errors import DataError

    samples = write_samples(["she is a nurse", "a ∂ symbol", "fine"])
    with pytest.raises(
        DataError,
        match=r"row 1 \(sample 1\), column 'text': characters \['∂'\] are not in the "
        r"vocabulary",
    ):
        activations.extract(_spec(layers=[0]), tiny_model_dir, samples, tmp_path / "out", progress=False)
