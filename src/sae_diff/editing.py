"""How an SAE edit is applied inside the model: ablate, steer or clamp features at one layer,
by a forward hook, on every forward of ``generate``.

Every edit is a correction added to the model's own activation x at the SAE's hook point:

    ablation   x' = x - sum_j f_j(x) d_j
    clamping   x' = x + sum_j (v_j - f_j(x)) d_j
    steering   x' = x + sum_j c_j d_j                 (c_j = alpha * s_j, s_j a typical activation)

and, for the baselines and the null that every SAE edit is compared with, three edits along a
given direction v instead of SAE features:

    add             x' = x + v                        (difference-in-means steering; a random direction)
    project_out     x' = x - (x.u - m) u, u = v/|v|   (the difference in means mean-ablated: its
                                                       projection set to m, its mean over the
                                                       prompts; m = 0 projects it out)
    ablate_matched  x' = x + |sum_j f_j(x) d_j| u     (a random direction u moved by exactly as much, at
                                                       each position, as ablating the features would)

which is the SAE's edited reconstruction spliced in with its error term kept
(x' = x_hat(f') + (x - x_hat(f))), written so that nothing is rounded twice: the no-op splice
(the SAE runs, nothing changes) adds an exact zero, so it reproduces unhooked greedy
generation token for token. Hooks run on every forward of ``generate``, so the KV cache is
kept: the prompt is edited once in the prefill and each new token as it is generated.

Which features are edited, and under which conditions, is ``sae_diff.conditions``; what the
edits did, ``sae_diff.effects``; the experiment that runs them all, ``sae_diff.interventions``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .experiments import EDIT_KINDS, POSITIONS
from .sae.model import SAE


@dataclass(frozen=True)
class Edit:
    """What to do to the features at each edited position.

    ``values``: per feature, the steering coefficient c_j (steer) or the clamped activation
    v_j (clamp); for project_out, the projection m it sets (default 0); unused by ablate and
    noop. ``direction``: the vector v of add, project_out and ablate_matched (a unit vector for
    the last). ``positions``: ``all`` (prompt and every generated
    token), ``generated`` (new tokens only; the prompt's prefill is left alone) or ``prompt``
    (the prefill only: what the model reads before it writes, whose cached keys and values
    carry the edit into every later token).
    """

    kind: str
    features: tuple[int, ...] = ()
    values: tuple[float, ...] = ()
    positions: str = "all"
    direction: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"edit kind {self.kind!r}: expected one of {EDIT_KINDS}")
        if self.positions not in POSITIONS:
            raise ValueError(f"edit positions {self.positions!r}: expected one of {POSITIONS}")
        if self.kind == "project_out" and len(self.values) > 1:
            raise ValueError(f"project_out: one value (the projection it sets), got {len(self.values)}")
        if self.kind in ("steer", "clamp") and len(self.values) != len(self.features):
            raise ValueError(f"{self.kind}: {len(self.features)} features but {len(self.values)} values")
        if (self.kind in ("add", "project_out", "ablate_matched")) != (self.direction is not None):
            raise ValueError(f"{self.kind}: a direction goes with add, project_out and ablate_matched only")


def feature_acts(sae: SAE, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Activations of the given features, [n, len(features)], as ``sae.encode(x)[:, features]``.

    TopK needs every pre-activation (a feature fires only inside the top k); ReLU and
    JumpReLU need just the chosen encoder rows.
    """
    arch = sae.cfg.architecture
    if arch == "topk":
        pre = sae.encode_pre(x)
        kth = pre.topk(sae.cfg.k, dim=-1).values[:, -1:]
        chosen = pre[:, features]
        return torch.where(chosen >= kth, chosen.clamp_min(0), torch.zeros_like(chosen))
    if arch in ("relu", "jumprelu"):
        pre = torch.addmm(sae.b_enc[features], sae._centered(x), sae.W_enc_T[features].t())
        if arch == "relu":
            return torch.relu(pre)
        return pre * (pre > sae.log_threshold.exp()[features])
    return sae.encode(x)[:, features]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, value):
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


def editor(sae: SAE, edit: Edit, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The edit as a function of one activation tensor [..., d] (what the hook applies)."""
    sae = sae.to(device)
    dtype = sae.W_dec.dtype  # the edit is computed in the SAE's precision, added in the model's
    idx = torch.tensor(edit.features, dtype=torch.long, device=device)
    rows = sae.W_dec.detach()[idx]  # [n_features, d]
    values = torch.tensor(edit.values, dtype=dtype, device=device)
    vector = None if edit.direction is None else torch.tensor(edit.direction, dtype=dtype, device=device)
    steer = values @ rows if edit.kind == "steer" else vector if edit.kind == "add" else None  # constant

    def apply(x: torch.Tensor) -> torch.Tensor:
        if steer is not None:
            return x + steer.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        if edit.kind == "noop":
            sae.encode(flat)  # the SAE runs (the splice's cost); its exact-zero correction is skipped
            return x
        if edit.kind == "project_out":
            unit = vector / vector.norm()
            level = float(edit.values[0]) if edit.values else 0.0
            return x - (((flat @ unit) - level)[:, None] * unit).reshape(x.shape).to(x.dtype)
        acts = feature_acts(sae, flat, idx)
        if edit.kind == "ablate_matched":
            size = (acts @ rows).norm(dim=-1, keepdim=True)  # what ablating the features would move
            return x + (size * vector).reshape(x.shape).to(x.dtype)
        target = torch.zeros_like(acts) if edit.kind == "ablate" else values.expand_as(acts)
        return x + ((target - acts) @ rows).reshape(x.shape).to(x.dtype)

    return apply


class EditLog:
    """How far an edit moved the activation: the mean |x' - x| over the positions it changed
    (``mean_norm``), over how many positions it ran (``positions``) and changed (``edited``)."""

    def __init__(self) -> None:
        self.positions = 0
        self.edited = 0
        self.total = 0.0

    def add(self, before: torch.Tensor, after: torch.Tensor) -> None:
        norms = (after.detach().double() - before.detach().double()).norm(dim=-1).reshape(-1)
        self.positions += int(norms.numel())
        self.edited += int((norms > 0).sum())
        self.total += float(norms.sum())

    @property
    def mean_norm(self) -> float | None:
        return self.total / self.edited if self.edited else None

    def as_dict(self) -> dict:
        return {"delta_norm": self.mean_norm, "positions": self.positions, "edited_positions": self.edited}


@contextlib.contextmanager
def intervene(model, sae: SAE, layer: int, hook: str, edit: Edit):
    """Apply ``edit`` at (layer, hook) on every forward of ``model`` inside the block; the block
    gets an ``EditLog`` of how far the edit moved the activation."""
    from . import models

    apply = editor(sae, edit, models.site_device(model, layer, hook))
    prefill = PrefillTracker()
    moved = EditLog()

    def edit_output(_module, _inputs, output):
        if edit.positions != "all" and (edit.positions == "prompt") != prefill.now:
            return output
        x = _first(output)
        edited = apply(x)
        moved.add(x, edited)
        return output if edited is x else _replace_first(output, edited)

    handle = models.hook_module(model, layer, hook).register_forward_hook(edit_output)
    try:
        with torch.no_grad(), prefill.track(model) if edit.positions != "all" else contextlib.nullcontext():
            yield moved
    finally:
        handle.remove()


class PrefillTracker:
    """Tells whether the model's current forward reads the prompt (the prefill) or decodes.

    A counter reset per ``generate`` call: the first forward of a call is its prefill, every later
    one a decoding step; a forward outside ``generate`` reads its whole input, like a prefill.
    This relies on nothing but ``generate`` and the forward being called, not on what transformers
    passes to the forward (the cache's keyword, ``cache_position`` and the attention mask all
    changed or vanished across releases: 5.24 passes ``cache=`` and no mask when nothing is padded).
    It assumes one forward reads the whole prompt, as plain ``generate`` does; a chunked prefill
    (``prefill_chunk_size``) or assisted decoding would need another rule.
    """

    def __init__(self) -> None:
        self.calls: int | None = None  # forwards so far in the running generate call; None outside
        self.now = True

    def _on_forward(self, _module, _args) -> None:
        self.now = self.calls is None or self.calls == 0
        if self.calls is not None:
            self.calls += 1

    @contextlib.contextmanager
    def track(self, model):
        original = model.generate  # the bound method; an instance attribute shadows it below

        @functools.wraps(original)
        def generate(*args, **kwargs):
            outer, self.calls = self.calls, 0
            try:
                return original(*args, **kwargs)
            finally:
                self.calls = outer

        shadowed = vars(model).get("generate")
        model.generate = generate
        handle = model.register_forward_pre_hook(self._on_forward)
        try:
            yield self
        finally:
            handle.remove()
            if shadowed is None:
                del model.generate
            else:
                model.generate = shadowed
