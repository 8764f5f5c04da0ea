"""Activation extraction and the activation store.

One extraction job per (model, data) cell runs every configured (layer, hook point) site
in a single forward pass that stops after the deepest needed block. Kept tokens (special
tokens and position 0 excluded by default) are written as safetensors shards:

    acts [n, d] (configurable dtype), token_ids [n], sample_idx [n], position [n], in_prompt [n]

plus a ``manifest.json`` per site with shapes, dtype, sha256 per shard and the masking
policy. Shards are planned from the token counts before any forward pass, so a killed job
rerun keeps its finished shards and ends with the same bytes as an uninterrupted run.

With ``activations.cache: false`` only the eval split is written; the train split's shards
are listed in the manifest (``cached: false``) and computed by the model whenever they are
read (``ForwardStore``, through ``open_stores``): same tokens, order and storage dtype as a
cached shard, so results do not depend on the setting, for token counts that do not fit on
disk (each reader pays a forward pass instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ActivationStoreError  # noqa: F401
from .grid import site_dir
from .io import atomic_path, crash_point, file_stamps, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

TL_HOOK_NAMES = {  # TransformerLens / SAELens names of our hook points
    "resid_post": "blocks.{layer}.hook_resid_post",
    "mlp_in": "blocks.{layer}.ln2.hook_normalized",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
}
STATE_FILE = ".extract_state.json"
SPLITS = ("train", "eval")


def hook_name(layer: int, hook: str) -> str:
    return TL_HOOK_NAMES[hook].format(layer=layer)


# --------------------------------------------------------------------------- planning


@dataclass
class Sequence:
    sample_id: int
    split: str
    ids: list[int]
    n_prompt: int
    keep: np.ndarray  # bool per token


@dataclass
class Shard:
    split: str
    index: int
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.safetensors"

    @property
    def n_tokens(self) -> int:
        return int(sum(s.keep.sum() for s in self.sequences))


def tokenize(tokenizer, table, max_length: int, exclude_special: bool, exclude_first: bool) -> list[Sequence]:
    """Token ids of prompt + completion per sample, truncated, with the keep mask."""
    special = set(tokenizer.all_special_ids) if exclude_special else set()
    out = []
    for row in table.itertuples(index=False):
        prompt_text = getattr(row, "prompt_text", "") or ""
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"] if prompt_text else []
        text_ids = tokenizer(str(row.text), add_special_tokens=not prompt_ids)["input_ids"]
        ids = (list(prompt_ids) + list(text_ids))[:max_length]
        keep = np.array([t not in special for t in ids], dtype=bool)
        if exclude_first and len(ids):
            keep[0] = False
        out.append(Sequence(int(row.sample_id), str(row.split), ids, min(len(prompt_ids), max_length), keep))
    return out


def plan_shards(sequences: list[Sequence], shard_tokens: int) -> list[Shard]:
    """Consecutive samples per split, cut once a shard holds ``shard_tokens`` kept tokens."""
    shards: list[Shard] = []
    for split in SPLITS:
        current = Shard(split, 0)
        count = 0
        for seq in (s for s in sequences if s.split == split):
            current.sequences.append(seq)
            count += int(seq.keep.sum())
            if count >= shard_tokens:
                shards.append(current)
                current, count = Shard(split, current.index + 1), 0
        if current.sequences:
            shards.append(current)
    return shards


# --------------------------------------------------------------------------- extraction


def fingerprint(spec: dict, samples_path: Path, model_dir: Path) -> str:
    """What the shards depend on: the job spec, the samples file and the model files."""
    parts = [json.dumps(spec, sort_keys=True), sha256_file(samples_path), *file_stamps(model_dir, recursive=False)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _forward_shard(model, shard: Shard, sites, batch_size: int, pad_id: int, device: str, bar=None) -> dict:
    """Activations of the kept tokens of one shard, per site, in sample order."""
    import torch

    from .models import capture, run_until_stopped

    order = sorted(range(len(shard.sequences)), key=lambda i: -len(shard.sequences[i].ids))  # less padding
    pieces: dict = {site: [None] * len(shard.sequences) for site in sites}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seqs = [shard.sequences[i] for i in rows]
        width = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s.ids)] = torch.tensor(s.ids)
            mask[j, : len(s.ids)] = 1
        with torch.inference_mode(), capture(model, sites) as store:
            run_until_stopped(model, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        for site in sites:
            acts = store[site]
            for j, (i, s) in enumerate(zip(rows, seqs)):
                keep = torch.from_numpy(np.pad(s.keep, (0, width - len(s.ids))))
                pieces[site][i] = acts[j][keep.to(acts.device)].float().cpu()
        if bar is not None:
            bar.update(len(seqs))
    return {site: torch.cat(p) if p else torch.zeros(0) for site, p in pieces.items()}


def _shard_metadata(shard: Shard) -> dict:
    import torch

    token_ids, sample_idx, position, in_prompt = [], [], [], []
    for s in shard.sequences:
        pos = np.nonzero(s.keep)[0]
        token_ids.append(np.asarray(s.ids, dtype=np.int32)[pos])
        sample_idx.append(np.full(len(pos), s.sample_id, dtype=np.int64))
        position.append(pos.astype(np.int32))
        in_prompt.append(pos < s.n_prompt)
    cat = lambda xs, dt: torch.from_numpy(np.concatenate(xs).astype(dt)) if xs else torch.zeros(0)  # noqa: E731
    return {
        "token_ids": cat(token_ids, np.int32),
        "sample_idx": cat(sample_idx, np.int64),
        "position": cat(position, np.int32),
        "in_prompt": cat(in_prompt, np.bool_),
    }


def extract(
    spec: dict,
    model_dir: str | Path,
    samples_path: str | Path,
    out_dir: str | Path,
    place="cpu",
    progress: bool = True,
    loaded=None,
) -> dict[tuple[int, str], Path]:
    """Extract one cell's activations at every site in ``spec``; resume from finished shards.

    spec: {model, data, layers, hook_points, activations: {...}} as in the config.
    place: a models.Placement (device, device map, autocast) or a device name.
    loaded: an already loaded (model, tokenizer) of ``model_dir`` (benchmarks reuse one).
    Returns the manifest path per (layer, hook) site.
    """
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from . import models
    from .progress import bar as progress_bar

    model_dir, samples_path, out_dir = Path(model_dir), Path(samples_path), Path(out_dir)
    opts = spec["activations"]
    sites = [(int(layer), hook) for layer in spec["layers"] for hook in spec["hook_points"]]
    storage = getattr(torch, opts["dtype"])
    out_dir.mkdir(parents=True, exist_ok=True)

    # a rerun keeps finished shards only if they were made from the same inputs
    stamp = fingerprint(spec, samples_path, model_dir)
    state_path = out_dir / STATE_FILE
    if state_path.exists() and read_json(state_path).get("fingerprint") != stamp:
        log.info("inputs changed since the last attempt: discarding its shards")
        for layer, hook in sites:
            for old in (out_dir / site_dir(layer, hook)).glob("*.safetensors"):
                old.unlink()
    write_json(state_path, {"fingerprint": stamp})

    place = models.as_placement(place)
    model, tokenizer = loaded or place.load(model_dir)
    depth = models.n_blocks(model)
    for layer, _ in sites:
        if layer >= depth:
            raise ValueError(f"layer {layer}: model {model_dir} has {depth} blocks (0..{depth - 1})")
    table = pd.read_parquet(samples_path)
    from .data import check_vocabulary

    check_vocabulary(table, tokenizer, str(samples_path), str(model_dir))  # no silent <unk> activations
    sequences = tokenize(
        tokenizer, table, opts["max_length"], opts["exclude_special_tokens"], opts["exclude_first_position"]
    )
    shards = plan_shards(sequences, opts["shard_tokens"])
    d_model = int(model.config.get_text_config().hidden_size)

    def shard_path(layer, hook, shard):
        return out_dir / site_dir(layer, hook) / shard.name

    cache = opts.get("cache", True)
    todo = [
        s
        for s in shards
        if (cache or s.split == "eval") and not all(shard_path(layer, hook, s).exists() for layer, hook in sites)
    ]
    log.info(
        "%s: %d shards (%d already done), %d sites", out_dir.name, len(shards), len(shards) - len(todo), len(sites)
    )
    bar = progress_bar(
        total=sum(len(s.sequences) for s in todo), desc=f"extract {out_dir.name}", unit="seq", enabled=progress
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for shard in todo:
        with place.precision():
            acts = _forward_shard(model, shard, sites, opts["batch_size"], pad_id, place.device, bar)
        meta = _shard_metadata(shard)
        for layer, hook in sites:
            stored = acts[(layer, hook)].to(storage)
            if not torch.isfinite(stored).all():
                bad = int((~torch.isfinite(stored)).any(dim=1).nonzero()[0, 0])
                raise ActivationStoreError(
                    f"{out_dir.name} layer {layer} {hook}: non-finite activation in {opts['dtype']} "
                    f"(sample {int(meta['sample_idx'][bad])}, position {int(meta['position'][bad])}); "
                    "store as float32 or bfloat16"
                )
            target = shard_path(layer, hook, shard)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                save_file({"acts": stored.contiguous(), **meta}, str(tmp))
        crash_point("SAE_DIFF_KILL_AFTER_SHARD", shard.name)  # fault injection for the resume test
    bar.close()

    special_ids = sorted(set(tokenizer.all_special_ids))
    manifests = {}
    for layer, hook in sites:
        folder = out_dir / site_dir(layer, hook)
        entries = []
        for shard in shards:
            entry = {
                "file": shard.name,
                "split": shard.split,
                "n_tokens": shard.n_tokens,
                "n_sequences": len(shard.sequences),
            }
            if cache or shard.split == "eval":
                entry["sha256"] = sha256_file(shard_path(layer, hook, shard))
            else:
                entry["cached"] = False
            entries.append(entry)
        manifest = {
            "format": "sae-diff-activations/1",
            "model": spec["model"],
            "data": spec["data"],
            "cell": out_dir.name,
            "layer": layer,
            "hook_point": hook,
            "hook_name": hook_name(layer, hook),
            "d_model": d_model,
            "dtype": opts["dtype"],
            "n_tokens": {split: sum(e["n_tokens"] for e in entries if e["split"] == split) for split in SPLITS},
            "n_sequences": {split: sum(e["n_sequences"] for e in entries if e["split"] == split) for split in SPLITS},
            "max_length": opts["max_length"],
            # what a reader needs to recompute uncached shards exactly as extraction planned them
            "cache": cache,
            "shard_tokens": opts["shard_tokens"],
            "batch_size": opts["batch_size"],
            "masking": {
                "exclude_special_tokens": opts["exclude_special_tokens"],
                "exclude_first_position": opts["exclude_first_position"],
                "special_token_ids": special_ids,
                "padding": "excluded",
            },
            "fingerprint": stamp,
            "shards": entries,
        }
        write_json(folder / "manifest.json", manifest)
        manifests[(layer, hook)] = folder / "manifest.json"
    return manifests


def write_store(
    folder: str | Path,
    acts,
    split: str = "train",
    shard_tokens: int = 65536,
    dtype: str = "float32",
    layer: int = 0,
    hook: str = "resid_post",
    meta: dict | None = None,
) -> Path:
    """Write given activations [n, d] as a one-split store (outside tools' activations, tests).

    meta: optional per-token token_ids, sample_idx, position, in_prompt (default: each token
    its own sample at position 0).
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    acts = acts.to(getattr(torch, dtype))
    entries = []
    for index, start in enumerate(range(0, len(acts), shard_tokens)):
        part = acts[start : start + shard_tokens].contiguous()
        n = len(part)
        name = f"{split}-{index:05d}.safetensors"
        with atomic_path(folder / name) as tmp:
            columns = {
                "token_ids": torch.zeros(n, dtype=torch.int32),
                "sample_idx": torch.arange(start, start + n, dtype=torch.int64),
                "position": torch.zeros(n, dtype=torch.int32),
                "in_prompt": torch.zeros(n, dtype=torch.bool),
            }
            for key, value in (meta or {}).items():
                columns[key] = torch.as_tensor(value)[start : start + n].to(columns[key].dtype).contiguous()
            save_file({"acts": part, **columns}, str(tmp))
        entries.append(
            {"file": name, "split": split, "n_tokens": n, "n_sequences": n, "sha256": sha256_file(folder / name)}
        )
    write_json(
        folder / "manifest.json",
        {
            "format": "sae-diff-activations/1",
            "model": "",
            "data": "",
            "cell": folder.name,
            "layer": layer,
            "hook_point": hook,
            "hook_name": hook_name(layer, hook),
            "d_model": int(acts.shape[1]),
            "dtype": dtype,
            "n_tokens": {s: (len(acts) if s == split else 0) for s in SPLITS},
            "n_sequences": {s: (len(acts) if s == split else 0) for s in SPLITS},
            "max_length": None,
            "masking": {},
            "fingerprint": "",
            "shards": entries,
        },
    )
    return folder


# --------------------------------------------------------------------------- reading


def buffered_batches(chunks, empty, batch_size: int, shuffle_buffer: int, generator, drop_last: bool) -> Iterator:
    """Batches from a stream of row chunks (one per shard, already in shard order): unshuffled, or
    mixed within a buffer of ``shuffle_buffer`` rows (memory bounded by it). ``empty``: a zero-row
    tensor of the rows' shape and dtype. Shared by single stores and same-token paired stores, so
    both draw the same permutations from ``generator``."""
    import torch

    buffer = empty
    for rows in chunks:
        buffer = torch.cat([buffer, rows])
        if not shuffle_buffer:
            while len(buffer) >= batch_size:
                yield buffer[:batch_size]
                buffer = buffer[batch_size:]
            continue
        if len(buffer) >= shuffle_buffer:
            buffer = buffer[torch.randperm(len(buffer), generator=generator)]
            # emit down to half a buffer so later shards still mix with earlier tokens
            while len(buffer) - batch_size >= shuffle_buffer // 2:
                yield buffer[:batch_size]
                buffer = buffer[batch_size:]
    if shuffle_buffer and len(buffer):
        buffer = buffer[torch.randperm(len(buffer), generator=generator)]
    while len(buffer) >= batch_size or (len(buffer) and not drop_last):
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


class ActivationStore:
    """Read one site's shards: verified, streamed, optionally through a shuffle buffer."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json" if self.folder.is_dir() else self.folder
        if self.folder.is_file():
            self.folder = self.folder.parent
        if not path.exists():
            raise ActivationStoreError(f"{path}: no activation manifest (extraction did not finish?)")
        self.manifest = read_json(path)
        self._verified: set[str] = set()

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def cached(self) -> bool:
        """Whether every shard is on disk (extracted with activations.cache: true)."""
        return all(entry.get("cached", True) for entry in self.manifest["shards"])

    def n_tokens(self, split: str = "train") -> int:
        return int(self.manifest["n_tokens"][split])

    def shards(self, split: str = "train") -> list[dict]:
        return [s for s in self.manifest["shards"] if s["split"] == split]

    def load_shard(self, entry: dict, verify: bool = True) -> dict:
        """One shard's tensors; its bytes are checked against the manifest's sha256 first."""
        from safetensors.torch import load

        path = self.folder / entry["file"]
        if not entry.get("cached", True):
            raise ActivationStoreError(
                f"{path}: not cached (extracted with activations.cache: false); the job reading it must "
                "stream it from the model (activations.open_stores with the model and the samples)"
            )
        if not path.exists():
            raise ActivationStoreError(f"{path}: shard listed in the manifest is missing")
        data = path.read_bytes()
        if verify and entry["file"] not in self._verified:
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ActivationStoreError(
                    f"{path}: sha256 does not match the manifest; the shard is corrupted "
                    "(delete the cell's activations folder and rerun extraction)"
                )
            self._verified.add(entry["file"])
        try:
            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise ActivationStoreError(f"{path}: unreadable shard ({exc})") from None
        finite = tensors["acts"].isfinite().all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise ActivationStoreError(
                f"{path}: non-finite activation in row {row} (sample {int(tensors['sample_idx'][row])})"
            )
        return tensors

    def iter_shards(self, split: str = "train", verify: bool = True, order: list[int] | None = None) -> Iterator[dict]:
        entries = self.shards(split)
        for i in order if order is not None else range(len(entries)):
            yield self.load_shard(entries[i], verify=verify)

    def all(self, split: str = "train", key: str = "acts"):
        """Every kept token of a split at once (for evaluation-sized data)."""
        import torch

        parts = [shard[key] for shard in self.iter_shards(split)]
        return torch.cat(parts) if parts else torch.zeros((0, self.d_model))

    def iter_batches(
        self,
        batch_size: int,
        split: str = "train",
        shuffle_buffer: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        dtype=None,
        paired: "ActivationStore | None" = None,
    ) -> Iterator:
        """Batches of activations. With ``shuffle_buffer`` > 0, shard order is permuted and
        tokens are mixed within a buffer of that many tokens (memory bounded by it).

        paired: another site of the same cell (e.g. MLP output for a transcoder); its
        activations of the same tokens are concatenated on the right of each row.
        """
        import torch

        dtype = dtype or torch.float32
        generator = torch.Generator().manual_seed(seed)
        n_shards = len(self.shards(split))
        order = torch.randperm(n_shards, generator=generator).tolist() if shuffle_buffer else list(range(n_shards))
        width = self.d_model + (paired.d_model if paired is not None else 0)
        others = paired.iter_shards(split, order=order) if paired is not None else None

        def chunks():
            for shard in self.iter_shards(split, order=order):
                rows = shard["acts"].to(dtype)
                if others is not None:
                    other = next(others)
                    if not (
                        torch.equal(other["sample_idx"], shard["sample_idx"])
                        and torch.equal(other["position"], shard["position"])
                    ):
                        raise ActivationStoreError(
                            f"{paired.folder}: tokens differ from {self.folder}; "
                            "paired sites must come from the same extraction"
                        )
                    rows = torch.cat([rows, other["acts"].to(dtype)], dim=1)
                yield rows

        empty = torch.zeros((0, width), dtype=dtype)
        yield from buffered_batches(chunks(), empty, batch_size, shuffle_buffer, generator, drop_last)


# --------------------------------------------------------------------------- streaming (cache: false)


class ShardSource:
    """Computes a cell's shards from its model and samples, every requested site in one forward
    pass; the last shard is kept, so paired sites (a transcoder's input and output) share it."""

    def __init__(
        self,
        manifest: dict,
        model,
        tokenizer,
        samples_path: str | Path,
        place="cpu",
        sites: list[tuple[int, str]] | None = None,
    ):
        import pandas as pd

        from .models import as_placement

        self.model, self.place = model, as_placement(place)
        self.sites = sites or [(int(manifest["layer"]), manifest["hook_point"])]
        masking = manifest["masking"]
        sequences = tokenize(
            tokenizer,
            pd.read_parquet(samples_path),
            manifest["max_length"],
            masking["exclude_special_tokens"],
            masking["exclude_first_position"],
        )
        self.shards = {s.name: s for s in plan_shards(sequences, manifest["shard_tokens"])}
        self.batch_size = int(manifest["batch_size"])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.samples_path = Path(samples_path)
        self._last: tuple[str, dict] | None = None

    def shard(self, entry: dict, site: tuple[int, str], storage) -> dict:
        """The tensors a cached shard file would hold for ``entry`` at ``site``."""
        name = entry["file"]
        planned = self.shards.get(name)
        if planned is None or planned.n_tokens != entry["n_tokens"]:
            raise ActivationStoreError(
                f"{name}: {self.samples_path} no longer tokenizes to the extraction's plan "
                f"({entry['n_tokens']} tokens expected); rerun extraction"
            )
        if self._last is None or self._last[0] != name:
            with self.place.precision():  # the reader's own bar shows progress
                acts = _forward_shard(self.model, planned, self.sites, self.batch_size, self.pad_id, self.place.device)
            self._last = (name, {"acts": acts, "meta": _shard_metadata(planned)})
        tensors = self._last[1]
        return {"acts": tensors["acts"][site].to(storage), **tensors["meta"]}


class ForwardStore(ActivationStore):
    """An ActivationStore whose uncached shards are computed by a ShardSource when read."""

    def __init__(self, folder: str | Path, source: ShardSource):
        super().__init__(folder)
        self.source = source

    def load_shard(self, entry: dict, verify: bool = True) -> dict:
        import torch

        if entry.get("cached", True):
            return super().load_shard(entry, verify)
        site = (int(self.manifest["layer"]), self.manifest["hook_point"])
        return self.source.shard(entry, site, getattr(torch, self.manifest["dtype"]))


def open_stores(
    folders: list, model_dir: str | Path | None = None, samples_path: str | Path | None = None, place="cpu", loaded=None
) -> list[ActivationStore]:
    """Stores for sites of one cell: plain when fully cached, else ForwardStores sharing one
    model and one ShardSource (the model is loaded only then; ``loaded`` reuses one)."""
    plain = [ActivationStore(f) for f in folders]
    if all(store.cached for store in plain):
        return plain
    if model_dir is None or samples_path is None:
        raise ActivationStoreError(
            f"{plain[0].folder}: extracted with activations.cache: false, so reading its train split needs the "
            "model and the samples (pass --model-dir and --samples)"
        )
    from .models import as_placement

    place = as_placement(place)
    model, tokenizer = loaded or place.load(model_dir)
    sites = list(dict.fromkeys((int(s.manifest["layer"]), s.manifest["hook_point"]) for s in plain))
    source = ShardSource(plain[0].manifest, model, tokenizer, samples_path, place, sites)
    return [ForwardStore(store.folder, source) for store in plain]


class SampleSubset(ActivationStore):
    """A view of one split of a store that keeps only the tokens of some samples, and at most
    ``max_tokens`` of them (the first in shard order): a resample of the same data, for the null of
    "nothing changed but the sample" (``nulls``). Other splits read through unchanged."""

    def __init__(self, store: ActivationStore, sample_ids, max_tokens: int | None = None, split: str = "train"):
        import copy

        import torch

        self.base, self.folder, self.split = store, store.folder, split
        self._verified = store._verified
        self.keep = torch.as_tensor(np.unique(np.asarray(sample_ids, dtype=np.int64)))
        remaining = np.inf if max_tokens is None else int(max_tokens)
        self._cap: dict[str, int] = {}
        for entry in store.shards(split):  # one read of the split, to place the token cap
            n = int(torch.isin(store.load_shard(entry)["sample_idx"], self.keep).sum())
            self._cap[entry["file"]] = int(min(n, remaining))
            remaining -= self._cap[entry["file"]]
        manifest = copy.deepcopy(store.manifest)
        manifest["shards"] = [s for s in manifest["shards"] if s["split"] != split or self._cap[s["file"]] > 0]
        manifest["n_tokens"][split] = int(sum(self._cap.values()))
        self.manifest = manifest

    def load_shard(self, entry: dict, verify: bool = True) -> dict:
        import torch

        tensors = self.base.load_shard(entry, verify)
        if entry["split"] != self.split:
            return tensors
        rows = torch.isin(tensors["sample_idx"], self.keep).nonzero()[:, 0][: self._cap[entry["file"]]]
        return {key: value[rows] for key, value in tensors.items()}
