"""The run report's training curves: temperatures tau, from today's and older logs."""

from __future__ import annotations

import json
import math

import pytest

from modalign.report import html as report_html
from modalign.report.run_report import (
    TEMPERATURE_TITLE,
    row_temperatures,
    run_report,
    temperature_curves,
)


def _write_log(run, rows):
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def captured_figures(monkeypatch):
    """Every (title, {label: y values}) the report draws, read off the matplotlib figures."""
    drawn = []
    original = report_html.figure_html

    def capture(fig, **kwargs):
        ax = fig.axes[0]
        drawn.append((ax.get_title(), {ln.get_label(): list(ln.get_ydata())
                                       for ln in ax.get_lines()}))
        return original(fig, **kwargs)

    monkeypatch.setattr(report_html, "figure_html", capture)
    return drawn


def test_report_plots_tau_from_a_log_of_logit_scales(tmp_path, captured_figures):
    _write_log(tmp_path / "old", [
        {"epoch": 1, "train_loss": 2.0, "logit_scales": {"clip": 14.285714285714286}},
        {"epoch": 2, "train_loss": 1.5, "logit_scales": {"clip": 50.0, "intra": 100.0}},
    ])
    page = run_report([tmp_path / "old"])
    assert TEMPERATURE_TITLE in page.render()
    curves = dict(captured_figures)[TEMPERATURE_TITLE]
    assert curves["clip"] == pytest.approx([0.07, 0.02], rel=1e-12)
    assert math.isnan(curves["intra"][0]) and curves["intra"][1] == pytest.approx(0.01)
    assert [title for title, _ in captured_figures] == ["loss", TEMPERATURE_TITLE]


def test_a_logged_temperature_wins_over_the_scale():
    row = {"epoch": 3, "temperatures": {"clip": 0.05}, "logit_scales": {"clip": 99.0}}
    assert row_temperatures(row) == {"clip": 0.05}
    assert row_temperatures({"epoch": 3}) == {}
    assert temperature_curves([{"logit_scales": {"a": 4.0}}, {"temperatures": {"a": 0.5}}]) == {
        "a": [0.25, 0.5]}
