from __future__ import annotations

import math

import pytest

from modalign.demo.report import conclusions, findings, terminal_table
from modalign.demo.stages import Stages
from modalign.evaluate.records import read_record
from modalign.report.browser import find_chromium, render_in_browser, screenshot_stats


def _model(gap, i2t, i2i, i2i_oti, t2t, t2t_ovi, zs_inter, zs_intra, centering):
    return {"evaluation": {"metrics": {
        "gap": gap, "text_retrieval_recall@1": i2t, "image_retrieval_recall@1": i2t / 2,
        "i2i_native_map": i2i, "i2i_oti_map": i2i_oti, "t2t_native_map": t2t,
        "t2t_ovi_map": t2t_ovi, "zeroshot_subset_inter_acc1": zs_inter,
        "zeroshot_subset_intra_acc1": zs_intra,
        "centering_text_retrieval_recall@1": i2t + centering}}}


def test_findings_follow_the_numbers():
    models = {"a": _model(0.2, 0.3, 0.5, 0.6, 0.7, 0.5, 0.4, 0.3, 0.05),
              "b": _model(0.9, 0.1, 0.5, 0.7, 0.7, 0.6, 0.2, 0.3, -0.01)}
    f = findings(models)
    assert f["gap"] == {"smallest": ("a", 0.2), "largest": ("b", 0.9), "scale": "some-clip-like"}
    assert f["best_retrieval"] == {"model": "a", "i2t_r1": 0.3, "t2i_r1": 0.15}
    # OTI: a 0.6 - 0.5, b 0.7 - 0.5; OVI: a 0.5 - 0.7, b 0.6 - 0.7
    assert f["inversion:OTI"]["per_model"] == pytest.approx({"a": 0.1, "b": 0.2}, abs=1e-12)
    assert f["inversion:OTI"]["mean"] == pytest.approx(0.15, abs=1e-12)
    assert f["inversion:OVI"]["per_model"] == pytest.approx({"a": -0.2, "b": -0.1}, abs=1e-12)
    assert f["inversion:OVI"]["mean"] == pytest.approx(-0.15, abs=1e-12)
    assert f["zeroshot"] == pytest.approx({"inter": 0.3, "intra": 0.3}, abs=1e-12)
    assert f["bridge:centering"]["per_model"] == pytest.approx({"a": 0.05, "b": -0.01}, abs=1e-12)
    assert f["bridge:centering"]["mean"] == pytest.approx(0.02, abs=1e-12)
    assert "bridge:invgc" not in f  # no model measured it
    assert findings({"a": _model(0.1, 0.3, 0.5, 0.4, 0.7, 0.8, 0.4, 0.3, 0.0)})["gap"]["scale"] \
        == "small"
    assert findings({"a": _model(0.6, 0.3, 0.5, 0.4, 0.7, 0.8, 0.4, 0.3, 0.0)})["gap"]["scale"] \
        == "clip-like"
    assert findings({"a": {}}) == {}


def test_conclusions_state_each_finding_with_its_numbers():
    models = {"a": _model(0.2, 0.3, 0.5, 0.6, 0.7, 0.5, 0.4, 0.3, 0.05),
              "b": _model(0.9, 0.1, 0.5, 0.7, 0.7, 0.6, 0.2, 0.3, -0.01)}
    sentences = conclusions(models, "The claim held.")
    # one sentence per finding (gap, best retrieval, OTI, OVI, zero-shot, centering), then the lab
    assert len(sentences) == len(findings(models)) + 1 == 7
    gap, best, oti, ovi, zs, centering, lab = sentences
    assert ("0.200" in gap and "0.900" in gap) and ("0.300" in best and "0.150" in best)
    assert all(x in oti for x in ("+0.150", "a +0.100", "b +0.200"))
    assert all(x in ovi for x in ("-0.150", "a -0.200", "b -0.100"))
    assert zs.count("0.300") == 2
    assert all(x in centering for x in ("+0.020", "a +0.050", "b -0.010"))
    assert lab.endswith("The claim held.")
    assert len(conclusions(models, "")) == 6  # no verdict, no sentence for it
    assert conclusions({"a": {}}, "") == []


def test_terminal_table_lists_every_model_and_missing_values():
    models = {"clip": _model(0.25, 0.3, 0.5, 0.6, 0.7, 0.5, 0.4, 0.3, 0.0), "empty": {}}
    table = terminal_table(models).splitlines()
    assert table[0].split()[0] == "model" and len(table) == 4
    assert "0.250" in table[2] and "0.500 / 0.600" in table[2]
    assert table[3].split()[1] == "-"
    models["clip"]["evaluation"]["intervals"] = {"text_retrieval_recall@1": [0.25, 0.35],
                                                 "i2i_delta_map": [-0.02, 0.21]}
    row = terminal_table(models).splitlines()[2]
    assert "0.300 [0.250, 0.350]" in row and "0.500 / 0.600 [-0.020, +0.210]" in row


def test_stages_rerun_when_the_key_changes(tmp_path):
    st = Stages(tmp_path, verbose=False)
    calls = []
    assert st.run("s", "x", {"k": 1}, lambda: calls.append(1) or 1) == 1
    assert st.run("s", "x", {"k": 1}, lambda: calls.append(2) or 2) == 1
    assert st.cached["s"] and st.times["s"] == 0.0
    assert Stages(tmp_path, verbose=False).run("s", "x", {"k": 2}, lambda: 3) == 3
    assert calls == [1]


@pytest.mark.slow
def test_tiny_demo_end_to_end_and_report_in_a_browser(tmp_path):
    from modalign.demo import DemoOptions, run_demo

    opts = DemoOptions(out=tmp_path / "demo", quick=True, speech=False, limit=150,
                       configs=("clip", "clip_unif_align"), progress=False)
    result = run_demo(opts)
    assert result.report.is_file()
    assert set(result.models) == {"clip", "clip_unif_align"}
    # one record per model holds the numbers the report shows, and the table prints them
    files = (tmp_path / "demo" / "records").glob("*.json")
    records = {r["model"]: r for r in map(read_record, files) if r["task"] == "demo-suite"}
    assert set(records) == set(result.models)
    rows = {line.split()[0]: line.split() for line in result.summary_table.splitlines()[2:]}
    for name, info in result.models.items():
        m = info["evaluation"]["metrics"]
        for key in ("gap", "i2i_native_map", "i2i_oti_map", "text_retrieval_recall@1"):
            assert records[name]["metrics"][key] == pytest.approx(m[key], abs=1e-12), key
            assert not math.isnan(m[key])
        assert rows[name][1] == f"{m['gap']:.3f}"
        assert rows[name][2] == f"{m['text_retrieval_recall@1']:.3f}"
    explore = tmp_path / "demo" / "explore.html"
    assert explore.is_file() and 'href="explore.html"' in result.report.read_text()
    assert '"model":"' in explore.read_text()[:200000]
    # a second run takes every stage from its cache and only re-renders
    again = run_demo(opts)
    assert again.stage_seconds["train"] < 5 and all(
        v == 0.0 for k, v in again.stage_seconds.items() if k.startswith("evaluate-"))
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium installed")
    shot = render_in_browser(result.report, tmp_path / "demo" / "report.png", executable=exe)
    assert shot.console_messages == []
    assert "Conclusions" in shot.dom and "Query gallery" in shot.dom
    stats = screenshot_stats(shot.screenshot)
    assert stats["std"] > 20 and stats["non_white_share"] > 0.03
