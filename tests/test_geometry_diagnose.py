"""``diagnose`` and ``modalign diagnose``: the record, pairing by group, bad input, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modalign.cli import main
from modalign.embed.store import EmbeddingStore
from modalign.geometry.diagnose import DiagnoseOptions, diagnose, pair_rows_by_group
from modalign.geometry.gap import modality_gap
from modalign.geometry.uniformity import alignment
from modalign.io import read_json

FAST = DiagnoseOptions(compute_mir=True, projection_pairs=50, histogram_pairs=500)


def _pairs(n: int, d: int, seed: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, x + 0.5 * rng.normal(size=(n, d)) + shift


def test_record_matches_the_metric_functions_and_is_json():
    x, y = _pairs(120, 8, 0)
    rec = diagnose({"image": x, "text": y}, options=FAST)
    json.dumps(rec, allow_nan=False)
    pair = rec["pairs"]["image|text"]
    assert pair["gap"]["centroid_distance"] == pytest.approx(
        modality_gap(x, y).centroid_distance)
    assert pair["alignment"] == pytest.approx(alignment(x, y))
    assert set(pair["hubness"]) == {"image->text", "text->image"}
    assert rec["modalities"]["text"]["n"] == 120
    assert rec["joint"]["spectrum"]["n_rows"] == 240
    assert pair["mir"]["reference"] == "text"
    series = rec["figures"]["image|text"]["histograms"]["series"]
    assert {"image-text positive", "image-text negative"} <= set(series)
    assert len(rec["figures"]["image|text"]["projection"]["points"]["image"]) == 50


def test_identical_modalities_have_zero_gap_and_mir_of_zero_distance():
    x, _ = _pairs(80, 6, 1)
    rec = diagnose({"a": x, "b": x.copy()}, options=FAST)
    pair = rec["pairs"]["a|b"]
    assert pair["gap"]["centroid_distance"] == pytest.approx(0.0, abs=1e-12)
    assert pair["mir"]["fid_total"] == pytest.approx(0.0, abs=1e-9)
    assert pair["agreement"]["agreement_x"] == 1.0


def test_groups_pair_rows_and_feed_intra_modal_positives():
    x, y = _pairs(60, 6, 2)
    # two image rows per group (e.g. two styles), one text row per group, shuffled
    images = np.vstack([x, x + 0.05])
    gi = np.r_[np.arange(60), np.arange(60)]
    order = np.random.default_rng(3).permutation(60)
    texts, gt = y[order], order
    rec = diagnose({"image": images, "text": texts}, groups={"image": gi, "text": gt},
                   options=FAST)
    assert rec["pairs"]["image|text"]["n_pairs"] == 60
    assert rec["pairs"]["image|text"]["alignment"] == pytest.approx(alignment(x, y))
    assert "image-image positive" in rec["figures"]["image|text"]["histograms"]["series"]
    ia, ib = pair_rows_by_group(gi, gt)
    np.testing.assert_array_equal(gt[ib], gi[ia])


def test_diagnose_is_seeded():
    x, y = _pairs(100, 5, 4)
    opts = DiagnoseOptions(compute_mir=False, uniformity_rows=40, knn_rows=40, seed=7,
                           projection_pairs=20, histogram_pairs=100)
    assert diagnose({"a": x, "b": y}, options=opts) == diagnose({"a": x, "b": y}, options=opts)


def test_diagnose_bad_input():
    x, y = _pairs(30, 4, 5)
    with pytest.raises(ValueError, match="at least two modalities"):
        diagnose({"a": x})
    with pytest.raises(ValueError, match="same number of rows"):
        diagnose({"a": x, "b": y[:20]})
    with pytest.raises(ValueError, match="empty"):
        diagnose({"a": x, "b": y[:0]})
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="row 3 contains NaN"):
        diagnose({"a": bad, "b": y}, options=FAST)
    with pytest.raises(ValueError, match=r"groups\['b'\]: expected 30 ids"):
        diagnose({"a": x, "b": y}, groups={"a": np.arange(30), "b": np.arange(5)})
    with pytest.raises(ValueError, match="share 5 groups"):
        diagnose({"a": x, "b": y}, groups={"a": np.arange(30), "b": np.arange(30) + 25},
                 options=FAST)
    with pytest.raises(ValueError, match="knn_rows"):
        DiagnoseOptions(knn_rows=0)


def _store(path, n=40, d=8, seed=0, shift=1.0):
    x, y = _pairs(n, d, seed, shift)
    store = EmbeddingStore(path)
    for name, vecs in (("image", x), ("text", y)):
        rows = [{"id": f"{name}{i}", "modality": name, "view": "v", "group": f"g{i}",
                 "split": "test" if i % 2 else "train", "labels": {}} for i in range(n)]
        store.add_array(name, vecs.astype(np.float32), rows)
    return store


@pytest.mark.slow
def test_cli_writes_json_and_html_and_compares(tmp_path, capsys):
    _store(tmp_path / "s1")
    _store(tmp_path / "s2", seed=1, shift=0.0)
    assert main(["diagnose", "--embeddings", str(tmp_path / "s1"), "--out",
                 str(tmp_path / "d1"), "--no-mir"]) == 0
    rec = read_json(tmp_path / "d1" / "diagnosis.json")
    assert rec["pairs"]["image|text"]["n_pairs"] == 40
    assert main(["diagnose", "--embeddings", str(tmp_path / "s2"), "--split", "test",
                 "--out", str(tmp_path / "d2"), "--compare", str(tmp_path / "d1")]) == 0
    rec2 = read_json(tmp_path / "d2" / "diagnosis.json")
    assert rec2["modalities"]["image"]["n"] == 20 and rec2["source"]["split"] == "test"
    html = (tmp_path / "d2" / "diagnosis.html").read_text()
    assert ">d1</th>" in html and ">d2</th>" in html
    assert html.count("data:image/png;base64,") >= 6
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["html"].endswith("diagnosis.html")


def test_cli_errors(tmp_path, capsys):
    assert main(["diagnose", "--out", str(tmp_path / "x")]) == 2
    assert "--embeddings" in capsys.readouterr().err
    _store(tmp_path / "s")
    assert main(["diagnose", "--embeddings", str(tmp_path / "s"), "--compare",
                 str(tmp_path / "missing")]) == 2
    assert "no diagnosis.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    assert "modality gap" in capsys.readouterr().out


def test_three_modalities_give_every_pair():
    x, y = _pairs(40, 6, 8)
    z = y - 2.0
    rec = diagnose({"image": x, "text": y, "audio": z},
                   options=DiagnoseOptions(compute_mir=False, projection_pairs=20,
                                           histogram_pairs=200))
    assert set(rec["pairs"]) == {"image|text", "image|audio", "text|audio"}
    assert rec["joint"]["spectrum"]["n_rows"] == 120
