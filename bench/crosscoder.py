"""BatchTopK crosscoder training speed and quality: sae-diff vs science-of-finetuning's dictionary_learning.

The reference is ``BatchTopKCrossCoderTrainer`` / ``BatchTopKCrossCoder`` of
science-of-finetuning/dictionary_learning (the fork with the crosscoders used by Minder et al.
2025; saprmarks/dictionary_learning's main branch has none). Its source is copied from a local
snapshot of that repository (``--reference-src``: a git directory or a checkout; default the
session mirror) into bench/.venvs/dictionary_learning_src/ and imported from there without its
package ``__init__`` (which pulls in nnsight); einops, its one missing dependency used by the
trainer, is pip-installed beside it, and ``datasets`` / ``zstandard`` (imported by its utils
for dataset streaming only) are stubbed when absent.

Both train on the demo's shapes (d_model 576 as SmolLM2-135M, 2 models, d_sae 4608, k 32,
batch 1024), Adam at the same constant learning rate, on the same batches of synthetic paired
activations (a known sparse dictionary: shared directions, slightly rotated in model 1, and
model-1-only directions, plus noise; float32, fixed seed), for the same number of steps, with
the same threads, in this one process:

* ``sae-diff train()``: ``crosscoder.train`` on a ``PairedStore`` of two stores written to a
  temp folder (the demo's shuffle buffer and checkpoint interval); steps are timed from inside
  its loop (the progress bar's updates), so data reading, logging and checkpoints count but
  setup and the final save do not.
* ``reference``: ``trainer.update(step, x)`` on the in-memory batches (threshold updates from
  step 1 and threshold EMA 0.99, as ours, instead of its defaults 1000 and 0.999), interleaved
  with ``train()``: after every ``--block`` of our steps (inside train()'s progress-bar update) the
  reference runs as many of its own, so that a busy shared machine slows both alike; each side's
  time is only that of its own steps.
* ``sae-diff step``: the same per-step path as ``train`` (scale, lr, losses, backward, fused
  Adam, dead-latent counters, logging every 10 steps) on the in-memory batches, run afterwards.

Tokens/s over the steps after ``--warmup`` untimed ones; FVU per model on held-out tokens,
1 − Σ‖x−x̂‖² / Σ‖x−mean x‖², averaged over the two models, with the training-time encoding (batch
top-k over held-out batches of the training batch size): after a few dozen steps neither learned
inference threshold has settled (an EMA at 0.99 still weighs its first value by ~0.65), so the
threshold encoding's FVU and L0 are printed beside it, not used. The last line is

    crosscoder_vs_reference=<ours train() tok/s / reference tok/s> fvu_ours=<x> fvu_reference=<y> \
        ms_per_step_ours=<a> ms_per_step_reference=<b>

    python bench/crosscoder.py [--steps 40] [--warmup 3] [--block 5] [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sae_diff import crosscoder, progress  # noqa: E402
from sae_diff.activations import ActivationStore, write_store  # noqa: E402
from sae_diff.paired import PairedStore  # noqa: E402
from sae_diff.sae.train import estimate_scale, lr_factor  # noqa: E402

VENVS = ROOT / "bench" / ".venvs"
REFERENCE = VENVS / "dictionary_learning_src"
REFERENCE_REPO = "science-of-finetuning/dictionary_learning"
DEFAULT_SRC = Path("/work/.mirror/science-of-finetuning+dictionary_learning/repo")
EINOPS = "einops==0.8.2"


# ---------------------------------------------------------------------------- the reference


def install_reference(src: Path) -> None:
    """Copy the reference's package source into bench/.venvs/dictionary_learning_src (once)."""
    if (REFERENCE / "dictionary_learning" / "trainers" / "crosscoder.py").exists():
        return
    if not src.exists():
        raise SystemExit(
            f"{src}: no snapshot of {REFERENCE_REPO}; give --reference-src (a git directory or checkout of it)"
        )
    tmp = REFERENCE.with_name(REFERENCE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if (src / "dictionary_learning").is_dir():  # a checkout
        shutil.copytree(src / "dictionary_learning", tmp / "dictionary_learning")
        commit = "checkout"
    else:  # a (bare) git directory
        archive = subprocess.run(
            ["git", f"--git-dir={src}", "archive", "HEAD", "dictionary_learning", "LICENSE"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        commit = subprocess.run(
            ["git", f"--git-dir={src}", "rev-parse", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
    (tmp / "SOURCE").write_text(f"{REFERENCE_REPO} {commit}\n")
    tmp.rename(REFERENCE)


def import_reference():
    """The reference trainer class, imported without running the package's __init__ files."""
    site = REFERENCE / "site"
    if importlib.util.find_spec("einops") is None and not (site / "einops").exists():
        print(f"installing {EINOPS} into {site} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), EINOPS], check=True)
    sys.path.insert(0, str(site))
    for name in ("datasets", "zstandard"):  # utils.py's dataset streaming helpers only
        if importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)  # so find_spec() elsewhere does not fail
            stub.load_dataset = stub.ZstdDecompressor = None
            sys.modules[name] = stub
    for name in ("dictionary_learning", "dictionary_learning.trainers"):
        package = types.ModuleType(name)
        package.__path__ = [str(REFERENCE / name.replace(".", "/"))]
        sys.modules[name] = package
    from dictionary_learning.trainers.crosscoder import BatchTopKCrossCoderTrainer

    return BatchTopKCrossCoderTrainer, (REFERENCE / "SOURCE").read_text().strip()


# ---------------------------------------------------------------------------- data


def synthetic(n_tokens: int, d: int, seed: int, n_shared: int = 2560, n_only: int = 512, active: int = 24):
    """Paired activations [n, 2, d]: ``active`` features per token (power-law frequencies,
    exponential magnitudes) of ``n_shared`` shared directions (rotated a little in model 1) and
    ``n_only`` model-1-only ones, per-model offsets and Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    n_feat = n_shared + n_only
    d0 = torch.randn(n_feat, d, generator=gen)
    d1 = d0 + 0.3 * torch.randn(n_feat, d, generator=gen)
    d0 = d0 / d0.norm(dim=1, keepdim=True)
    d1 = d1 / d1.norm(dim=1, keepdim=True)
    d0[n_shared:] = 0  # model-1-only
    probs = (torch.arange(n_feat) + 1.0).pow(-0.6)
    probs = probs[torch.randperm(n_feat, generator=gen)]
    offsets = torch.randn(2, d, generator=gen) * 0.5
    out = torch.empty(n_tokens, 2, d)
    for start in range(0, n_tokens, 8192):
        n = min(8192, n_tokens - start)
        idx = torch.multinomial(probs.expand(n, n_feat), active, replacement=False, generator=gen)
        mags = torch.empty(n, active).exponential_(1.0, generator=gen)
        coef = torch.zeros(n, n_feat).scatter_(1, idx, mags)
        for m, dirs in enumerate((d0, d1)):
            out[start : start + n, m] = coef @ dirs + offsets[m] + 0.05 * torch.randn(n, d, generator=gen)
    scale = math.sqrt(d) / out.norm(dim=2).mean(0)  # E‖x_m‖ = √d, as both trainers expect
    return out * scale[None, :, None]


def fvu_per_model(x: torch.Tensor, recon: torch.Tensor) -> list[float]:
    x, recon = x.double(), recon.double()
    err = (x - recon).pow(2).sum(dim=(0, 2))
    var = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    return (err / var).tolist()


def _fvu_and_l0(reconstruct, encode_threshold, x: torch.Tensor, batch: int):
    """Batch top-k FVU per model (each ``batch`` held-out tokens encoded as a training batch), and
    the threshold encoding's FVU per model and mean L0."""
    with torch.no_grad():
        fvu_b = fvu_per_model(x, torch.cat([reconstruct(chunk) for chunk in x.split(batch)]))
        recon_t, f_t = encode_threshold(x)
        return fvu_b, fvu_per_model(x, recon_t), float((f_t > 0).sum(-1).float().mean())


def evaluate_ours(cc, eval_acts: torch.Tensor, batch: int):
    def batch_topk(x):
        cc.train()  # training-mode encoding: batch top-k (the threshold is used in eval mode)
        return cc(x)[0]

    def threshold(x):
        cc.eval()
        return cc(x)

    return _fvu_and_l0(batch_topk, threshold, eval_acts, batch)


def evaluate_reference(ae, eval_scaled: torch.Tensor, batch: int):
    def batch_topk(x):
        return ae.decode(ae.encode(x.clone(), use_threshold=False))

    def threshold(x):
        f = ae.encode(x.clone(), use_threshold=True)
        return ae.decode(f), f

    return _fvu_and_l0(batch_topk, threshold, eval_scaled, batch)


def timed_rate(stamps: list[float], warmup: int, batch: int) -> float:
    """Tokens/s over the steps after ``warmup``: stamps[i] is when step i ended."""
    steps = len(stamps) - warmup
    return batch * steps / (stamps[-1] - stamps[warmup - 1])


def duration_rate(durations: list[float], warmup: int, batch: int) -> float:
    """Tokens/s over the steps after ``warmup``: durations[i] is how long step i took."""
    return batch * (len(durations) - warmup) / sum(durations[warmup:])


# ---------------------------------------------------------------------------- ours


class _Stamps:
    """Stands in for the progress bar inside ``crosscoder.train``: records how long each step took
    and, after every ``block`` steps, runs ``between`` (the reference's steps), whose time is not ours."""

    def __init__(self, block: int = 0, between=None):
        self.durations: list[float] = []
        self.block, self.between = block, between
        self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.durations.append(time.perf_counter() - self.last)
        if self.between is not None and len(self.durations) % self.block == 0:
            self.between(len(self.durations))
        self.last = time.perf_counter()

    def close(self) -> None:
        pass


def ours_train(paired, cfg, args, work: Path, between=None):
    """train() on the store; ``between(n)`` runs after every ``args.block`` steps (n: steps done)."""
    stamps = _Stamps(args.block, between)
    real_bar = progress.bar
    progress.bar = lambda *a, **k: stamps
    try:
        folder = crosscoder.train(
            paired,
            cfg,
            work / "cc",
            n_tokens=args.total * args.batch,
            batch_size=args.batch,
            lr=args.lr,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            progress=False,
            warmup_steps=0,
            decay_fraction=0.0,
            dead_tokens=args.dead_tokens,
            shuffle_buffer=args.shuffle_buffer,
            work_dir=work / "state",
        )
    finally:
        progress.bar = real_bar
    if len(stamps.durations) != args.total:
        raise SystemExit(f"train() ran {len(stamps.durations)} steps, expected {args.total}")
    return crosscoder.load(folder), duration_rate(stamps.durations, args.warmup, args.batch)


def ours_step(batches, init_sample, scales, cfg, args):
    """``train``'s per-step path on in-memory batches (returns the crosscoder and tokens/s)."""
    torch.manual_seed(args.seed)
    cc = crosscoder.Crosscoder(cfg)
    with torch.no_grad():
        cc.input_scale.copy_(torch.tensor(scales, dtype=torch.float32))
    cc.initialize(cc.scale_inputs(init_sample), seed=args.seed)  # train()'s init: the first 4096 tokens
    cc.train()
    opt = torch.optim.Adam(cc.parameters(), lr=args.lr, fused=True)
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    stamps, logs = [], []
    for step, batch in enumerate(batches):
        xs = cc.scale_inputs(batch)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, len(batches), 0, 0.0)
        dead = since_fired >= args.dead_tokens
        out = cc.training_losses(xs, dead=dead)
        if not torch.isfinite(out["loss"]):
            raise SystemExit(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        since_fired += len(xs)
        since_fired[out["fired"]] = 0
        if step % 10 == 0 or step == len(batches) - 1:
            variance = (xs - xs.mean(0)).pow(2).sum(-1).mean(0)
            logs.append({"fvu": (out["mse_per_model"] / variance.clamp_min(1e-12)).tolist(), "l0": float(out["l0"])})
        stamps.append(time.perf_counter())
    return cc.eval(), timed_rate(stamps, args.warmup, args.batch)


# ---------------------------------------------------------------------------- the reference's run


def make_reference(trainer_cls, cfg, args):
    return trainer_cls(
        steps=args.total,
        activation_dim=cfg.d_in,
        dict_size=cfg.d_sae,
        k=cfg.k,
        layer=0,
        lm_name="synthetic",
        num_layers=cfg.n_models,
        lr=args.lr,
        warmup_steps=0,
        decay_start=None,
        threshold_beta=cfg.threshold_momentum,
        threshold_start_step=0,
        seed=args.seed,
        device="cpu",
    )


class ReferenceRun:
    """The reference trainer on the in-memory batches, a few steps at a time (``until``)."""

    def __init__(self, trainer_cls, batches, cfg, args):
        self.trainer = make_reference(trainer_cls, cfg, args)
        self.batches, self.args = batches, args
        self.durations: list[float] = []

    def until(self, n_steps: int) -> None:
        for step in range(len(self.durations), min(n_steps, len(self.batches))):
            start = time.perf_counter()
            self.trainer.update(step, self.batches[step].clone())  # update normalises in place (a no-op here)
            self.durations.append(time.perf_counter() - start)

    def finish(self):
        self.until(len(self.batches))
        return self.trainer.ae.eval(), duration_rate(self.durations, self.args.warmup, self.args.batch)


# ---------------------------------------------------------------------------- profile


def profile_parts(batches, scales, cfg, args, trainer_cls) -> None:
    """Time each part of our step and of the reference's (mean ms over a few steps)."""
    torch.manual_seed(args.seed)
    cc = crosscoder.Crosscoder(cfg)
    with torch.no_grad():
        cc.input_scale.copy_(torch.tensor(scales, dtype=torch.float32))
    cc.initialize(cc.scale_inputs(batches[0][:4096]), seed=args.seed)
    cc.train()
    opt = torch.optim.Adam(cc.parameters(), lr=args.lr, fused=True)
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    parts: dict[str, float] = {}

    @contextlib.contextmanager
    def part(name):
        start = time.perf_counter()
        yield
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - start

    n = min(8, len(batches))
    for step, batch in enumerate(batches[:n]):
        if step == 2:
            parts.clear()  # the first two steps are warm-up
        with part("scale inputs"):
            xs = cc.scale_inputs(batch)
        dead = since_fired >= args.dead_tokens
        with torch.no_grad():  # the forward's dense part on its own (training_losses repeats it)
            with part("(of which: dense encode)"):
                acts = cc.encode_pre(xs).relu_()
            with part("(of which: batch top-k)"):
                weighted = acts * cc.decoder_norms().sum(1)
                crosscoder._flat_topk(weighted.view(-1), cfg.k * len(xs))
        with part("forward (training_losses)"):
            out = cc.training_losses(xs, dead=dead)
        with part("backward"):
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
        with part("adam (fused)"):
            opt.step()
        with part("dead-latent counters"):
            since_fired += len(xs)
            since_fired[out["fired"]] = 0
    parts = {name: t for name, t in parts.items() if not name.startswith("(")} | {
        name: t for name, t in parts.items() if name.startswith("(")
    }
    total = sum(t for name, t in parts.items() if not name.startswith("("))
    print(f"our step, by part (mean of {n - 2} steps, {total / (n - 2) * 1e3:.0f} ms/step):")
    for name, seconds in parts.items():
        print(f"  {name:<30}{seconds / (n - 2) * 1e3:>9.1f} ms{100 * seconds / total:>7.1f}%")

    from torch.profiler import ProfilerActivity, profile

    trainer = make_reference(trainer_cls, cfg, args)
    for label, fn in (
        ("ours", lambda i, x: _our_full_step(cc, opt, since_fired, x, args)),
        ("reference", lambda i, x: trainer.update(i, x.clone())),
    ):
        for i in range(2):
            fn(i, batches[i])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(2, n):
                fn(i, batches[i])
        print(f"{label}: top ops by self CPU time over {n - 2} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


def _our_full_step(cc, opt, since_fired, batch, args):
    xs = cc.scale_inputs(batch)
    out = cc.training_losses(xs, dead=since_fired >= args.dead_tokens)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    since_fired += len(xs)
    since_fired[out["fired"]] = 0


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=5, help="steps of each before switching to the other")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=4e-4, help="the demo's crosscoder lr (constant for both here)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--shuffle-buffer", type=int, default=65536, help="train()'s; the demo's")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="train()'s; the demo's")
    parser.add_argument("--dead-tokens", type=int, default=1_000_000, help="ours (the demo's); the reference's 10M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-src", type=Path, default=DEFAULT_SRC)
    parser.add_argument("--profile", action="store_true", help="also time each part of both steps")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.block < 1:
        raise SystemExit("--warmup, --steps and --block must be at least 1")
    args.total = args.warmup + args.steps
    torch.set_num_threads(args.threads)

    install_reference(args.reference_src)
    trainer_cls, source = import_reference()

    d = args.d_model
    # the reference's default init: independent decoder blocks per model
    cfg = crosscoder.CrosscoderConfig(n_models=2, d_in=d, d_sae=args.expansion * d, k=args.k, same_init=False)
    start = time.perf_counter()
    acts = synthetic(args.total * args.batch + args.eval_tokens, d, args.seed)
    train_acts, eval_acts = acts[: args.total * args.batch], acts[args.total * args.batch :]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-crosscoder-") as tmp:
        work = Path(tmp)
        stores = [
            ActivationStore(write_store(work / f"m{m}", train_acts[:, m].contiguous(), split="train")) for m in range(2)
        ]
        paired = PairedStore(stores, names=["m0", "m1"])
        scales = [estimate_scale(store) for store in stores]  # what train() applies: the reference gets the same
        # the exact batches train() draws (same shuffle); the reference gets them scaled as train() scales them
        raw_batches = list(
            paired.iter_batches(args.batch, shuffle_buffer=args.shuffle_buffer, seed=args.seed, drop_last=True)
        )[: args.total]
        scale_t = torch.tensor(scales, dtype=torch.float32)[:, None]
        batches = [b * scale_t for b in raw_batches]
        eval_scaled = eval_acts * scale_t
        print(
            f"data: {len(train_acts)} train + {len(eval_acts)} eval tokens, scales {scales}, "
            f"{time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )

        reference = ReferenceRun(trainer_cls, batches, cfg, args)
        cc, tok_s = ours_train(paired, cfg, args, work, between=reference.until)
        ae, ref_tok_s = reference.finish()
        results.append(("sae-diff train()", tok_s, *evaluate_ours(cc, eval_acts, args.batch)))
        print(f"sae-diff train(): {tok_s:.0f} tok/s, reference (interleaved): {ref_tok_s:.0f} tok/s", file=sys.stderr)

        cc, step_tok_s = ours_step(raw_batches, train_acts[:4096], scales, cfg, args)
        results.append(("sae-diff step", step_tok_s, *evaluate_ours(cc, eval_acts, args.batch)))
        print(f"sae-diff step: {step_tok_s:.0f} tok/s", file=sys.stderr)

        results.append(("reference update()", ref_tok_s, *evaluate_reference(ae, eval_scaled, args.batch)))

        if args.profile:
            profile_parts(raw_batches, scales, cfg, args, trainer_cls)

    print(
        f"BatchTopK crosscoder, synthetic paired activations, 2 models x d {d}, d_sae {cfg.d_sae}, k {cfg.k}, "
        f"batch {args.batch}, Adam lr {args.lr} constant, {args.threads} threads; {args.steps} timed steps after "
        f"{args.warmup}; train() and the reference interleaved in blocks of {args.block} steps; FVU on "
        f"{len(eval_acts)} held-out tokens after {args.total} steps; reference: {source}"
    )
    print(
        f"{'implementation':<20}{'tok/s':>8}{'FVU m0':>8}{'FVU m1':>8}{'FVU':>8}"
        f"{'FVU (threshold)':>17}{'L0 (threshold)':>16}"
    )
    for name, rate, fvu_b, fvu_t, l0_t in results:
        print(
            f"{name:<20}{rate:>8.0f}{fvu_b[0]:>8.4f}{fvu_b[1]:>8.4f}{sum(fvu_b) / 2:>8.4f}"
            f"{sum(fvu_t) / 2:>17.4f}{l0_t:>16.1f}"
        )
    ours, ref = results[0], results[2]
    print(
        f"crosscoder_vs_reference={ours[1] / ref[1]:.2f} fvu_ours={sum(ours[2]) / 2:.4f} "
        f"fvu_reference={sum(ref[2]) / 2:.4f} ms_per_step_ours={args.batch / ours[1] * 1e3:.0f} "
        f"ms_per_step_reference={args.batch / ref[1] * 1e3:.0f}"
    )


if __name__ == "__main__":
    main()
