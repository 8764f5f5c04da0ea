"""The intervention experiments as the grid sees them: their kinds, edits and feature choice.

Torch-free on purpose: the Snakefile reads these while it parses (every local run and every
SLURM job step parses it), and ``sae_diff.interventions`` imports torch.
"""

from __future__ import annotations

# noop / ablate / steer / clamp edit SAE features; add / project_out / ablate_matched move the
# activation along a given direction (the baselines and the random-direction null)
EDIT_KINDS = ("noop", "ablate", "steer", "clamp", "add", "project_out", "ablate_matched")
POSITIONS = ("all", "generated", "prompt")
# experiment kind -> (edit it applies, which model it runs in): the seed's design ablates in the
# fine-tuned model and steers the base model
EXPERIMENTS = {"ablation": ("ablate", "iteration"), "steering": ("steer", "base"), "clamping": ("clamp", "base")}
SWEPT = ("steering", "clamping")  # experiments with an alpha grid
# the comparison methods every SAE edit is reported beside (the AxBench lesson: simple methods first).
# Those with a direction (conditions.comparison_conditions: steered at the SAE edit's size, or
# mean-ablated): the probe's difference in means, the activation-difference lens, the crosscoder's
# Mi-only latents, the diff-SAE's latents behind the metric; prompting edits the prompt instead
# (steering only)
DIRECTION_COMPARISONS = ("diffmean", "adl", "crosscoder", "diff_sae")
COMPARISONS = DIRECTION_COMPARISONS + ("prompting",)


def check_directions(directions: dict) -> None:
    """Refuse comparison directions named outside ``DIRECTION_COMPARISONS``."""
    unknown = set(directions) - set(DIRECTION_COMPARISONS)
    if unknown:
        raise ValueError(f"comparison directions {sorted(unknown)}: expected some of {DIRECTION_COMPARISONS}")


def selection_method(opts: dict, experiment: str) -> str:
    """How an experiment's features are chosen: ``probe`` or ``attribution``."""
    select = opts.get("select", "probe")
    method = select.get(experiment, "probe") if isinstance(select, dict) else select
    if method not in ("probe", "attribution"):
        raise ValueError(f"interventions.select.{experiment} = {method!r}: expected probe or attribution")
    return method
