"""Preference fine-tuning rounds: Mi's scored generations -> preference pairs -> DPO -> Mi+1.

Pairs are built per prompt from the train split only (the eval prompts stay unseen by
every round); the loss is TRL's ``DPOTrainer``, optionally through a peft LoRA adapter that
is merged back, so every iteration is a plain safetensors HF folder like any other model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .data import select
from .errors import DataError
from .io import atomic_dir, check_replaceable, crash_point, write_parquet

log = logging.getLogger(__name__)

PAIR_COLUMNS = [
    "prompt_id",
    "prompt_text",
    "chosen",
    "rejected",
    "chosen_score",
    "rejected_score",
    "chosen_sample",
    "rejected_sample",
]


def build_pairs(
    samples: pd.DataFrame,
    metric: str,
    direction: str = "up",
    margin: float = 0.0,
    missing: str = "drop",
    max_per_prompt: int | None = None,
    split: str | None = "train",
    where: dict | None = None,
) -> pd.DataFrame:
    """Preference pairs within each prompt: chosen scores better than rejected by more than ``margin``.

    direction: 'up' prefers higher ``metric``, 'down' lower. Ties (difference <= margin) are
    dropped. missing: 'drop' ignores samples whose metric is NaN; 'worst' ranks them below
    every scored sample (so a scored sample beats an unscored one, two unscored ones tie).
    max_per_prompt keeps the pairs with the largest score gaps first (ties broken by sample ids).
    where: only samples of the target population (e.g. {language: [en]}).
    """
    if metric not in samples.columns:
        raise DataError(f"samples: target metric {metric!r} not found; columns are {list(samples.columns)}")
    if direction not in ("up", "down"):
        raise DataError(f"pairs: direction = {direction!r}: expected 'up' or 'down'")
    if missing not in ("drop", "worst"):
        raise DataError(f"pairs: missing = {missing!r}: expected 'drop' or 'worst'")
    table = select(samples, where, "target")
    table = table if split is None else table[table["split"] == split]
    sign = 1.0 if direction == "up" else -1.0
    rows = []
    for prompt_id, group in table.groupby("prompt_id", sort=True):
        values = group[metric].to_numpy(dtype=float) * sign
        if missing == "drop":
            keep = np.isfinite(values)
        else:
            keep = np.ones(len(values), dtype=bool)
            values = np.where(np.isfinite(values), values, -np.inf)
        group, values = group[keep], values[keep]
        texts, ids = group["text"].to_numpy(), group["sample_id"].to_numpy()
        raw = group[metric].to_numpy(dtype=float)
        candidates = []
        for a in range(len(group)):
            for b in range(len(group)):
                # an unscored sample (-inf) never wins; it loses to every scored one
                if not np.isfinite(values[a]) or texts[a] == texts[b]:
                    continue
                gap = values[a] - values[b]
                if gap > margin:
                    candidates.append((-gap, int(ids[a]), int(ids[b]), a, b))
        candidates.sort()
        if max_per_prompt is not None:
            candidates = candidates[:max_per_prompt]
        prompt_text = group["prompt_text"].iloc[0] if len(group) else ""
        for _, _, _, a, b in candidates:
            rows.append(
                {
                    "prompt_id": prompt_id,
                    "prompt_text": prompt_text,
                    "chosen": texts[a],
                    "rejected": texts[b],
                    "chosen_score": raw[a],
                    "rejected_score": raw[b],
                    "chosen_sample": int(ids[a]),
                    "rejected_sample": int(ids[b]),
                }
            )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def _lora_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=spec["r"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=spec["target_modules"],
        task_type="CAUSAL_LM",
    )


def _checkpointing_argument(config_class) -> str:
    """The training-arguments field that turns activation (gradient) checkpointing on."""
    import dataclasses

    names = {field.name for field in dataclasses.fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _callback(log_path: Path):
    """A TrainerCallback writing every logged dict as one JSON line (loss, rewards, margins)."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")
                if "loss" in logs:
                    from .progress import note

                    note(
                        f"DPO step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}",
                        force=state.global_step >= state.max_steps,
                    )

        def on_save(self, args, state, control, **kwargs):
            crash_point("SAE_DIFF_KILL_AFTER_DPO_STEP", str(state.global_step))  # resume test only

    return Callback()


def dpo(
    policy_dir: str | Path,
    reference_dir: str | Path,
    pairs: pd.DataFrame,
    spec: dict,
    out_dir: str | Path,
    place="cpu",
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune the model in ``policy_dir`` on ``pairs`` with TRL's DPOTrainer; save to ``out_dir``.

    spec: beta, learning_rate, steps, batch_size, gradient_accumulation, max_length, seed,
    lora ({enabled, r, alpha, dropout, target_modules}), checkpoint_every (0: none),
    gradient_checkpointing. A rerun after an interruption resumes from the newest checkpoint
    in ``work_dir``. ``place``: a models.Placement or a device name; its autocast decides
    TRL's bf16 mixed precision, its device map is not used (training keeps the model whole).
    Returns the training record (also written as ``dpo.json``).
    """
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from . import models

    if pairs.empty:
        raise DataError(
            f"DPO for {out_dir}: no preference pairs (every prompt's samples tie on the target "
            "metric); generate more samples per prompt, lower pairs.margin or use pairs.missing: worst"
        )
    out_dir = Path(out_dir)
    check_replaceable(out_dir)  # a user's folder at out_dir: an error before the DPO round
    work_dir = Path(work_dir) if work_dir else out_dir.parent / f".{out_dir.name}.dpo-work"
    work_dir.mkdir(parents=True, exist_ok=True)
    place = models.as_placement(place)
    device = place.device
    policy, tokenizer = models.load(policy_dir, device=device)
    reference = None
    if not spec["lora"]["enabled"]:
        reference, _ = models.load(reference_dir, device=device)
    elif Path(reference_dir).resolve() != Path(policy_dir).resolve():
        # with LoRA the reference is the adapter-free policy itself: only Mi can be the reference
        raise DataError(
            f"DPO for {out_dir}: with lora.enabled the reference model must be the policy's own "
            f"base ({policy_dir}), not {reference_dir}; set dpo.reference: previous"
        )
    train = datasets.Dataset.from_pandas(
        pairs.rename(columns={"prompt_text": "prompt"})[["prompt", "chosen", "rejected"]], preserve_index=False
    )
    on_cuda = device.startswith("cuda")
    # transformers 5.24 renamed gradient_checkpointing (removed in v6): pass the name this release has
    checkpointing = {_checkpointing_argument(DPOConfig): spec["gradient_checkpointing"]}
    args = DPOConfig(
        output_dir=str(work_dir),
        beta=spec["beta"],
        learning_rate=spec["learning_rate"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["gradient_accumulation"],
        max_length=spec["max_length"],
        seed=spec["seed"],
        data_seed=spec["seed"],
        logging_steps=1,
        report_to=[],
        save_strategy="steps" if spec["checkpoint_every"] else "no",
        save_steps=spec["checkpoint_every"] or 500,
        save_total_limit=1,
        save_only_model=False,
        bf16=place.autocast == "bf16",
        use_cpu=not on_cuda,
        **checkpointing,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=spec["warmup_steps"],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )
    log_path = work_dir / "dpo_log.jsonl"
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=_lora_config(spec["lora"]) if spec["lora"]["enabled"] else None,
        callbacks=[_callback(log_path)],
    )
    resume = any(work_dir.glob("checkpoint-*"))
    if resume:
        log.info("resuming DPO from %s", max(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])))
    elif log_path.exists():
        log_path.unlink()
    trainer.train(resume_from_checkpoint=resume or None)
    model = trainer.model
    if spec["lora"]["enabled"]:
        model = model.merge_and_unload()
    model = model.to(torch.float32).eval()
    history = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    steps = [h for h in history if "loss" in h]
    record = {
        "n_pairs": int(len(pairs)),
        "steps": spec["steps"],
        "spec": spec,
        "policy": str(policy_dir),
        "reference": str(reference_dir),
        "loss_first": steps[0]["loss"] if steps else None,
        "loss_last": steps[-1]["loss"] if steps else None,
        "reward_accuracy_last": steps[-1].get("rewards/accuracies") if steps else None,
        "resumed": resume,
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info_path = Path(policy_dir) / models.MODEL_INFO
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info.update(
            {
                "model_id": out_dir.name,
                "source": "dpo",
                "parent": str(policy_dir),
                "dpo": record,
                "sha256": models.checksums(Path(tmp)),
            }
        )
        (tmp / models.MODEL_INFO).write_text(json.dumps(info, indent=2, default=str))
        (tmp / "dpo.json").write_text(json.dumps(record, indent=2, default=str))
        if log_path.exists():
            shutil.copy(log_path, tmp / "dpo_log.jsonl")
        write_parquet(pairs, tmp / "pairs.parquet")
    shutil.rmtree(work_dir, ignore_errors=True)
    return record
