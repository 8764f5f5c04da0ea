"""The demo's prepared SmolLM2 and one of its SAEs, for the benchmarks that need `make run` first."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def model_and_sae(layer: int, cell: str = "M0_D0", sae: str = "topk"):
    """(model, tokenizer, SAE) from results/, with a clear exit when the demo has not run."""
    from sae_diff import models
    from sae_diff.sae import files

    sae_dir = ROOT / "results" / "saes" / cell / f"layer{layer}" / sae
    if not (sae_dir / "sae_weights.safetensors").exists():
        raise SystemExit(f"{sae_dir}: missing; run `make run` first")
    model, tokenizer = models.load(ROOT / "results" / "models" / "M0")
    return model.eval(), tokenizer, files.load(sae_dir)
