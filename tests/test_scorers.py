"""Scorers against hand-computed values."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from sae_diff import scorers
from sae_diff.scorers import ScorerError


def _table(texts, **extra):
    return pd.DataFrame({"sample_id": np.arange(len(texts)), "text": texts, **extra})


def test_gender_pronouns_hand_counts():
    table = _table(
        [
            "He said she and her mother left.",
            "The engineer fixed it.",
            "His son and him.",
            "Elle est infirmière et son mari est pilote.",
        ],
        language=["en", "en", "en", "fr"],
    )
    out = scorers.score(table, [{"name": "gender_pronouns", "language_column": "language"}])
    assert out["male_count"].tolist() == [1, 0, 3, 1]
    assert out["female_count"].tolist() == [3, 0, 0, 1]
    assert out["female_ratio"][0] == pytest.approx(0.75)
    assert math.isnan(out["female_ratio"][1])  # no gendered word: undefined, not 0
    assert out["female_ratio"][2] == 0.0 and out["female_ratio"][3] == pytest.approx(0.5)
    assert out["gender"].tolist() == ["female", "none", "male", "mixed"]


def test_gender_words_are_whole_words():
    # "the", "shell", "hermit", "mrsa" contain he/she/her/mrs but are not gendered
    assert scorers.count_gender_words("the shell of a hermit crab; mrsa") == (0, 0)


def test_length():
    out = scorers.score(_table(["one two three", "x"]), [{"name": "length"}])
    assert out["n_chars"].tolist() == [13, 1] and out["n_words"].tolist() == [3, 1]


@pytest.fixture
def reference_fasta(tmp_path):
    path = tmp_path / "ref.fasta"
    path.write_text(">refA\nACDQFG\n>refB\nACDEFHIK\n")
    return path


def test_protein_identity_hand_computed(reference_fasta):
    table = _table(["ACDEFG", "ACDEFGHIK", ""])
    out = scorers.score(table, [{"name": "protein_identity", "reference": str(reference_fasta)}])
    # ACDEFG vs ACDQFG: one mismatch in 6 columns; vs refB it needs gaps, so refA is nearest
    assert out["identity"][0] == pytest.approx(5 / 6)
    assert out["nearest_reference"][0] == "refA"
    # ACDEFGHIK vs ACDEFHIK: 8 identical columns + 1 gap column
    assert out["identity"][1] == pytest.approx(8 / 9)
    assert out["nearest_reference"][1] == "refB"
    assert math.isnan(out["identity"][2])


def test_protparam_hand_computed():
    from Bio.SeqUtils.ProtParamData import DIWV

    out = scorers.score(_table(["ACDK", "G", "acdk\n"]), [{"name": "protparam"}])
    kyte_doolittle = {"A": 1.8, "C": 2.5, "D": -3.5, "K": -3.9}
    assert out["gravy"][0] == pytest.approx(sum(kyte_doolittle.values()) / 4)
    assert out["gravy"][2] == pytest.approx(out["gravy"][0])  # case and whitespace ignored
    # instability index (Guruprasad 1990): 10 / L * sum of dipeptide weights
    expected = 10 / 4 * (DIWV["A"]["C"] + DIWV["C"]["D"] + DIWV["D"]["K"])
    assert out["instability"][0] == pytest.approx(expected)
    # a single glycine: only the termini are charged, pI = (pK_Nterm 7.5 + pK_Cterm 3.55) / 2
    assert out["pI"][1] == pytest.approx((7.5 + 3.55) / 2, abs=1e-3)


def _script(tmp_path, body):
    path = tmp_path / "tool.py"
    path.write_text(textwrap.dedent(body))
    return f"{sys.executable} {path} {{input}} {{output}}"


def test_command_scorer_round_trip(tmp_path):
    cmd = _script(
        tmp_path,
        """
        import json, sys
        with open(sys.argv[1]) as src, open(sys.argv[2], "w") as dst:
            for line in src:
                r = json.loads(line)
                dst.write(json.dumps({"id": r["id"], "plddt": 10.0 * len(r["text"])}) + "\\n")
    """,
    )
    out = scorers.score(_table(["MKV", "MK"]), [{"name": "command", "command": cmd, "metrics": ["plddt"]}])
    assert out["plddt"].tolist() == [30.0, 20.0]


def test_command_scorer_fasta_input(tmp_path):
    cmd = _script(
        tmp_path,
        """
        import json, sys
        from Bio import SeqIO
        with open(sys.argv[2], "w") as dst:
            for r in SeqIO.parse(sys.argv[1], "fasta"):
                dst.write(json.dumps({"id": int(r.id), "plddt": float(len(r.seq))}) + "\\n")
    """,
    )
    out = scorers.score(
        _table(["MKVL"]), [{"name": "command", "command": cmd, "metrics": ["plddt"], "format": "fasta"}]
    )
    assert out["plddt"].tolist() == [4.0]


@pytest.mark.parametrize(
    "body,message",
    [
        ("open(__import__('sys').argv[2], 'w').write('not json\\n')", "line 1 is not JSON"),
        ("open(__import__('sys').argv[2], 'w').write('{\"id\": 0}\\n')", "lacks metric 'plddt'"),
        ("open(__import__('sys').argv[2], 'w').write('{\"id\": 5, \"plddt\": 1}\\n')", "no output for sample id 0"),
        (
            "open(__import__('sys').argv[2], 'w').write('{\"id\": 0, \"plddt\": \"high\"}\\n')",
            "output line 1: metric 'plddt' = 'high' is not a number",
        ),
        ("raise SystemExit(3)", "exit status 3"),
        ("pass", "wrote no output file"),
    ],
)
def test_command_scorer_bad_output_is_clear(tmp_path, body, message):
    cmd = _script(tmp_path, body)
    with pytest.raises(ScorerError, match=message):
        scorers.score(_table(["MKV"]), [{"name": "command", "command": cmd, "metrics": ["plddt"]}])


def test_command_scorer_keeps_braces_other_than_its_placeholders():
    """Only {input} and {output} are filled: a dict literal (or awk's '{print}') needs no escaping."""
    code = "import json, sys; r = {'id': 0, 'plddt': 1.5}; open(sys.argv[2], 'w').write(json.dumps(r))"
    cmd = f'{sys.executable} -c "{code}" {{input}} {{output}}'
    out = scorers.score(_table(["MKV"]), [{"name": "command", "command": cmd, "metrics": ["plddt"]}])
    assert out["plddt"].tolist() == [1.5]


def test_command_scorer_null_is_nan_and_old_doubled_braces_still_work(tmp_path):
    """JSON null (no value for a sample) becomes NaN; a template written for the earlier
    str.format filling, with literal braces doubled, keeps its meaning."""
    code = "import json, sys; open(sys.argv[2], 'w').write(json.dumps({{'id': 0, 'plddt': None}}))"
    cmd = f'{sys.executable} -c "{code}" {{input}} {{output}}'
    out = scorers.score(_table(["MKV"]), [{"name": "command", "command": cmd, "metrics": ["plddt"]}])
    assert np.isnan(out["plddt"].iloc[0])


def test_command_scorer_missing_program():
    with pytest.raises(ScorerError, match="program not found"):
        scorers.score(
            _table(["MKV"]),
            [{"name": "command", "command": "no-such-folding-tool {input} {output}", "metrics": ["plddt"]}],
        )


def test_registry_names_match_schema():
    from sae_diff.config import load_schema

    names = load_schema()["$defs"]["scorer"]["properties"]["name"]["enum"]
    assert sorted(names) == sorted(scorers.REGISTRY)


def test_metric_columns_are_the_scorers_then_the_tables_own_each_once():
    specs = [{"name": "length"}, {"name": "command", "metrics": ["plddt"]}]
    data = {"D0": {"metric_columns": ["activity", "n_chars"]}, "D1": {"metric_columns": ["activity"]}, "D2": {}}
    assert scorers.metric_columns(specs, data) == ["n_chars", "n_words", "plddt", "activity"]


def test_a_reference_letter_outside_the_matrix_is_named_with_file_and_record(tmp_path):
    """J is in no substitution matrix: the aligner would fail later without naming the file."""
    path = tmp_path / "ref.fasta"
    path.write_text(">refA\nACDQFG\n>refB\nACJDE\n")
    with pytest.raises(ScorerError, match=r"ref.fasta: record 2 \('refB'\): letters \['J'\] are not in"):
        scorers.score(_table(["ACDEFG"]), [{"name": "protein_identity", "reference": str(path)}])


def test_a_query_letter_outside_the_matrix_names_the_row(reference_fasta):
    with pytest.raises(ScorerError, match=r"row 1 \(sample 1\): letters \['J'\] are not in BLOSUM62"):
        scorers.score(_table(["ACDEFG", "ACJJD*"]), [{"name": "protein_identity", "reference": str(reference_fasta)}])


def test_a_tables_own_metric_keeps_its_values_when_a_scorer_also_computes_it():
    """The user's table brings n_chars (deliberately wrong values): they stay; the scorer adds only
    n_words. A scorer whose every metric the table has is not run (this command would fail)."""
    table = _table(["one two", "x"], n_chars=[100.0, 200.0])
    out = scorers.score(table, [{"name": "length"}], own=["n_chars"])
    assert out["n_chars"].tolist() == [100.0, 200.0] and out["n_words"].tolist() == [2, 1]
    failing = {
        "name": "command",
        "command": f"{sys.executable} -c 'raise SystemExit(3)'",
        "metrics": ["plddt"],
        "format": "jsonl",
    }
    out = scorers.score(_table(["AC"], plddt=[0.5]), [failing], own=["plddt"])
    assert out["plddt"].tolist() == [0.5]
    with pytest.raises(ScorerError, match="'n_chars' already exists"):  # not the table's own: still an error
        scorers.score(table, [{"name": "length"}])
