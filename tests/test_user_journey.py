"""A new user's journey on their own image/text manifest, command by command, with real towers.

embed -> train -> diagnose -> eval with a bridge -> invert -> eval --inverted image=oti -> search ->
index build -> search --index -> report (checked in headless Chromium) -> eval merge.
"""

from __future__ import annotations

import csv
import json

import pytest

from modalign.cli import main
from modalign.evaluate.records import read_record
from modalign.evaluate.search import faiss_available
from modalign.io import read_json
from modalign.report.browser import find_chromium, render_in_browser, screenshot_stats

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220),
          "yellow": (230, 210, 30), "purple": (140, 40, 160)}
SHAPES = ("circle", "square", "triangle", "bar")


def write_manifest(root):
    """40 pairs: a coloured shape (two drawings each) and its caption; label = the shape."""
    from PIL import Image, ImageDraw

    (root / "photos").mkdir(parents=True)
    rows = []
    for i, (color, rgb) in enumerate(COLORS.items()):
        for j, shape in enumerate(SHAPES):
            for v in range(2):
                im = Image.new("RGB", (64, 64), (255, 255, 255) if v == 0 else (225, 225, 225))
                d, o = ImageDraw.Draw(im), 8 + 4 * v
                if shape == "circle":
                    d.ellipse([o, o, 64 - o, 64 - o], fill=rgb)
                elif shape == "square":
                    d.rectangle([o, o, 64 - o, 64 - o], fill=rgb)
                elif shape == "triangle":
                    d.polygon([(32, o), (o, 64 - o), (64 - o, 64 - o)], fill=rgb)
                else:
                    d.rectangle([o, 26, 64 - o, 38], fill=rgb)
                name = f"{color}_{shape}_{v}.png"
                im.save(root / "photos" / name)
                rows.append({"image": f"photos/{name}", "text": f"a {color} {shape}",
                             "group": f"{color}-{shape}-{v}", "label": shape,
                             "split": "test" if (i + j + v) % 4 == 0 else "train"})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_users_own_data_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = str(write_manifest(tmp_path / "shop"))
    assert main(["embed", "--data", data, "--name", "shop-photos"]) == 0  # the folder key stays
    with pytest.warns(UserWarning, match="batch 16 holds more than a tenth of the 30 training "
                      "groups: 1 steps per epoch, 14 groups dropped"):
        assert main(["train", "--set", f"data.dataset={data}", "--set", "data.val_split=test",
                     "--set", "train.epochs=3", "--set", "train.batch_size=16",
                     "--set", "model.joint_dim=16", "--set", "train.progress=false",
                     "--run.dir", "runs/shop"]) == 0
    model = "runs/shop/model"
    with pytest.warns(UserWarning, match="diagnosing 40 rows per modality"):
        assert main(["diagnose", "--model", model, "--data", data, "--out",
                     "runs/shop/diagnosis"]) == 0
    assert read_json(tmp_path / "runs/shop/diagnosis/diagnosis.json")["options"]["k"] == 4

    # eval with a bridge: intervals in the record, a paired difference against native
    assert main(["eval", "--model", model, "--data", data, "--bridge", "centering",
                 "--bootstrap", "200", "--out", "records"]) == 0
    out = capsys.readouterr().out
    assert "image → text recall@1" in out and "vs native" in out
    (bridged_path,) = list((tmp_path / "records").glob("*.json"))
    assert bridged_path.name.startswith("shop-photos_shop_retrieval_")  # not "manifest"
    bridged = read_record(bridged_path)
    assert bridged["dataset"] == "shop-photos"  # the name given to `embed --name`
    lo, hi = bridged["intervals"]["text_retrieval_recall@1"]
    assert lo <= bridged["metrics"]["text_retrieval_recall@1"] <= hi
    diff = bridged["comparisons"][0]["differences"]["text_retrieval_map"]
    assert diff["queries"] == 10 and len(diff["interval"]) == 2

    # --inverted before and after the inversion exists
    assert main(["eval", "--model", model, "--data", data, "--inverted", "image=oti",
                 "--out", "records"]) == 2
    assert "run 'modalign invert" in capsys.readouterr().err
    assert main(["invert", "--model", model, "--data", data, "--direction", "image-to-text",
                 "--steps", "5", "--limit", "4", "--batch-size", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "first 2 items x 5 steps took" in captured.err and "for the other 2" in captured.err
    array = json.loads(captured.out.strip().splitlines()[-1])["array"]
    assert main(["eval", "--model", model, "--data", data, "--inverted", "image=oti",
                 "--bootstrap", "100", "--name", "shop-oti", "--out", "records"]) == 0
    inverted = read_record(next((tmp_path / "records").glob("shop-photos_shop-oti_*.json")))
    assert inverted["inversion"]["queries"]["image"]["array"] == array
    assert inverted["inversion"]["queries"]["image"]["num_queries"] == 4
    assert inverted["inversion"]["queries"]["image"]["of"] == 10
    assert inverted["protocol"]["directions"][0]["num_queries"] == 4

    # search the user's data, then through an index file
    capsys.readouterr()
    assert main(["search", "--model", model, "--data", data, "--text", "a red circle",
                 "--k", "3", "--json"]) == 0
    hits = last_json(capsys)["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["value"].endswith(".png")
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    if faiss_available():
        assert main(["index", "build", "--model", model, "--data", data, "--out",
                     "shop.faiss"]) == 0
        capsys.readouterr()
        assert main(["search", "--index", "shop.faiss", "--text", "a red circle", "--k", "3",
                     "--json"]) == 0
        assert [h["id"] for h in last_json(capsys)["hits"]] == [h["id"] for h in hits]

    # one report for the run, its records and its diagnosis
    assert main(["report", "runs/shop", "records", "--data", data, "--label", "label",
                 "--out", "report.html"]) == 0
    html = (tmp_path / "report.html").read_text()
    for title in ("shop: training", "Evaluation records", "shop diagnosis: Metrics",
                  "shop: search gallery", "shop: zero-shot confusion"):
        assert title in html
    chromium = find_chromium()
    if chromium is not None:
        shown = render_in_browser(tmp_path / "report.html", tmp_path / "report.png",
                                  executable=chromium)
        assert shown.console_messages == []
        stats = screenshot_stats(shown.screenshot)
        assert stats["std"] > 20 and stats["non_white_share"] > 0.05

    assert main(["eval", "merge", "records", "--out", "table.csv"]) == 0
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["name"] for r in rows} == {"shop", "shop-oti"}
    assert {r["bridges"] for r in rows} == {"centering(renormalize=True)", "none"}
    assert all(r["text_retrieval_recall@1_ci_low"] for r in rows)
