"""The `griffin ppl` table, rendered from a report built by hand."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from griffin_cli.ppl import ppl_table
from griffin_export.evaluation.ppl import PplReport, Row


def _report(windows: int) -> PplReport:
    rows = [
        Row("full", nll=math.log(10.0) * 100, tokens=100),
        Row("exp", math.log(12.5) * 100, 100),
    ]
    return PplReport("shakespeare", "static", 64, 0, windows, 100, rows, seconds=1.0)


@pytest.mark.parametrize(("windows", "expected"), [(1, "1 window of 64"), (2, "2 windows of 64")])
def test_table_title_counts_windows_in_english(windows: int, expected: str) -> None:
    """One window reads "1 window", more "N windows". Catches the unconditional plural
    ("1 windows") and a plural that drops the s for every count."""
    console = Console(width=200, record=True)
    console.print(ppl_table(_report(windows)))
    text = console.export_text()
    assert f"shakespeare: {expected}" in text
    assert "1.25x" in text and "12.50" in text  # the export's row beside the full model's
