"""Sample tables: prompt sets, generation through a model, user tables, train/eval split.

Every data set ends up as one table with one row per sample:
``sample_id, prompt, prompt_text, text, split`` plus group columns (language, profession,
...) and, after scoring, metric columns. ``prompt_text`` is the exact string fed to the
model before the completion (chat template applied); ``text`` is the completion.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError  # noqa: F401

log = logging.getLogger(__name__)

BASE_COLUMNS = ["sample_id", "prompt_id", "prompt", "prompt_text", "text", "split"]


# --------------------------------------------------------------------------- prompts


def load_prompts(path: str | Path, max_prompts: int | None = None) -> pd.DataFrame:
    """Read a prompt set: a YAML of templates x fillers per language, or a text file.

    YAML form::

        pair_key: profession             # fills that mean the same across languages
        languages:
          en:
            templates: ["Write one sentence about a {profession}."]
            fillers: {profession: [nurse, pilot]}

    Returns one row per prompt with ``prompt_id``, ``prompt`` and group columns
    (``language``, ``template``, and each filler name, in its first language's form).
    """
    import yaml

    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        with open(path) as fh:
            spec = yaml.safe_load(fh)
        if not isinstance(spec, dict) or "languages" not in spec:
            raise DataError(f"{path}: expected a mapping with a 'languages' key")
        pair_key = spec.get("pair_key")
        rows = []
        reference: dict[str, list] = {}
        for language, block in spec["languages"].items():
            for key in ("templates", "fillers"):
                if key not in (block or {}):
                    raise DataError(f"{path}: languages.{language}: missing key '{key}'")
            fillers = block["fillers"]
            names = list(fillers)
            size = len(fillers[names[0]]) if names else 0
            for name in names:
                expected = len(reference.setdefault(name, fillers[name]))
                if len(fillers[name]) != size or len(fillers[name]) != expected:
                    raise DataError(
                        f"{path}: languages.{language}.fillers.{name}: expected {expected} values, "
                        "aligned with the other fillers and the first language"
                    )
            for t_index, template in enumerate(block["templates"]):
                for i in range(size):
                    try:
                        prompt = template.format(**{name: fillers[name][i] for name in names})
                    except KeyError as exc:
                        raise DataError(f"{path}: template {template!r} uses unknown filler {exc}") from None
                    row = {"prompt": prompt, "language": language, "template": t_index}
                    # group columns carry the first language's value so translations pair up
                    row.update({name: reference[name][i] for name in names})
                    if pair_key:
                        row["pair_id"] = f"{reference[pair_key][i]}#{t_index}"
                    rows.append(row)
        prompts = pd.DataFrame(rows)
    else:
        lines = [line.strip() for line in path.read_text().splitlines()]
        prompts = pd.DataFrame({"prompt": [line for line in lines if line and not line.startswith("#")]})
    if prompts.empty:
        raise DataError(f"{path}: no prompts found")
    if max_prompts is not None:
        prompts = prompts.iloc[:max_prompts]
    prompts.insert(0, "prompt_id", np.arange(len(prompts)))
    return prompts.reset_index(drop=True)


def format_prompt(tokenizer, prompt: str, chat_template: bool, system_prompt: str | None = None) -> str:
    """The prompt as the model sees it. ``system_prompt``: None keeps the template's own default
    (SmolLM2 adds a 16-token one), a string (even empty) replaces it."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt


# --------------------------------------------------------------------------- generation


def generate(
    model,
    tokenizer,
    prompts: pd.DataFrame,
    sampling: dict,
    device: str = "cpu",
    progress: bool = True,
    keep_ids: bool = False,
    desc: str = "generate",
) -> pd.DataFrame:
    """Generate ``n_per_prompt`` completions per prompt, in batches, reproducibly.

    Each batch reseeds from (seed, batch index), so a fixed config gives the same texts
    whatever ran before (and whatever hooks are on the model: interventions compare
    conditions on the same random draws). ``keep_ids`` adds the completion's token ids
    (up to the first EOS), for token-exact comparisons.
    """
    import torch

    from .progress import bar

    rows = []
    by = sampling.get("n_per_prompt_by")
    for _, prompt in prompts.iterrows():
        count = sampling["n_per_prompt"]
        if by is not None:
            if by["column"] not in prompt.index:
                raise DataError(
                    f"sampling.n_per_prompt_by.column = {by['column']!r}: not a prompt column; "
                    f"columns are {list(prompt.index)}"
                )
            count = by["counts"].get(str(prompt[by["column"]]), count)
        for n in range(count):
            row = prompt.to_dict()
            row["n"] = n
            row["prompt_text"] = format_prompt(
                tokenizer, prompt["prompt"], sampling["chat_template"], sampling.get("system_prompt")
            )
            rows.append(row)
    tokenizer.padding_side = "left"
    gen_kwargs = dict(
        max_new_tokens=sampling["max_new_tokens"],
        do_sample=sampling["do_sample"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if sampling["do_sample"]:
        gen_kwargs.update(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    batch_size = sampling["batch_size"]
    batches = range(0, len(rows), batch_size)
    for b_index, start in enumerate(bar(batches, desc=desc, enabled=progress)):
        batch = rows[start : start + batch_size]
        # prompt_text is always tokenized with the tokenizer's own special tokens (BOS where it
        # adds one), exactly as activation extraction tokenizes it later
        enc = tokenizer([r["prompt_text"] for r in batch], return_tensors="pt", padding=True, add_special_tokens=True)
        enc = {k: v.to(device) for k, v in enc.items()}
        torch.manual_seed(sampling["seed"] * 1_000_003 + b_index)
        with torch.inference_mode():
            out = model.generate(**enc, **gen_kwargs)
        completions = out[:, enc["input_ids"].shape[1] :]
        for row, ids in zip(batch, completions):
            row["text"] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if keep_ids:
                ids = ids.tolist()
                if tokenizer.eos_token_id in ids:  # what follows EOS is padding
                    ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
                row["completion_ids"] = ids
    table = pd.DataFrame(rows)
    table.insert(0, "sample_id", np.arange(len(table)))
    return table


# --------------------------------------------------------------------------- tables


def _read_any(path: Path, fmt: str) -> pd.DataFrame:
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {
            ".csv": "csv",
            ".tsv": "csv",
            ".parquet": "parquet",
            ".pq": "parquet",
            ".jsonl": "jsonl",
            ".json": "jsonl",
            ".fasta": "fasta",
            ".fa": "fasta",
            ".faa": "fasta",
        }.get(suffix)
        if fmt is None:
            raise DataError(
                f"{path}: cannot tell the format from suffix {suffix!r}; "
                "expected .csv, .parquet, .jsonl or .fasta, or set format"
            )
    try:
        if fmt == "csv":
            return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", encoding="utf-8")
        if fmt == "parquet":
            return pd.read_parquet(path)
        if fmt == "jsonl":
            return pd.read_json(path, lines=True)
        from Bio import SeqIO

        records = list(SeqIO.parse(str(path), "fasta"))
        if not records:
            raise DataError(f"{path}: no FASTA records found")
        return pd.DataFrame(
            {
                "id": [r.id for r in records],
                "description": [r.description for r in records],
                "text": [str(r.seq) for r in records],
            }
        )
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text at {_first_bad_utf8(path)}; save the file as UTF-8") from None
    except (ValueError, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: could not read as {fmt} ({str(exc).splitlines()[0]})") from None


def _first_bad_utf8(path: Path) -> str:
    """Where a file's first byte that is not UTF-8 sits: its line (line 1 is a CSV's header, so
    data row r, counted from 0 as in every other message, is line r + 2) and byte in that line
    (the reader's own error gives an offset into whatever chunk it was decoding)."""
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (
                f"line {number} (data row {number - 2} for a CSV with a header), byte {exc.start + 1} of "
                f"that line ({line[exc.start : exc.start + 1]!r})"
            )
    return "an unknown place"


def check_table(
    table: pd.DataFrame, path: Path, text_column: str, metric_columns: list[str], non_finite: str = "error"
) -> pd.DataFrame:
    """Stop at the door on what would crash or mislead a later stage: no rows, text cells that are
    missing, empty or not text, metric cells that are not numbers or not finite (each named by
    column, count and first row). ``non_finite: drop`` drops those rows instead, with a count."""
    if table.empty:
        raise DataError(f"{path}: no rows (a header without data?); expected at least one sample")
    text = table["text"]
    bad = text.map(lambda v: not isinstance(v, str) or not v.strip())
    if bad.any():
        rows = list(table.index[bad][:5])
        raise DataError(
            f"{path}: column {text_column!r}: {int(bad.sum())} of {len(table)} rows have no text "
            f"(missing, empty or not a string), first rows {rows}; expected text in every row"
        )
    for column in metric_columns:
        values = pd.to_numeric(table[column], errors="coerce")
        unreadable = values.isna() & table[column].notna()
        if unreadable.any():
            row = int(table.index[unreadable][0])
            raise DataError(
                f"{path}: column {column!r}: {int(unreadable.sum())} values are not numbers, first "
                f"{table[column][row]!r} in row {row}; expected numbers"
            )
        table[column] = values.astype(float)
        infinite = ~np.isfinite(table[column].to_numpy())
        if infinite.any():
            rows = list(table.index[infinite][:5])
            if non_finite != "drop":
                raise DataError(
                    f"{path}: column {column!r}: {int(infinite.sum())} values are missing, NaN or "
                    f"infinite, first rows {rows}; fill them or set non_finite: drop"
                )
            log.warning(
                "%s: column %r: dropped %d rows whose value is missing, NaN or infinite (first rows %s)",
                path,
                column,
                int(infinite.sum()),
                rows,
            )
            table = table[~infinite]
            if table.empty:
                raise DataError(f"{path}: column {column!r}: no row is left after dropping the non-finite values")
    table = table.reset_index(drop=True)
    table["sample_id"] = np.arange(len(table))
    return table


def load_table(spec: dict) -> pd.DataFrame:
    """Read a user table into the sample-table form."""
    path = Path(spec["path"])
    raw = _read_any(path, spec["format"])
    needed = [spec["text_column"], *spec["group_columns"], *spec["metric_columns"]]
    for key in ("prompt_column", "id_column"):
        if spec.get(key):
            needed.append(spec[key])
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: column {missing[0]!r} not found; columns are {list(raw.columns)}")
    if spec.get("max_samples"):
        raw = raw.iloc[: spec["max_samples"]]
    table = pd.DataFrame(
        {
            "sample_id": np.arange(len(raw)),
            "prompt_id": raw[spec["id_column"]].astype(str).to_numpy()
            if spec.get("id_column")
            else np.arange(len(raw)),
            "prompt": raw[spec["prompt_column"]].astype(str).to_numpy() if spec.get("prompt_column") else "",
            "text": raw[spec["text_column"]].astype(str).to_numpy(),
        }
    )
    table["prompt_text"] = table["prompt"]
    table["text"] = raw[spec["text_column"]].to_numpy()  # as read: check_table names non-text cells
    for column in [*spec["group_columns"], *spec["metric_columns"]]:
        table[column] = raw[column].to_numpy()
    return check_table(table, path, spec["text_column"], spec["metric_columns"], spec.get("non_finite", "error"))


def unknown_characters(tokenizer, text: str) -> list[str]:
    """The characters of ``text`` that ``tokenizer`` reads as its unknown token (none for
    byte-level BPE tokenizers; a character vocabulary misses whatever is not in its alphabet)."""
    unk = tokenizer.unk_token_id
    if unk is None or not text:
        return []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [span for token, span in zip(encoded["input_ids"], encoded["offset_mapping"]) if token == unk]
    return list(dict.fromkeys(text[a:b] or "?" for a, b in spans if text[a:b] != tokenizer.unk_token))


def check_vocabulary(table: pd.DataFrame, tokenizer, source: str, model: str) -> None:
    """Stop when a text holds characters the model's tokenizer cannot read (they would silently
    become <unk> in every activation): name the sample, its row and the characters."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    for column in ("prompt_text", "text"):
        if column not in table.columns:
            continue
        texts = table[column].astype(str).tolist()
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # one batched pass; offsets only where needed
        for row in (r for r, seq in enumerate(ids) if unk in seq):
            missing = unknown_characters(tokenizer, texts[row])
            if missing:
                raise DataError(
                    f"{source}: row {row} (sample {table['sample_id'].iloc[row]}), column {column!r}: characters "
                    f"{missing} are not in the vocabulary of {model}'s tokenizer (they would be read as "
                    f"{tokenizer.unk_token}); expected only characters the model knows"
                )


def assign_split(table: pd.DataFrame, eval_fraction: float, seed: int) -> pd.DataFrame:
    """Mark a seeded random ``eval_fraction`` of the prompts 'eval', the rest 'train'.

    Whole prompts are split, so the samples of one prompt never sit on both sides (preference
    pairs and probes are fit on train prompts and judged on unseen ones).
    """
    groups = table["prompt_id"].to_numpy() if "prompt_id" in table.columns else np.arange(len(table))
    unique, index = np.unique(groups, return_inverse=True)
    n_eval = int(round(len(unique) * eval_fraction))
    if eval_fraction > 0 and len(unique) > 1:
        n_eval = min(max(n_eval, 1), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    is_eval = np.zeros(len(unique), dtype=bool)
    is_eval[order[:n_eval]] = True
    table = table.copy()
    table["split"] = np.where(is_eval[index], "eval", "train").astype(object)
    return table


def select(table: pd.DataFrame, where: dict | None, source: str) -> pd.DataFrame:
    """The rows whose columns take one of the listed values (``where: {template: [2]}``);
    values compare as text, so 2 and "2" are the same template."""
    for column, values in (where or {}).items():
        if column not in table.columns:
            raise DataError(f"{source}: where.{column}: no such column; columns are {list(table.columns)}")
        table = table[table[column].astype(str).isin([str(v) for v in values])]
    return table


def select_prompts(prompts: pd.DataFrame, where: dict | None, source: str) -> pd.DataFrame:
    """The prompts ``where`` keeps; none left is an error."""
    prompts = select(prompts, where, source)
    if prompts.empty:
        raise DataError(f"{source}: where = {where}: no prompt is left")
    return prompts.reset_index(drop=True)


def order_columns(table: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in BASE_COLUMNS if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def make(
    spec: dict, split: dict, model_dir: str | Path | None = None, place="cpu", progress: bool = True
) -> pd.DataFrame:
    """Build one data set's sample table from its config block (``place``: a models.Placement
    or a device name); ``model_dir``: the prepared folder of the generating model."""
    if spec["source"] == "table":
        table = load_table(spec)
    else:
        from . import models

        place = models.as_placement(place)
        if model_dir is None:
            raise ValueError(f"data source generate (model {spec['model']}): give the model's prepared folder")
        model, tokenizer = place.load(Path(model_dir))
        prompts = select_prompts(load_prompts(spec["prompts"]), spec.get("where"), spec["prompts"])
        if spec.get("max_prompts"):
            prompts = prompts.iloc[: spec["max_prompts"]]
        prompts["prompt_id"] = np.arange(len(prompts))
        with place.precision():
            table = generate(model, tokenizer, prompts, spec["sampling"], device=place.device, progress=progress)
        table["generator"] = spec["model"]
    return order_columns(assign_split(table, split["eval_fraction"], split["seed"]))


def describe(table: pd.DataFrame) -> dict:
    return {
        "n_samples": int(len(table)),
        "n_train": int((table["split"] == "train").sum()),
        "n_eval": int((table["split"] == "eval").sum()),
    }


def example_rows(table: pd.DataFrame, n: int = 3) -> list[dict]:
    """The first ``n`` (prompt, completion) pairs, for summaries and reports."""
    return json.loads(table.head(n)[["prompt", "text"]].to_json(orient="records"))
