"""Ordinary inputs that used to crash or mislead: modality names, empty queries, spreadsheets."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from modalign.evaluate.metrics import retrieval_metrics
from modalign.evaluate.records import write_csv
from modalign.geometry.diagnose import DiagnoseOptions, diagnose
from modalign.geometry.inputs import take_rows
from modalign.geometry.report import _histogram_figure, diagnosis_page

FAST = DiagnoseOptions(compute_mir=False, projection_pairs=30, histogram_pairs=200)


@pytest.mark.parametrize("a,b", [("my scan", "text"), ("x-ray", "report-text")])
def test_modality_names_with_spaces_or_hyphens_render(a, b):
    """Before: IndexError ("my scan"), or a histogram in the wrong panel ("x-ray")."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    rec = diagnose({a: x, b: x + 0.3 * rng.normal(size=(40, 6))}, options=FAST)
    key = next(iter(rec["figures"]))
    fig = _histogram_figure(rec["figures"][key], "t")
    cross, intra = ([t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes)
    assert cross == [f"{a}-{b} positive", f"{a}-{b} negative"]
    assert intra == [f"{a}-{a} random", f"{b}-{b} random"]
    assert "<table" in diagnosis_page([("run", rec)]).render()


def test_retrieval_metrics_with_zero_queries_is_an_error():
    """Before: NaN metrics."""
    with pytest.raises(ValueError, match="queries: no query rows"):
        retrieval_metrics(torch.zeros(0, 3), torch.eye(3), torch.zeros(0, dtype=torch.long),
                          torch.arange(3))


def test_nan_row_of_a_sample_is_named_by_its_row_in_the_array():
    """Before: the row number inside the sample."""
    x = np.ones((100, 4))
    x[57] = np.nan
    with pytest.raises(ValueError, match="row 57 contains NaN"):
        take_rows(x, np.array([3, 10, 57, 90]), "image", normalize=True)


def test_eval_merge_escapes_spreadsheet_formulas(tmp_path):
    rows = [{"dataset": "=HYPERLINK(\"http://x\")", "task": "@sum", "model": "+1", "bridges": "-",
             "record": "r", "recall@1": -0.5}]
    path = write_csv(rows, tmp_path / "t.csv")
    got = next(csv.DictReader(path.open(encoding="utf-8")))
    assert got["dataset"].startswith("'=") and got["task"] == "'@sum" and got["model"] == "'+1"
    assert got["recall@1"] == "-0.5"  # numbers stay numbers
