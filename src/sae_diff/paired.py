"""Same-token readers: several models' activations of exactly the same tokens.

The cells M0Di and MiDi extract the same samples of Di with the same tokenizer and masking, so
their stores hold the same tokens in the same order. Same-token methods (crosscoders, diff-SAEs,
the activation-difference lens) need that guarantee row by row; ``PairedStore`` checks it on every
shard it reads (token ids, sample index, position, shard sizes) and stops with the first row that
differs, instead of silently pairing different tokens.

Uncached stores (``activations.cache: false``) are read through ``activations.open_stores`` by the
caller; this module only sees ``ActivationStore`` objects, so streamed shards pair the same way.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .activations import ActivationStore
from .errors import ActivationStoreError

CHECKED_KEYS = ("token_ids", "sample_idx", "position")


def check_manifests(stores: list[ActivationStore]) -> None:
    """Same site, masking, shard plan and token counts in every store (before reading any shard)."""
    if len(stores) < 2:
        raise ActivationStoreError(f"paired activations need two or more stores, got {len(stores)}")
    first = stores[0]
    for other in stores[1:]:
        where = f"{other.folder} vs {first.folder}"
        for key in ("layer", "hook_point", "d_model", "masking", "max_length"):
            if other.manifest.get(key) != first.manifest.get(key):
                raise ActivationStoreError(
                    f"{where}: manifest key {key!r} differs ({other.manifest.get(key)!r} vs "
                    f"{first.manifest.get(key)!r}); paired stores must extract the same site of the same data"
                )
        for split in ("train", "eval"):
            mine = [(s["file"], s["n_tokens"]) for s in first.shards(split)]
            theirs = [(s["file"], s["n_tokens"]) for s in other.shards(split)]
            if mine != theirs:
                raise ActivationStoreError(
                    f"{where}: the {split} split's shards differ (files or token counts: {len(theirs)} shards, "
                    f"{other.n_tokens(split)} tokens vs {len(mine)} shards, {first.n_tokens(split)} tokens); "
                    "were the two cells extracted from the same samples?"
                )


def check_same_tokens(shards: list[dict], stores: list[ActivationStore], name: str) -> None:
    """Raise at the first row whose token id, sample or position differs between the stores."""
    first = shards[0]
    for store, shard in zip(stores[1:], shards[1:]):
        for key in CHECKED_KEYS:
            a, b = first[key], shard[key]
            if a.shape != b.shape or not torch.equal(a, b):
                rows = (a != b).nonzero() if a.shape == b.shape else torch.zeros((1, 1), dtype=torch.long)
                row = int(rows[0, 0])
                raise ActivationStoreError(
                    f"{store.folder}/{name}: {key} differs from {stores[0].folder} at row {row} "
                    f"({b[row].item() if row < len(b) else 'missing'} vs {a[row].item()}); "
                    "paired stores must hold the same tokens in the same order"
                )


class PairedStore:
    """Activations of the same tokens under ``len(stores)`` models, as rows ``[n, n_models, d]``."""

    def __init__(self, stores: list[ActivationStore], names: list[str] | None = None):
        check_manifests(stores)
        self.stores = stores
        self.names = names or [str(s.folder) for s in stores]

    @property
    def n_models(self) -> int:
        return len(self.stores)

    @property
    def folder(self):
        """The last (tuned) model's store folder, for messages that name where the tokens come from."""
        return self.stores[-1].folder

    @property
    def d_model(self) -> int:
        return self.stores[0].d_model

    def n_tokens(self, split: str = "train") -> int:
        return self.stores[0].n_tokens(split)

    def iter_shards(self, split: str = "train", order: list[int] | None = None) -> Iterator[dict]:
        """Per shard: ``acts`` [n, n_models, d] (storage dtype) and the first store's token metadata."""
        entries = self.stores[0].shards(split)
        iterators = [store.iter_shards(split, order=order) for store in self.stores]
        for i in order if order is not None else range(len(entries)):
            shards = [next(it) for it in iterators]
            check_same_tokens(shards, self.stores, entries[i]["file"])
            meta = {key: value for key, value in shards[0].items() if key != "acts"}
            yield {**meta, "acts": torch.stack([s["acts"] for s in shards], 1)}

    def iter_batches(
        self,
        batch_size: int,
        split: str = "train",
        shuffle_buffer: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        dtype=torch.float32,
    ) -> Iterator[torch.Tensor]:
        """Batches [B, n_models, d]; the same shuffling scheme as ``ActivationStore.iter_batches``
        (shard order permuted, tokens mixed in a bounded buffer), applied to whole rows so the models
        of one token stay together."""
        from .activations import buffered_batches

        generator = torch.Generator().manual_seed(seed)
        n_shards = len(self.stores[0].shards(split))
        order = torch.randperm(n_shards, generator=generator).tolist() if shuffle_buffer else list(range(n_shards))
        chunks = (shard["acts"].to(dtype) for shard in self.iter_shards(split, order=order))
        empty = torch.zeros((0, self.n_models, self.d_model), dtype=dtype)
        yield from buffered_batches(chunks, empty, batch_size, shuffle_buffer, generator, drop_last)

    def all(self, split: str = "eval") -> dict:
        """Every token of a split at once: ``acts`` [n, n_models, d] float32 and the token metadata."""
        parts = list(self.iter_shards(split))
        if not parts:
            return {"acts": torch.zeros((0, self.n_models, self.d_model))}
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]} | {
            "acts": torch.cat([p["acts"].float() for p in parts])
        }


class DifferenceStore(ActivationStore):
    """The activation difference ``b − a`` of the same tokens, read like one store (a diff-SAE's input).

    Shards are computed on read from two paired stores, so the existing SAE trainer, evaluation and
    feature statistics run on the difference unchanged. Differences are formed in float32 from the
    stored activations and kept in float32 (the difference of two float16 values is exact in float32).
    """

    def __init__(self, base: ActivationStore, tuned: ActivationStore):
        check_manifests([base, tuned])
        self.base, self.tuned = base, tuned
        self.folder = tuned.folder
        self.manifest = {**tuned.manifest, "dtype": "float32", "difference_of": [str(base.folder), str(tuned.folder)]}
        self._verified = set()

    @property
    def cached(self) -> bool:
        return True  # computed from the two stores, which read (or stream) their own shards

    def load_shard(self, entry: dict, verify: bool = True) -> dict:
        base_entry = next(s for s in self.base.manifest["shards"] if s["file"] == entry["file"])
        a, b = self.base.load_shard(base_entry, verify), self.tuned.load_shard(entry, verify)
        check_same_tokens([a, b], [self.base, self.tuned], entry["file"])
        return {**b, "acts": b["acts"].float() - a["acts"].float()}


def open_pair(
    base_acts, tuned_acts, base_model_dir=None, tuned_model_dir=None, samples=None, place="cpu", tuned_loaded=None
) -> tuple[ActivationStore, ActivationStore]:
    """The base and tuned cells' stores of one site; uncached ones stream from their own model.

    ``tuned_loaded``: the tuned model and tokenizer when the caller has them already (the logit lens)."""
    from .activations import open_stores

    (base,) = open_stores([base_acts], base_model_dir, samples, place)
    (tuned,) = open_stores([tuned_acts], tuned_model_dir, samples, place, loaded=tuned_loaded)
    return base, tuned
