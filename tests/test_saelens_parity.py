"""Our reconstruction metrics against SAELens 6.54's own evaluation code, same SAE, same tokens.

SAELens evaluates through a model and an activation store; here a stand-in model returns
the given activations from its cache, all tokens in one batch (SAELens averages its
legacy EV and reconstruction bias per batch; with one batch these are the same numbers).
Runs where sae-lens is importable (bench/.venvs/saelens, see bench/README.md).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sae_diff import evaluate
from sae_diff.sae import files
from sae_diff.sae.model import SAE, SAEConfig

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None, reason="sae-lens is not importable here")

METRICS = (
    "explained_variance",
    "explained_variance_legacy",
    "mse",
    "cossim",
    "l0",
    "l1",
    "l2_ratio",
    "relative_reconstruction_bias",
)


def saelens_metrics(folder, acts: torch.Tensor) -> tuple[dict, dict]:
    from sae_lens import SAE as LensSAE
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = LensSAE.load_from_disk(str(folder), device="cpu")
    hook = sae.cfg.metadata.hook_name

    class Model:  # returns the stored activations of the token "ids" it is given
        def run_with_cache(self, tokens, **_kwargs):
            return None, {hook: acts[tokens]}

    class Store:
        def get_batch_tokens(self, _n):
            return torch.arange(len(acts))[None]

    return get_sparsity_and_variance_metrics(
        sae,
        Model(),
        Store(),
        ActivationScaler(),
        n_batches=1,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=1,
        model_kwargs={},
    )


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_reconstruction_metrics_equal_saelens(tmp_path, arch):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture=arch, d_in=24, d_sae=96, k=8, hook_name="blocks.3.hook_resid_post"))
    sae.initialize(torch.randn(512, 24) + 1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        if arch == "jumprelu":
            sae.log_threshold.fill_(-1.0)
    files.save(sae.eval(), tmp_path / "sae")
    acts = torch.randn(3000, 24) * torch.linspace(0.3, 4.0, 24) + 1.5
    theirs, theirs_features = saelens_metrics(tmp_path / "sae", acts)
    ours = evaluate.reconstruction_metrics(files.load(tmp_path / "sae"), evaluate.tensor_batches(acts, 700))
    for key in METRICS:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
    torch.testing.assert_close(
        torch.as_tensor(ours["feature_density"]).float(),
        torch.tensor(theirs_features["feature_density"]),
        rtol=1e-5,
        atol=1e-7,
    )
