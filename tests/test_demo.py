from __future__ import annotations

import math

import pytest

from modalign.demo.report import conclusions, terminal_table
from modalign.demo.stages import Stages
from modalign.report.browser import find_chromium, render_in_browser, screenshot_stats


def _model(gap, i2t, i2i, i2i_oti, t2t, t2t_ovi, zs_inter, zs_intra, centering):
    return {"evaluation": {"metrics": {
        "gap": gap, "text_retrieval_recall@1": i2t, "image_retrieval_recall@1": i2t / 2,
        "i2i_native_map": i2i, "i2i_oti_map": i2i_oti, "t2t_native_map": t2t,
        "t2t_ovi_map": t2t_ovi, "zeroshot_subset_inter_acc1": zs_inter,
        "zeroshot_subset_intra_acc1": zs_intra,
        "centering_text_retrieval_recall@1": i2t + centering}}}


def test_conclusions_follow_the_numbers():
    models = {"a": _model(0.2, 0.3, 0.5, 0.6, 0.7, 0.5, 0.4, 0.3, 0.05),
              "b": _model(0.9, 0.1, 0.5, 0.7, 0.7, 0.6, 0.2, 0.3, -0.01)}
    text = " ".join(conclusions(models, "The claim held."))
    assert "smallest modality gap is a's (0.200)" in text and "largest b's (0.900)" in text
    assert "some model here reaches a CLIP-like gap" in text
    assert "a retrieves best" in text
    assert "Inversion (OTI) helps image->image" in text and "+0.150 on average" in text
    assert "Inversion (OVI) does not help" in text and "-0.150" in text
    assert "centering bridge changes image->text R@1 by +0.020" in text
    assert text.endswith("Gap laboratory: The claim held.")
    flipped = {"a": _model(0.1, 0.3, 0.5, 0.4, 0.7, 0.8, 0.4, 0.3, 0.0)}
    text = " ".join(conclusions(flipped, ""))
    assert "every model here has a small gap" in text
    assert "Inversion (OTI) does not help" in text and "Inversion (OVI) helps" in text
    assert "inter-modal wins" in text


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
    for info in result.models.values():
        m = info["evaluation"]["metrics"]
        assert 0 <= m["gap"] <= 2 and 0 <= m["i2i_native_map"] <= 1
        assert not math.isnan(m["i2i_oti_map"])
    assert (tmp_path / "demo" / "records").is_dir()
    assert any((tmp_path / "demo" / "records").glob("*.json"))
    assert "model" in result.summary_table and "clip_unif_align" in result.summary_table
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
