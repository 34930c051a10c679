"""The HTML report helper: escaping, tables, inline figures, and a real headless browser."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from modalign.geometry.diagnose import DiagnoseOptions, diagnose
from modalign.geometry.report import diagnosis_page, metric_rows
from modalign.report.browser import find_chromium, render_in_browser, screenshot_stats
from modalign.report.html import Page, format_value, table_html

CHROMIUM = find_chromium()
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")


def _line_figure():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [2, 0, 1], lw=4)
    return fig


def test_page_is_self_contained_and_escapes_text(tmp_path):
    page = Page("A <b>title</b>", subtitle="x & y")
    sec = page.section("Numbers", intro="<script>alert(1)</script>")
    sec.table([{"name": "<i>a</i>", "value": 0.123456789, "n": 3}], caption="T")
    sec.figure(_line_figure(), caption="line")
    sec.figures_side_by_side([(_line_figure(), "one"), (_line_figure(), "two")],
                             image_format="svg")
    html = page.render()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "A &lt;b&gt;title&lt;/b&gt;" in html and "x &amp; y" in html
    assert html.count("data:image/png;base64,") == 1 and html.count("<svg") == 2
    assert not re.search(r"""(src|href)=["']https?://""", html)
    assert "<style>" in html and "table.data" in html
    out = page.write(tmp_path / "sub" / "p.html")
    assert out.read_text() == html


def test_table_formats_numbers_and_missing_values():
    html = table_html([{"a": 1.0e-9, "b": None}, {"a": float("inf"), "b": True}],
                      caption="c", explain_column="b")
    assert '<td class="num">1e-09</td>' in html and "<td class=\"explain\">–</td>" in html
    assert "∞" in html and "yes" in html
    assert format_value(float("nan")) == "nan" and format_value(-float("inf")) == "−∞"


def test_figure_format_is_checked():
    page = Page("p")
    with pytest.raises(ValueError, match="image_format"):
        page.section("s").figure(_line_figure(), image_format="jpg")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 8))
    opts = DiagnoseOptions(projection_pairs=60, histogram_pairs=2000)
    gap = diagnose({"image": x, "text": x + 0.4 * rng.normal(size=x.shape) + 1.0}, options=opts)
    nogap = diagnose({"image": x, "text": x + 0.4 * rng.normal(size=x.shape)}, options=opts)
    return [("with gap", gap), ("no gap", nogap)]


def test_metric_rows_put_runs_side_by_side(records):
    runs = records
    rows = {r["metric"]: r for r in metric_rows(runs)}
    row = rows["image|text: centroid distance"]
    assert row["with gap"] > row["no gap"] and row["meaning"]
    with pytest.raises(ValueError, match="unique"):
        diagnosis_page([runs[0], runs[0]])


@needs_browser
@pytest.mark.browser
@pytest.mark.slow
def test_report_renders_in_a_headless_browser(tmp_path, records):
    path = diagnosis_page(records).write(tmp_path / "diagnosis.html")
    result = render_in_browser(path, tmp_path / "shot.png", executable=CHROMIUM)
    assert result.console_messages == []
    assert result.dom.count("<img") >= 6 and "centroid distance" in result.dom
    stats = screenshot_stats(result.screenshot)
    assert stats["width"] == 1280 and stats["std"] > 20 and stats["non_white_share"] > 0.05


@needs_browser
@pytest.mark.browser
def test_browser_helper_reports_console_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<h1>x</h1><script>undefinedFunction();</script>")
    result = render_in_browser(bad, tmp_path / "bad.png", executable=CHROMIUM)
    assert any("Uncaught" in m for m in result.console_messages)
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    r = render_in_browser(blank, tmp_path / "blank.png", window=(400, 300), executable=CHROMIUM)
    assert screenshot_stats(r.screenshot)["std"] < 1.0
