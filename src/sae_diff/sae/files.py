"""SAE files in SAELens's layout: ``cfg.json`` + ``sae_weights.safetensors`` (never pickle).

Our full training config goes beside them in ``sae_diff.json``, so the SAELens files stay
exactly what SAELens expects. Architectures map as: relu -> "standard", topk -> "topk",
jumprelu, batchtopk and matryoshka -> "jumprelu" (the latter two with their learned global
threshold, which is how they run at inference).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import DataError
from ..io import atomic_dir, sha256_file, verify_checksums
from .model import SAE, SAEConfig

# the SAELens config format we write; without a 6.x version SAELens reads cfg.json as pre-6.0
# and rebuilds metadata from top-level keys (losing hook_name)
SAELENS_FORMAT_VERSION = "6.54.0"
SAELENS_ARCH = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
}
OURS = "sae_diff.json"
WEIGHTS = "sae_weights.safetensors"


def saelens_cfg(sae: SAE) -> dict:
    cfg = sae.cfg
    out = {
        "architecture": SAELENS_ARCH[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(sae.W_dec.dtype).replace("torch.", ""),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
        },
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
        out["metadata"]["hook_name_out"] = cfg.target_hook_name
    return out


def weights(sae: SAE) -> dict[str, torch.Tensor]:
    tensors = {
        "W_enc": sae.W_enc_T.detach().t().contiguous(),
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach().contiguous(),
        "b_dec": sae.b_dec.detach().clone(),
    }
    arch = sae.cfg.architecture
    if arch == "jumprelu":
        tensors["threshold"] = sae.log_threshold.detach().exp()
    elif arch in ("batchtopk", "matryoshka"):
        tensors["threshold"] = sae.threshold.detach().clone()
    return tensors


def save(sae: SAE, folder: str | Path, extra: dict | None = None) -> Path:
    """Write the SAE atomically: the folder appears complete or not at all."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file(weights(sae), str(tmp / WEIGHTS))
        (tmp / "cfg.json").write_text(json.dumps(saelens_cfg(sae), indent=2))
        # checksums of the files later stages trust, verified by load(): a flipped byte in the
        # weights would otherwise give plausible but wrong metrics
        sums = {name: sha256_file(tmp / name) for name in (WEIGHTS, "cfg.json")}
        (tmp / OURS).write_text(
            json.dumps({"config": sae.cfg.to_dict(), **(extra or {}), "sha256": sums}, indent=2, default=str)
        )
    return folder


def verify(folder: Path, recorded: dict) -> None:
    """The folder's files match the checksums save() wrote beside them (a clear error if not)."""
    verify_checksums(
        folder,
        recorded,
        folder / OURS,
        f"rebuild the SAE: delete {folder} and rerun the workflow (rule train_sae or import_sae), "
        "e.g. snakemake --forcerun train_sae <target>",
    )


def _read_folder(folder: Path, weights_name: str, layout: str) -> tuple[dict, dict, Path]:
    """cfg.json and the safetensors weights of an SAE folder (never pickle)."""
    from safetensors.torch import load_file

    cfg_path, weights_path = folder / "cfg.json", folder / weights_name
    for path in (cfg_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (expected a {layout} SAE folder)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own SafetensorError on a truncated file
        raise DataError(
            f"{weights_path}: not a readable safetensors file ({error}); rebuild or re-export it "
            "(for an SAE of this workflow: delete its folder and rerun)"
        ) from error
    return json.loads(cfg_path.read_text()), tensors, cfg_path


def load(folder: str | Path, dtype: torch.dtype = torch.float32) -> SAE:
    """Load an SAE saved by us or by SAELens (standard, topk, jumprelu)."""
    folder = Path(folder)
    ours = folder / OURS
    record = json.loads(ours.read_text()) if ours.exists() else None
    if record is not None and "sha256" in record:
        verify(folder, record["sha256"])
    lens, tensors, cfg_path = _read_folder(folder, WEIGHTS, "SAELens-layout")
    if record is not None:
        cfg = SAEConfig(**record["config"])
    else:
        arch = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(lens.get("architecture"))
        if arch is None:
            raise ValueError(
                f"{cfg_path}: architecture {lens.get('architecture')!r} not supported; "
                "expected standard, topk or jumprelu"
            )
        meta = {**{k: lens[k] for k in ("hook_name", "model_name") if k in lens}, **lens.get("metadata", {})}
        cfg = SAEConfig(
            architecture=arch,
            d_in=int(lens["d_in"]),
            d_sae=int(lens["d_sae"]),
            k=int(lens.get("k", 32)),
            d_out=lens.get("d_out"),
            hook_name=meta.get("hook_name", ""),
            model_name=meta.get("model_name", ""),
            apply_b_dec_to_input=bool(lens.get("apply_b_dec_to_input", True)),
        )
    if lens.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(
            f"{cfg_path}: normalize_activations {lens['normalize_activations']!r} not supported; "
            "expected 'none' (fold the scaling into the weights first)"
        )
    return _filled(cfg, tensors, dtype, cfg_path)


def _filled(cfg: SAEConfig, tensors: dict, dtype, where) -> SAE:
    """An SAE with W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec, (threshold) copied in."""
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.out_dim),
        "b_dec": (cfg.out_dim,),
    }
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"{where}: tensor {key!r} missing; found {sorted(tensors)}")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    sae = SAE(cfg, dtype=dtype)
    with torch.no_grad():
        sae.W_enc_T.copy_(tensors["W_enc"].t())
        sae.b_enc.copy_(tensors["b_enc"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_dec.copy_(tensors["b_dec"])
        if cfg.architecture == "jumprelu":
            sae.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())
        elif "threshold" in tensors:
            sae.threshold.copy_(tensors["threshold"])
    return sae.eval()


def load_gemma_scope(
    path: str | Path,
    transcoder: bool = False,
    hook_name: str = "",
    model_name: str = "",
    dtype: torch.dtype = torch.float32,
) -> SAE:
    """Gemma Scope JumpReLU SAEs and transcoders: ``params.npz`` or ``params.safetensors``.

    Their encoder takes the raw input (no b_dec subtraction), for SAEs and transcoders alike.
    """
    import numpy as np

    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("params.safetensors", "params.npz") if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f"{path}: no params.safetensors or params.npz")
        path = found[0]
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:  # untrusted file: arrays only, never pickle
            tensors = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    tensors = {k.replace("W_enc.weight", "W_enc"): v for k, v in tensors.items()}
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]
    cfg = SAEConfig(
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out if transcoder else None,
        hook_name=hook_name,
        model_name=model_name,
        apply_b_dec_to_input=False,
    )
    return _filled(cfg, tensors, dtype, path)


def load_sparsify(folder: str | Path, dtype: torch.dtype = torch.float32) -> SAE:
    """EleutherAI sparsify TopK SAEs and transcoders: ``cfg.json`` + ``sae.safetensors``."""
    folder = Path(folder)
    scfg, raw, _ = _read_folder(folder, "sae.safetensors", "sparsify")
    if "W_skip" in raw or scfg.get("skip_connection"):
        raise ValueError(f"{folder}: sparsify skip connections are not supported")
    transcode = bool(scfg.get("transcode", False))
    d_sae, d_in = raw["encoder.weight"].shape
    d_out = raw["W_dec"].shape[1]
    tensors = {
        "W_enc": raw["encoder.weight"].t(),
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }
    cfg = SAEConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        k=int(scfg["k"]),
        d_out=d_out if transcode else None,
        apply_b_dec_to_input=not transcode,
    )
    return _filled(cfg, tensors, dtype, folder / "sae.safetensors")


def load_any(path: str | Path, fmt: str = "auto", transcoder: bool = False, dtype: torch.dtype = torch.float32) -> SAE:
    """Load an SAE in any supported layout; ``fmt`` auto-detects from the files present."""
    path = Path(path)
    if fmt == "auto":
        if (path / "sae_weights.safetensors").exists():
            fmt = "saelens"
        elif (path / "sae.safetensors").exists():
            fmt = "sparsify"
        elif (
            path.suffix in (".npz", ".safetensors")
            or (path / "params.npz").exists()
            or (path / "params.safetensors").exists()
        ):
            fmt = "gemma_scope"
        else:
            raise FileNotFoundError(
                f"{path}: no SAE found (expected sae_weights.safetensors, sae.safetensors, "
                "params.npz or params.safetensors)"
            )
    if fmt == "saelens":
        return load(path, dtype=dtype)
    if fmt == "sparsify":
        return load_sparsify(path, dtype=dtype)
    return load_gemma_scope(path, transcoder=transcoder, dtype=dtype)


def fold_scaling(sae: SAE, scale_in: float, scale_out: float | None = None) -> None:
    """Make an SAE trained on (scale_in · x) -> (scale_out · y) apply to raw x and y.

    pre = (s x - b) W + c = (x - b/s)(s W) + c;  ŷ = (f W_dec + b)/s_out.
    """
    scale_out = scale_in if scale_out is None else scale_out
    if not (math.isfinite(scale_in) and math.isfinite(scale_out)) or scale_in <= 0 or scale_out <= 0:
        raise ValueError(f"scaling factors must be positive and finite, got {scale_in}, {scale_out}")
    with torch.no_grad():
        sae.W_enc_T.mul_(scale_in)
        sae.W_dec.div_(scale_out)
        sae.b_dec.div_(scale_out)
