"""Training: several SAE configs from one pass over a cell's activations, resumable.

Per step, one shuffled batch from the activation store is scaled so that E‖x‖ = √d and fed
to every SAE being trained; each has its own Adam (fused where available), warmup + linear
decay, unit-norm decoder (gradient projection, then renormalisation), and AuxK for dead
latents. A checkpoint (safetensors + JSON, no pickle) every ``checkpoint_every`` steps
lets a killed job resume and end with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..activations import ActivationStore, ActivationStoreError
from ..errors import TrainingError  # noqa: F401
from ..io import atomic_path, crash_point, discard_checkpoint, write_json
from . import files
from .model import SAE, SAEConfig

log = logging.getLogger(__name__)


@dataclass
class TrainSpec:
    name: str
    sae: SAEConfig
    lr: float = 4e-4
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # linear decay to 0 over the last fraction of steps
    seed: int = 0
    init_sample: int = 4096  # tokens for the geometric median of b_dec
    dead_tokens: int = 200_000  # a latent unfired for this many tokens counts as dead (AuxK)
    warm_start: str | None = None  # folder of an SAE to start from (indices stay aligned)
    extra: dict = field(default_factory=dict)


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def estimate_scale(store: ActivationStore, n_tokens: int = 16384) -> float:
    """Factor s with E‖s·x‖ = √d over the first ``n_tokens`` training tokens."""
    norms, seen = [], 0
    for shard in store.iter_shards("train"):
        acts = shard["acts"].float()
        norms.append(acts.norm(dim=1))
        seen += len(acts)
        if seen >= n_tokens:
            break
    mean_norm = float(torch.cat(norms)[:n_tokens].mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise TrainingError(f"{store.folder}: mean activation norm is {mean_norm}; cannot scale")
    return math.sqrt(store.d_model) / mean_norm


class _Run:
    """One SAE being trained, with its optimizer state and dead-latent counters."""

    def __init__(
        self,
        spec: TrainSpec,
        total_steps: int,
        scale: float,
        sample: torch.Tensor,
        scale_out: float,
        device: str = "cpu",
        precision=None,
    ):
        self.spec = spec
        self.precision = precision or contextlib.nullcontext
        self.sae = SAE(spec.sae)
        if spec.warm_start:
            start = files.load(spec.warm_start)
            if (start.cfg.d_in, start.cfg.d_sae) != (spec.sae.d_in, spec.sae.d_sae):
                raise TrainingError(
                    f"{spec.name}: warm start {spec.warm_start} has shape "
                    f"{start.cfg.d_in}x{start.cfg.d_sae}, expected {spec.sae.d_in}x{spec.sae.d_sae}"
                )
            self.sae.load_state_dict(start.state_dict(), strict=False)
            files.fold_scaling(self.sae, 1 / scale, 1 / scale_out)  # saved SAEs apply to raw activations
            self.sae.normalize_decoder()
        else:
            self.sae.initialize(sample, seed=spec.seed)
        self.sae.to(device).train()
        params = list(self.sae.parameters())
        try:
            self.opt = torch.optim.Adam(params, lr=spec.lr, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.Adam(params, lr=spec.lr)
        self.total = total_steps
        self.since_fired = torch.zeros(spec.sae.d_sae, dtype=torch.long, device=device)

    def step(self, step: int, x: torch.Tensor, target: torch.Tensor) -> dict:
        for group in self.opt.param_groups:
            group["lr"] = self.spec.lr * lr_factor(step, self.total, self.spec.warmup_steps, self.spec.decay_fraction)
        dead = self.since_fired >= self.spec.dead_tokens
        with self.precision():  # the forward under autocast; backward and Adam in float32
            out = self.sae.training_losses(x, target, dead=dead)
        if not torch.isfinite(out["loss"]):
            raise TrainingError(f"SAE {self.spec.name}: non-finite loss at step {step}")
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.sae.project_decoder_grad()
        self.opt.step()
        self.sae.normalize_decoder()
        self.since_fired += len(x)
        self.since_fired[out["fired"]] = 0
        return out

    # ---------------------------------------------------------- checkpoint

    def state_tensors(self, prefix: str) -> dict:
        # no copies on the CPU: the checkpoint is written before the next step changes anything
        tensors = {f"{prefix}model.{k}": v.detach().cpu() for k, v in self.sae.state_dict().items()}
        state = self.opt.state_dict()
        for pid, pstate in state["state"].items():
            for key, value in pstate.items():
                tensors[f"{prefix}adam.{pid}.{key}"] = torch.as_tensor(value).cpu()
        tensors[f"{prefix}since_fired"] = self.since_fired.cpu()
        return tensors

    def load_tensors(self, tensors: dict, prefix: str) -> None:
        model_state = {k[len(prefix) + 6 :]: v for k, v in tensors.items() if k.startswith(prefix + "model.")}
        self.sae.load_state_dict(model_state)
        state = self.opt.state_dict()
        for key, value in tensors.items():
            if key.startswith(prefix + "adam."):
                pid, name = key[len(prefix) + 5 :].split(".", 1)
                state["state"].setdefault(int(pid), {})[name] = value
        self.opt.load_state_dict(state)  # moves the moments to each parameter's device
        self.since_fired = tensors[prefix + "since_fired"].to(self.since_fired.device)


def _guarded(batches, current_step):
    """Re-raise a store error (it names the shard) as a training error naming the step."""
    try:
        yield from batches
    except ActivationStoreError as exc:
        raise TrainingError(f"at step {current_step()}: {exc}") from None


def _batch_stats(x: torch.Tensor, out: dict) -> dict:
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    return {"fvu": float(out["mse"] / var.clamp_min(1e-12)), "mse": float(out["mse"]), "l0": float(out["l0"])}


HELDOUT_TOKENS = 2048  # eval-split tokens behind the held-out FVU curve (convergence)
HELDOUT_POINTS = 20  # points on that curve


def _heldout_batch(store: ActivationStore, target_store: ActivationStore | None) -> torch.Tensor | None:
    """The first eval-split tokens (input | target): the fixed held-out set of the FVU curve."""
    if not store.n_tokens("eval"):
        return None
    batch = next(iter(store.iter_batches(HELDOUT_TOKENS, split="eval", paired=target_store)), None)
    return batch if batch is not None and len(batch) else None


@torch.no_grad()
def _heldout_fvu(run: "_Run", x: torch.Tensor, y: torch.Tensor) -> float:
    """FVU of one SAE on the held-out tokens (the same definition as the batch FVU)."""
    run.sae.eval()
    recon = run.sae(x)
    run.sae.train()
    var = (y - y.mean(0)).pow(2).sum(-1).mean()
    return float((recon - y).pow(2).sum(-1).mean() / var.clamp_min(1e-12))


def train(
    store: ActivationStore,
    specs: list[TrainSpec],
    out_dirs: list[Path],
    n_tokens: int,
    batch_size: int = 4096,
    shuffle_buffer: int = 1 << 18,
    seed: int = 0,
    checkpoint_every: int = 200,
    log_every: int = 10,
    work_dir: Path | None = None,
    target_store: ActivationStore | None = None,
    progress: bool = True,
    epochs: int = 1,
    place=None,
    steps: int | None = None,
) -> list[Path]:
    """Train every spec on one pass of ``n_tokens`` tokens (times ``epochs``); write each SAE to its folder.

    ``steps``: train for exactly this many steps instead, with as many passes as they take (the
    resampling null's half-sized samples train as many steps as a cell: an SAE with fewer steps stays
    nearer its init, and two of them sharing an init would look more alike than two cells).

    ``place`` (a models.Placement or a device name; default CPU): the device the SAEs train on
    (batches are moved there as they come) and whether their forward runs under bf16 autocast.
    """
    from safetensors.torch import load_file, save_file

    from ..io import check_replaceable
    from ..progress import bar as progress_bar

    for out_dir in out_dirs:  # a user's folder at an output path: an error before training, not after
        check_replaceable(Path(out_dir))
    steps_per_epoch = max(1, min(n_tokens, store.n_tokens("train")) // batch_size)
    total_steps = steps if steps else steps_per_epoch * epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    work_dir = Path(work_dir or out_dirs[0].parent / ".train_state")
    work_dir.mkdir(parents=True, exist_ok=True)
    d_in = store.d_model
    try:
        scale = estimate_scale(store)
        scale_out = estimate_scale(target_store) if target_store is not None else scale
        first = next(iter(store.iter_batches(max(s.init_sample for s in specs), paired=target_store)))
    except ActivationStoreError as exc:
        raise TrainingError(f"before step 0 (input scaling and init): {exc}") from None
    # b_dec lives in the output space: its initial value is the centre of the (scaled) targets
    sample = first[:, d_in:] * scale_out if target_store is not None else first * scale
    # a fixed held-out set scored every eval_every steps: the curve whose flattening says the SAE
    # has converged (diff.convergence); training batches are reused every epoch, so theirs cannot
    try:
        heldout = _heldout_batch(store, target_store)
    except ActivationStoreError as exc:
        raise TrainingError(f"before step 0 (held-out tokens): {exc}") from None
    eval_every = max(1, total_steps // HELDOUT_POINTS)
    from ..models import as_placement

    place = as_placement(place or "cpu")
    if heldout is not None:
        heldout_x = (heldout[:, :d_in] * scale).to(place.device)
        heldout_y = (heldout[:, d_in:] * scale_out).to(place.device) if target_store is not None else heldout_x
    torch.manual_seed(seed)
    runs = [_Run(spec, total_steps, scale, sample, scale_out, place.device, place.precision) for spec in specs]

    ckpt_tensors, ckpt_json = work_dir / "checkpoint.safetensors", work_dir / "checkpoint.json"
    start_step = 0
    logs: list[list[dict]] = [[] for _ in runs]
    if ckpt_json.exists() and ckpt_tensors.exists():
        meta = json.loads(ckpt_json.read_text())
        if meta["names"] == [s.name for s in specs] and meta["total_steps"] == total_steps:
            tensors = load_file(str(ckpt_tensors))
            for i, run in enumerate(runs):
                run.load_tensors(tensors, f"{i}.")
            start_step, logs = meta["step"], meta["logs"]
            log.info("resuming from step %d of %d", start_step, total_steps)

    def stream():
        for epoch in range(epochs):  # each epoch reshuffles with its own seed
            batches = store.iter_batches(
                batch_size, shuffle_buffer=shuffle_buffer, seed=seed + epoch, drop_last=True, paired=target_store
            )
            for _, batch in zip(range(steps_per_epoch), batches):
                yield batch

    batches = stream()
    bar = progress_bar(
        total=total_steps, initial=start_step, desc=f"train {store.folder.parent.name}", enabled=progress
    )
    step = start_step
    for step, batch in enumerate(_guarded(batches, lambda: step)):
        if step >= total_steps:
            break
        if step < start_step:
            continue  # the stream is deterministic: skip what the checkpoint already saw
        batch = batch.to(place.device, non_blocking=True)
        x = batch[:, :d_in] * scale
        y = batch[:, d_in:] * scale_out if target_store is not None else x
        last = step == total_steps - 1
        heldout_due = heldout is not None and ((step + 1) % eval_every == 0 or last)
        for i, run in enumerate(runs):
            out = run.step(step, x, y)
            if step % log_every == 0 or last or heldout_due:
                row = {
                    "step": step,
                    "tokens": (step + 1) * batch_size,
                    "loss": float(out["loss"].detach()),
                    **_batch_stats(y, out),
                    "dead_fraction": float((run.since_fired >= run.spec.dead_tokens).float().mean()),
                    "lr": run.opt.param_groups[0]["lr"],
                }
                if heldout_due:
                    row["heldout_fvu"] = _heldout_fvu(run, heldout_x, heldout_y)
                logs[i].append(row)
        bar.update(1)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
            tensors = {}
            for i, run in enumerate(runs):
                tensors.update(run.state_tensors(f"{i}."))
            with atomic_path(ckpt_tensors) as tmp:
                save_file(tensors, str(tmp))
            write_json(
                ckpt_json,
                {"step": step + 1, "total_steps": total_steps, "names": [s.name for s in specs], "logs": logs},
            )
            crash_point("SAE_DIFF_KILL_AFTER_STEP", str(step + 1))
    bar.close()

    for run, out_dir, run_log in zip(runs, out_dirs, logs):
        run.sae.cpu().eval()
        files.fold_scaling(run.sae, scale, scale_out)
        files.save(
            run.sae,
            out_dir,
            extra={
                "training": {
                    "n_tokens": total_steps * batch_size,
                    "epochs": epochs,
                    "scale": scale,
                    "scale_out": scale_out,
                    "steps": total_steps,
                    "lr": run.spec.lr,
                    "seed": run.spec.seed,
                    **run.spec.extra,
                }
            },
        )
        # the curve is drawn by its own figure job (figures.training) from this log
        with atomic_path(Path(out_dir) / "train_log.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in run_log))
    discard_checkpoint(work_dir, (ckpt_tensors, ckpt_json))
    return [Path(p) for p in out_dirs]


def spec_from_config(
    name: str,
    block: dict,
    d_in: int,
    d_out: int | None,
    hook_name: str,
    target_hook_name: str,
    model_name: str,
    warm_start: str | None,
) -> TrainSpec:
    """A TrainSpec from one entry of the config's ``saes`` block."""
    d_sae = block["expansion_factor"] * d_in
    prefixes = sorted({max(1, round(f * d_sae)) for f in block["matryoshka_fractions"]})
    cfg = SAEConfig(
        architecture=block["architecture"],
        d_in=d_in,
        d_sae=d_sae,
        k=min(block["k"], d_sae),
        d_out=d_out,
        l1_coefficient=block["l1_coefficient"],
        l0_coefficient=block["l0_coefficient"],
        jumprelu_bandwidth=block["jumprelu_bandwidth"],
        jumprelu_init_threshold=block["jumprelu_init_threshold"],
        matryoshka_prefixes=prefixes if block["architecture"] == "matryoshka" else [],
        k_aux=block.get("k_aux"),
        aux_coefficient=block["aux_coefficient"],
        hook_name=hook_name,
        target_hook_name=target_hook_name,
        model_name=model_name,
    )
    return TrainSpec(
        name=name,
        sae=cfg,
        lr=block["lr"],
        warmup_steps=block["warmup_steps"],
        decay_fraction=block["decay_fraction"],
        seed=block["seed"],
        dead_tokens=block["dead_tokens"],
        warm_start=warm_start,
        extra={"config": block},
    )
