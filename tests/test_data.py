"""Prompt sets, user tables, splits and reproducible generation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sae_diff import data
from sae_diff.data import DataError

TABLE_SPEC = {
    "source": "table",
    "format": "auto",
    "text_column": "seq",
    "group_columns": ["family"],
    "metric_columns": ["activity"],
}


def test_prompt_yaml_pairs_translations(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "pair_key: profession\nlanguages:\n"
        "  en: {templates: ['A {profession}.', 'The {profession}!'], fillers: {profession: [nurse, pilot]}}\n"
        "  fr: {templates: ['Un {profession}.'], fillers: {profession: [infirmier, pilote]}}\n"
    )
    prompts = data.load_prompts(path)
    assert prompts["prompt"].tolist() == [
        "A nurse.",
        "A pilot.",
        "The nurse!",
        "The pilot!",
        "Un infirmier.",
        "Un pilote.",
    ]
    assert prompts["language"].tolist() == ["en"] * 4 + ["fr"] * 2
    assert prompts["profession"].tolist() == ["nurse", "pilot"] * 3  # first language's value
    assert prompts.loc[4, "pair_id"] == prompts.loc[0, "pair_id"] == "nurse#0"
    assert prompts["prompt_id"].tolist() == list(range(6))


def test_prompt_yaml_misaligned_fillers(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "languages:\n  en: {templates: ['{a}'], fillers: {a: [x, y]}}\n  fr: {templates: ['{a}'], fillers: {a: [x]}}\n"
    )
    with pytest.raises(DataError, match="languages.fr.fillers.a: expected 2 values"):
        data.load_prompts(path)


def test_prompt_text_file_and_limit(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\nfirst\n\nsecond\nthird\n")
    assert data.load_prompts(path, max_prompts=2)["prompt"].tolist() == ["first", "second"]


@pytest.fixture
def frame():
    return pd.DataFrame({"seq": ["MKV", "MKL", "MAA"], "family": ["a", "b", "a"], "activity": [0.1, 0.5, 0.9]})


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_table_formats(tmp_path, frame, suffix):
    path = tmp_path / f"t.{suffix}"
    {
        "csv": lambda: frame.to_csv(path, index=False),
        "parquet": lambda: frame.to_parquet(path),
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
    }[suffix]()
    table = data.load_table(dict(TABLE_SPEC, path=str(path)))
    assert table["text"].tolist() == ["MKV", "MKL", "MAA"]
    assert table["family"].tolist() == ["a", "b", "a"]
    np.testing.assert_allclose(table["activity"], [0.1, 0.5, 0.9])
    assert table["sample_id"].tolist() == [0, 1, 2]


def test_table_fasta(tmp_path):
    path = tmp_path / "s.fasta"
    path.write_text(">p1 amylase\nMKVL\nAA\n>p2\nMSS\n")
    table = data.load_table(
        {
            "source": "table",
            "path": str(path),
            "format": "auto",
            "text_column": "text",
            "group_columns": [],
            "metric_columns": [],
        }
    )
    assert table["text"].tolist() == ["MKVLAA", "MSS"]


def test_table_missing_column_names_file_and_column(tmp_path, frame):
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"t.csv: column 'pLDDT' not found"):
        data.load_table(dict(TABLE_SPEC, path=str(path), metric_columns=["pLDDT"]))


@pytest.mark.parametrize(
    "content, message",
    [
        ("seq,family,activity\n", r"t.csv: no rows \(a header without data\?\)"),
        ("seq,family,activity\nMKV,a,0.1\n,b,0.5\n", r"column 'seq': 1 of 2 rows have no text .* first rows \[1\]"),
        (
            "seq,family,activity\nMKV,a,0.1\nMKL,b,high\n",
            r"column 'activity': 1 values are not numbers, first 'high' in row 1",
        ),
        (
            "seq,family,activity\nMKV,a,0.1\nMKL,b,inf\nMAA,a,\n",
            r"column 'activity': 2 values are missing, NaN or infinite, first rows \[1, 2\].*non_finite: drop",
        ),
    ],
)
def test_bad_table_cells_are_named_at_the_door(tmp_path, content, message):
    """Each bad input stops at load with the file, column, count and first row named."""
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        data.load_table(dict(TABLE_SPEC, path=str(path)))


def test_non_finite_metrics_are_dropped_only_when_asked(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("seq,family,activity\nMKV,a,0.1\nMKL,b,nan\nMAA,a,0.9\n")
    table = data.load_table(dict(TABLE_SPEC, path=str(path), non_finite="drop"))
    assert table["text"].tolist() == ["MKV", "MAA"] and table["sample_id"].tolist() == [0, 1]
    np.testing.assert_allclose(table["activity"], [0.1, 0.9])


def test_dropping_every_row_is_an_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("seq,family,activity\nMKV,a,nan\nMKL,b,inf\n")
    with pytest.raises(DataError, match=r"column 'activity': no row is left after dropping"):
        data.load_table(dict(TABLE_SPEC, path=str(path), non_finite="drop"))


def test_non_utf8_table_names_the_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"seq,family,activity\nMKV,a,0.1\nMK\xe9L,b,0.5\n")
    with pytest.raises(DataError, match=r"t.csv: not UTF-8 text at line 3 \(data row 1 .*\), byte 3"):
        data.load_table(dict(TABLE_SPEC, path=str(path)))


def test_split_is_seeded_and_sized():
    table = pd.DataFrame({"sample_id": range(100), "text": ["x"] * 100})
    a = data.assign_split(table, 0.2, seed=3)
    b = data.assign_split(table, 0.2, seed=3)
    c = data.assign_split(table, 0.2, seed=4)
    assert (a["split"] == "eval").sum() == 20
    assert a["split"].tolist() == b["split"].tolist() != c["split"].tolist()


def test_generation_is_reproducible(tiny_model_dir, tmp_path):
    from sae_diff import models

    model, tok = models.load(tiny_model_dir)
    prompts = pd.DataFrame({"prompt_id": [0, 1, 2], "prompt": ["a nurse", "a pilot", "a judge"]})
    sampling = {
        "n_per_prompt": 2,
        "max_new_tokens": 6,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "batch_size": 4,
        "chat_template": True,
        "seed": 7,
    }
    first = data.generate(model, tok, prompts, sampling, progress=False)
    second = data.generate(model, tok, prompts, sampling, progress=False)
    other = data.generate(model, tok, prompts, dict(sampling, seed=8), progress=False)
    assert len(first) == 6 and first["text"].tolist() == second["text"].tolist() != other["text"].tolist()
    assert first["prompt_text"][0] == "<|user|>a nurse<|assistant|>"
    greedy = data.generate(model, tok, prompts, dict(sampling, do_sample=False), progress=False)
    # greedy ignores the seed and gives identical samples per prompt
    assert greedy["text"][0] == greedy["text"][1]
    json.dumps(data.example_rows(first))


def test_system_prompt_replaces_the_template_default():
    """A ChatML-style template with a default system message (as SmolLM2's): None keeps it, a
    string (even empty) replaces it; without chat_template the prompt is left as it is."""

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            if messages[0]["role"] != "system":
                messages = [{"role": "system", "content": "You are helpful"}, *messages]
            return "".join(f"<{m['role']}>{m['content']}</>" for m in messages) + "<assistant>"

    tok = Tok()
    assert data.format_prompt(tok, "hi", True) == "<system>You are helpful</><user>hi</><assistant>"
    assert data.format_prompt(tok, "hi", True, "") == "<system></><user>hi</><assistant>"
    assert data.format_prompt(tok, "hi", True, "Be brief") == "<system>Be brief</><user>hi</><assistant>"
    assert data.format_prompt(tok, "hi", False, "") == "hi"
