"""figures.KINDS is the one list of figure kinds: the CLI offers exactly its kinds, and
figures.draw runs one of them from named input files."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from sae_diff import figures
from sae_diff.cli import build_parser


def _figure_choices() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    kind = next(a for a in sub.choices["figure"]._actions if a.dest == "kind")
    return set(kind.choices)


def test_parser_offers_exactly_the_kinds():
    """Compared: the figure verb's `kind` choices against the keys of figures.KINDS (both ways),
    and each kind parses as a command line."""
    choices = _figure_choices()
    assert choices == set(figures.KINDS)
    for kind in figures.KINDS:
        args = build_parser().parse_args(["figure", kind, "--spec", "{}", "--out", "x.png"])
        assert args.kind == kind
    with pytest.raises(SystemExit):
        build_parser().parse_args(["figure", "no_such_kind", "--out", "x.png"])


def test_parser_does_not_load_numpy_pandas_or_matplotlib():
    """Compared: the modules loaded after building the parser (which reads figures.KINDS) against
    the heavy ones a figure loads only when drawn."""
    code = (
        "import sys; from sae_diff.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('numpy', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_draw_loss_by_position_from_a_tiny_table(tmp_path):
    """Compared: the file figures.draw writes for kind loss_by_position from a three-row table
    (a PNG: its magic bytes), the path it returns, and an unknown kind's error."""
    table = tmp_path / "topk.loss_by_position.parquet"
    pd.DataFrame(
        {
            "position": [1, 2, 3],
            "ce_clean": [3.0, 2.5, 2.0],
            "ce_with_sae": [3.2, 2.7, 2.1],
            "ce_with_ablation": [6.0, 6.0, 6.0],
        }
    ).to_parquet(table)
    eval_json = tmp_path / "topk.json"
    eval_json.write_text(json.dumps({"sae": "topk"}))
    out = tmp_path / "figs" / "loss.png"
    spec = {"figure": {"size": [4, 3], "dpi": 40}}
    written = figures.draw("loss_by_position", {"table": str(table), "eval": str(eval_json)}, spec, out, "tiny")
    assert written == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no_such_kind"):
        figures.draw("no_such_kind", {}, spec, tmp_path / "x.png", "")
