"""Per-sample metrics, named in the config and looked up in a registry.

Each scorer takes the sample table and returns a frame of new metric columns, one row per
sample. Register a new one with ``@register("name")``; the config schema lists the names.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .errors import ScorerError  # noqa: F401

REGISTRY: dict[str, Callable[..., pd.DataFrame]] = {}
METRICS: dict[str, tuple[str, ...]] = {}  # the columns each scorer writes (command: its config says)


log = logging.getLogger(__name__)


def register(name: str, metrics: tuple[str, ...] = ()):
    def wrap(fn):
        REGISTRY[name] = fn
        METRICS[name] = metrics
        return fn

    return wrap


def metric_names(scorers: list[dict]) -> list[str]:
    """Every metric column the configured scorers will write, in order."""
    names = []
    for spec in scorers:
        names += list(spec["metrics"]) if spec["name"] == "command" else list(METRICS.get(spec["name"], ()))
    return names


def metric_columns(scorers: list[dict], data: dict) -> list[str]:
    """Every metric column the samples carry: the scorers' and then the user's tables' own
    (``data.<id>.metric_columns``), each once."""
    names = metric_names(scorers)
    return names + list(dict.fromkeys(c for d in data.values() for c in d.get("metric_columns", []) if c not in names))


# --------------------------------------------------------------------------- text

# Pronouns and unambiguously gendered nouns. French possessives (son, sa) agree with the
# possessed noun, not the person, so they are left out.
GENDER_WORDS = {
    "en": {
        "male": {
            "he",
            "him",
            "his",
            "himself",
            "man",
            "men",
            "boy",
            "boys",
            "father",
            "fathers",
            "son",
            "sons",
            "husband",
            "brother",
            "brothers",
            "mr",
            "sir",
            "gentleman",
            "gentlemen",
            "male",
            "king",
            "uncle",
            "nephew",
            "grandfather",
            "boyfriend",
        },
        "female": {
            "she",
            "her",
            "hers",
            "herself",
            "woman",
            "women",
            "girl",
            "girls",
            "mother",
            "mothers",
            "daughter",
            "daughters",
            "wife",
            "sister",
            "sisters",
            "mrs",
            "ms",
            "madam",
            "lady",
            "ladies",
            "female",
            "queen",
            "aunt",
            "niece",
            "grandmother",
            "girlfriend",
        },
    },
    "fr": {
        "male": {
            "il",
            "ils",
            "lui",
            "homme",
            "hommes",
            "garçon",
            "garçons",
            "père",
            "fils",
            "mari",
            "frère",
            "frères",
            "monsieur",
            "messieurs",
            "oncle",
            "neveu",
        },
        "female": {
            "elle",
            "elles",
            "femme",
            "femmes",
            "fille",
            "filles",
            "mère",
            "épouse",
            "sœur",
            "sœurs",
            "madame",
            "mesdames",
            "tante",
            "nièce",
        },
    },
}
_WORD = re.compile(r"[a-zà-ÿœæ]+")


def count_gender_words(text: str, language: str = "en") -> tuple[int, int]:
    words = _WORD.findall(str(text).lower().replace("’", "'"))
    lexicon = GENDER_WORDS.get(language, GENDER_WORDS["en"])
    male = sum(w in lexicon["male"] for w in words)
    female = sum(w in lexicon["female"] for w in words)
    return male, female


@register("gender_pronouns", ("male_count", "female_count", "female_ratio"))
def gender_pronouns(table: pd.DataFrame, language_column: str = "language") -> pd.DataFrame:
    """male_count, female_count and female_ratio = female / (male + female), NaN when none; and
    gender (female, male, mixed or none) for grouping."""
    languages = table[language_column] if language_column in table.columns else pd.Series("en", index=table.index)
    counts = [count_gender_words(t, lang) for t, lang in zip(table["text"], languages)]
    male = np.array([c[0] for c in counts], dtype=np.int64)
    female = np.array([c[1] for c in counts], dtype=np.int64)
    total = male + female
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(total > 0, female / np.maximum(total, 1), np.nan)
    # a categorical group column (not a metric): which gender the text's words lean to
    gender = np.where(female > male, "female", np.where(male > female, "male", np.where(male > 0, "mixed", "none")))
    return pd.DataFrame(
        {"male_count": male, "female_count": female, "female_ratio": ratio, "gender": gender}, index=table.index
    )


@register("length", ("n_chars", "n_words"))
def length(table: pd.DataFrame) -> pd.DataFrame:
    texts = table["text"].astype(str)
    return pd.DataFrame(
        {
            "n_chars": texts.str.len().astype(np.int64),
            "n_words": texts.str.split().str.len().fillna(0).astype(np.int64),
        },
        index=table.index,
    )


# --------------------------------------------------------------------------- protein

STANDARD_AA = set("ACDEFGHIKLMNPQRSTVWY")


def read_fasta(path: str | Path, alphabet: str | None = None) -> list[tuple[str, str]]:
    """(id, sequence) per record; with ``alphabet``, a letter outside it is an error naming the
    file, the record and the letter (the aligner's own error names neither)."""
    from Bio import SeqIO

    records = [(r.id, str(r.seq).upper()) for r in SeqIO.parse(str(path), "fasta")]
    if not records:
        raise ScorerError(f"{path}: no FASTA records found")
    for number, (name, seq) in enumerate(records, start=1):
        bad = sorted(set(seq) - set(alphabet)) if alphabet is not None else []
        if bad:
            raise ScorerError(
                f"{path}: record {number} ({name!r}): letters {bad} are not in the alphabet of the "
                f"substitution matrix ({alphabet}); expected protein sequences in that alphabet"
            )
    return records


def matrix_alphabet(substitution_matrix: str = "BLOSUM62") -> str:
    from Bio.Align import substitution_matrices

    return substitution_matrices.load(substitution_matrix).alphabet


def make_aligner(
    mode: str = "global",
    substitution_matrix: str = "BLOSUM62",
    open_gap_score: float = -10.0,
    extend_gap_score: float = -0.5,
):
    from Bio.Align import PairwiseAligner, substitution_matrices

    aligner = PairwiseAligner()
    aligner.mode = mode
    aligner.substitution_matrix = substitution_matrices.load(substitution_matrix)
    aligner.open_gap_score = open_gap_score
    aligner.extend_gap_score = extend_gap_score
    return aligner


def alignment_identity(aligner, query: str, reference: str) -> float:
    """Identical columns / alignment columns (identities + mismatches + gaps) of the best alignment."""
    if not query or not reference:
        return float("nan")
    counts = aligner.align(query, reference)[0].counts()
    columns = counts.identities + counts.mismatches + counts.gaps
    return counts.identities / columns if columns else float("nan")


def _clean_protein(text: str) -> str:
    return "".join(ch for ch in str(text).upper() if ch.isalpha())


@register("protein_identity", ("identity",))
def protein_identity(
    table: pd.DataFrame,
    reference: str,
    mode: str = "global",
    substitution_matrix: str = "BLOSUM62",
    open_gap_score: float = -10.0,
    extend_gap_score: float = -0.5,
) -> pd.DataFrame:
    """Identity to the nearest reference sequence (max over the FASTA) and that reference's id."""
    alphabet = matrix_alphabet(substitution_matrix)
    refs = read_fasta(reference, alphabet)
    aligner = make_aligner(mode, substitution_matrix, open_gap_score, extend_gap_score)
    best_identity, best_ref = [], []
    for row, text in enumerate(table["text"]):
        query = _clean_protein(text).replace("U", "C").replace("O", "K")  # BLOSUM62 lacks U and O
        bad = sorted(set(query) - set(alphabet))
        if bad:
            raise ScorerError(
                f"protein_identity: row {row} (sample {table['sample_id'].iloc[row]}): letters {bad} "
                f"are not in {substitution_matrix}'s alphabet ({alphabet}); expected protein "
                "sequences (fix or drop that row in the table)"
            )
        scores = [alignment_identity(aligner, query, seq) for _, seq in refs]
        if not query or all(math.isnan(s) for s in scores):
            best_identity.append(float("nan"))
            best_ref.append(None)
            continue
        i = int(np.nanargmax(scores))
        best_identity.append(scores[i])
        best_ref.append(refs[i][0])
    return pd.DataFrame({"identity": best_identity, "nearest_reference": best_ref}, index=table.index)


@register("protparam", ("gravy", "pI", "instability"))
def protparam(table: pd.DataFrame) -> pd.DataFrame:
    """GRAVY, isoelectric point and instability index (Bio.SeqUtils.ProtParam) of standard residues."""
    from Bio.SeqUtils.ProtParam import ProteinAnalysis

    out = {"gravy": [], "pI": [], "instability": []}
    for text in table["text"]:
        seq = "".join(ch for ch in _clean_protein(text) if ch in STANDARD_AA)
        if not seq:
            for key in out:
                out[key].append(float("nan"))
            continue
        analysis = ProteinAnalysis(seq)
        out["gravy"].append(analysis.gravy())
        out["pI"].append(analysis.isoelectric_point())
        out["instability"].append(analysis.instability_index() if len(seq) > 1 else float("nan"))
    return pd.DataFrame(out, index=table.index)


# --------------------------------------------------------------------------- external


def fill_command(template: str, src: Path, dst: Path) -> str:
    """The user's command line with its ``{input}`` and ``{output}`` placeholders filled (quoted).

    Only these two placeholders are replaced; every other brace stays as written, so
    ``awk '{print $1}'`` needs no escaping. The line runs in a shell (``shell=True``): it is the
    user's own command, like a Snakemake ``shell:`` line; nothing else in sae-diff uses a shell.
    A template written for the earlier ``str.format`` filling (literal braces doubled as ``{{ }}``)
    is still filled that way, so existing configs keep their meaning.
    """
    src, dst = shlex.quote(str(src)), shlex.quote(str(dst))
    if "{{" in template or "}}" in template:
        try:
            return template.format(input=src, output=dst)
        except (KeyError, IndexError, ValueError) as exc:
            raise ScorerError(
                f"command scorer {template!r}: doubled braces mark a format template, whose only "
                f"placeholders are {{input}} and {{output}} ({exc!r}); write single braces instead"
            ) from None
    return template.replace("{input}", src).replace("{output}", dst)


@register("command")
def command(
    table: pd.DataFrame, command: str, metrics: list[str], format: str = "jsonl", timeout_s: float = 86400
) -> pd.DataFrame:
    """Run an external program on the samples: it reads {input} and writes JSONL to {output}
    (the only placeholders: other braces in the command stay as written).

    Input: JSONL lines ``{"id": sample_id, "text": ...}`` or FASTA records ``>sample_id``.
    Output: one JSON object per line with ``id`` and every name in ``metrics``.
    """
    with tempfile.TemporaryDirectory(prefix="sae-diff-score-") as tmp:
        src = Path(tmp) / f"input.{'fasta' if format == 'fasta' else 'jsonl'}"
        dst = Path(tmp) / "output.jsonl"
        with open(src, "w") as fh:
            for sid, text in zip(table["sample_id"], table["text"]):
                if format == "fasta":
                    fh.write(f">{sid}\n{text}\n")
                else:
                    fh.write(json.dumps({"id": int(sid), "text": str(text)}) + "\n")
        cmd = fill_command(command, src, dst)
        try:
            proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ScorerError(f"command scorer {command!r}: no result after {timeout_s} s") from None
        if proc.returncode == 127:
            raise ScorerError(f"command scorer {command!r}: program not found ({proc.stderr.strip()[-200:]})")
        if proc.returncode != 0:
            raise ScorerError(
                f"command scorer {command!r}: exit status {proc.returncode}: {proc.stderr.strip()[-300:]}"
            )
        if not dst.exists():
            raise ScorerError(f"command scorer {command!r}: wrote no output file (expected JSONL at {{output}})")
        values: dict[int, dict] = {}
        for n, line in enumerate(dst.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ScorerError(f"command scorer {command!r}: output line {n} is not JSON: {line[:80]!r}") from None
            if not isinstance(record, dict) or "id" not in record:
                raise ScorerError(f"command scorer {command!r}: output line {n} has no 'id'")
            missing = [m for m in metrics if m not in record]
            if missing:
                raise ScorerError(f"command scorer {command!r}: output line {n} lacks metric {missing[0]!r}")
            for metric in metrics:
                if record[metric] is None:  # JSON null: no value for this sample, kept as NaN
                    record[metric] = float("nan")
                    continue
                try:
                    record[metric] = float(record[metric])
                except (TypeError, ValueError):
                    raise ScorerError(
                        f"command scorer {command!r}: output line {n}: metric {metric!r} = "
                        f"{record[metric]!r} is not a number"
                    ) from None
            values[int(record["id"])] = record
    absent = [int(s) for s in table["sample_id"] if int(s) not in values]
    if absent:
        raise ScorerError(f"command scorer {command!r}: no output for sample id {absent[0]} ({len(absent)} missing)")
    return pd.DataFrame({m: [float(values[int(s)][m]) for s in table["sample_id"]] for m in metrics}, index=table.index)


# --------------------------------------------------------------------------- driver


def score(table: pd.DataFrame, scorers: list[dict], own: list[str] = ()) -> pd.DataFrame:
    """Add every configured scorer's metric columns to a copy of the table.

    own: the metric columns the user's table brings. A scorer that also computes one of them
    (so that interventions can measure it on new generations) leaves the table's values as they
    are; a scorer whose every metric the table has is not run on it at all (a structure
    predictor is costly).
    """
    out = table.copy()
    for i, spec in enumerate(scorers):
        options = {k: v for k, v in spec.items() if k != "name"}
        if spec["name"] not in REGISTRY:
            raise ScorerError(f"scorers[{i}].name = {spec['name']!r}: expected one of {sorted(REGISTRY)}")
        names = metric_names([spec])
        if names and set(names) <= set(own):
            log.info("scorers[%d] (%s): the table brings %s itself; not run on it", i, spec["name"], names)
            continue
        metrics = REGISTRY[spec["name"]](out, **options)
        kept = [c for c in metrics.columns if c in own and c in out.columns]
        if kept:
            log.info("scorers[%d] (%s): kept the table's own %s", i, spec["name"], kept)
            metrics = metrics.drop(columns=kept)
        clash = [c for c in metrics.columns if c in out.columns]
        if clash:
            raise ScorerError(f"scorers[{i}] ({spec['name']}): column {clash[0]!r} already exists in the samples")
        out = pd.concat([out, metrics], axis=1)
    return out
