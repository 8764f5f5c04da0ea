"""SAE training on planted data: it learns, resumes bit-exactly after kill -9, and fails loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from sae_diff.activations import ActivationStore, write_store
from sae_diff.sae import files
from sae_diff.sae.model import SAEConfig
from sae_diff.sae.train import TrainingError, TrainSpec, lr_factor, train

D, ATOMS, ACTIVE, N = 16, 48, 3, 30_000


def planted(seed=0, n=N):
    """x = sum of ACTIVE random unit atoms (of ATOMS) with positive weights, plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(ATOMS, D, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(ATOMS, generator=gen)[:ACTIVE] for _ in range(n)])
    weights = torch.rand(n, ACTIVE, generator=gen) * 2 + 0.5
    return (weights[..., None] * atoms[idx]).sum(1) + 0.3, atoms


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    acts, _ = planted()
    return ActivationStore(write_store(tmp_path_factory.mktemp("acts") / "layer0", acts, shard_tokens=3000))


def spec(name, arch="topk", **kw):
    return TrainSpec(
        name=name,
        sae=SAEConfig(architecture=arch, d_in=D, d_sae=ATOMS, k=ACTIVE, **kw.pop("cfg", {})),
        lr=kw.pop("lr", 1e-2),
        warmup_steps=5,
        dead_tokens=2000,
        init_sample=kw.pop("init_sample", 512),
        **kw,
    )


def fvu(sae, x):
    with torch.no_grad():
        recon = sae(x)
    return float((recon - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean())


def test_several_configs_learn_from_one_pass(store, tmp_path):
    specs = [
        spec("topk"),
        spec("relu", "relu", cfg={"l1_coefficient": 0.02}),
        spec("batchtopk", "batchtopk"),
        spec("jumprelu", "jumprelu", cfg={"l0_coefficient": 0.02}),
        spec("matryoshka", "matryoshka", cfg={"matryoshka_prefixes": [16, ATOMS]}),
    ]
    outs = train(
        store,
        specs,
        [tmp_path / s.name for s in specs],
        n_tokens=N,
        batch_size=128,
        shuffle_buffer=6000,
        checkpoint_every=0,
        progress=False,
    )
    fresh, _ = planted(seed=0, n=2000)  # the same distribution, raw scale: saved SAEs apply to raw activations
    for out in outs:
        sae = files.load(out)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert log[-1]["fvu"] < log[0]["fvu"], out.name
        assert fvu(sae, fresh) < 0.3, (out.name, fvu(sae, fresh))  # measured 0.02-0.26 at this size
        assert abs(fvu(sae, fresh) - log[-1]["fvu"]) < 0.05  # folding the input scale into the weights is exact
        assert {"loss", "fvu", "l0", "dead_fraction", "lr", "tokens"} <= set(log[0])
        if out.name == "topk":
            assert log[-1]["l0"] == ACTIVE


def test_lr_schedule():
    assert [round(lr_factor(s, 100, 10, 0.2), 3) for s in (0, 4, 9, 50, 80, 90, 99)] == [
        0.1,
        0.5,
        1.0,
        1.0,
        1.0,
        0.5,
        0.05,
    ]


def test_non_finite_activations_stop_naming_step_and_shard(tmp_path):
    acts, _ = planted(n=20000)
    acts[19500, 3] = float("inf")  # beyond the 16384 tokens read to estimate the input scale
    bad = ActivationStore(write_store(tmp_path / "bad", acts, shard_tokens=1000))
    with pytest.raises(
        TrainingError, match=r"at step \d+: .*train-00019.safetensors: non-finite activation in row 500"
    ):
        train(
            bad,
            [spec("a", init_sample=256)],
            [tmp_path / "a"],
            n_tokens=20000,
            batch_size=256,
            shuffle_buffer=0,
            checkpoint_every=0,
            progress=False,
        )
    acts[0, 0] = float("nan")  # in the very first shard: caught while estimating the input scale
    worse = ActivationStore(write_store(tmp_path / "worse", acts, shard_tokens=1000))
    with pytest.raises(TrainingError, match="before step 0.*train-00000.safetensors: non-finite activation in row 0"):
        train(worse, [spec("a")], [tmp_path / "b"], n_tokens=3000, batch_size=256, checkpoint_every=0, progress=False)


SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sae_diff.activations import ActivationStore
    from sae_diff.io import setup_logging
    from sae_diff.sae.model import SAEConfig
    from sae_diff.sae.train import TrainSpec, train
    setup_logging()
    store, out = ActivationStore(sys.argv[1]), Path(sys.argv[2])
    specs = [TrainSpec(name=n, sae=SAEConfig(architecture=a, d_in=16, d_sae=48, k=3), lr=3e-3, warmup_steps=5,
                       dead_tokens=2000, init_sample=512) for n, a in (("t", "topk"), ("j", "jumprelu"))]
    train(store, specs, [out / s.name for s in specs], n_tokens=12000, batch_size=256, shuffle_buffer=3000,
          checkpoint_every=10, progress=False, work_dir=out / "state")
""")


def test_kill_minus_nine_then_resume_ends_with_identical_weights(store, tmp_path):
    def run(out, **env):
        return subprocess.run(
            [sys.executable, "-c", SCRIPT, str(store.folder), str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            timeout=600,
        )

    assert run(tmp_path / "clean").returncode == 0
    killed = run(tmp_path / "resumed", SAE_DIFF_KILL_AFTER_STEP="20")
    assert killed.returncode == -9 and (tmp_path / "resumed" / "state" / "checkpoint.json").exists()
    resumed = run(tmp_path / "resumed")
    assert resumed.returncode == 0 and "resuming from step 20" in resumed.stderr
    for name in ("t", "j"):
        a = load_file(str(tmp_path / "clean" / name / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "resumed" / name / "sae_weights.safetensors"))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        assert (tmp_path / "clean" / name / "train_log.jsonl").read_text() == (
            tmp_path / "resumed" / name / "train_log.jsonl"
        ).read_text()
    assert not (tmp_path / "resumed" / "state").exists()  # the finished run leaves no state folder


def test_warm_start_keeps_feature_indices(store, tmp_path):
    first = train(store, [spec("a")], [tmp_path / "a"], n_tokens=N, batch_size=256, checkpoint_every=0, progress=False)[
        0
    ]
    second = train(
        store,
        [spec("b", warm_start=str(first), lr=1e-4)],
        [tmp_path / "b"],
        n_tokens=2000,
        batch_size=256,
        checkpoint_every=0,
        progress=False,
    )[0]
    a, b = files.load(first), files.load(second)
    cos = torch.nn.functional.cosine_similarity(a.W_dec.detach(), b.W_dec.detach(), dim=1)
    assert float(cos.min()) > 0.9  # same index, same feature after a short, gentle continuation
