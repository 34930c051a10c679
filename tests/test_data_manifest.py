from __future__ import annotations

import json

import pytest
from PIL import Image

from modalign.data import load_dataset, load_manifest
from modalign.errors import ModalignError


@pytest.fixture()
def pair_folder(tmp_path):
    for name, colour in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


def test_csv_with_bad_rows(pair_folder):
    csv = pair_folder / "pairs.csv"
    csv.write_text(
        "image,text,group,label\n"
        "red.png,a red square,r,red\n"
        "red.png,crimson tile,r,red\n"      # second caption of the same image
        "blue.png,a blue square,b,blue\n"
        "missing.png,ghost,g,none\n"       # missing file: image skipped, text kept
        "broken.png,   ,x,none\n"          # unreadable image and empty text
    )
    ds, report = load_manifest(csv)
    assert report.rows == 5
    reasons = sorted(s["reason"].split(":")[0] for s in report.skipped)
    assert reasons == ["empty value", "missing file", "unreadable image"]
    images = ds.select(modality="image")
    assert sorted(it.group for it in images) == ["b", "r"]  # red.png listed once per group
    texts = ds.select(modality="text")
    assert sorted(t.value for t in texts if t.group == "r") == ["a red square", "crimson tile"]
    assert {t.labels["label"] for t in texts} == {"red", "blue", "none"}
    # split is a function of the group: positives never straddle splits
    for g in ds.groups():
        assert len({it.split for it in ds.items if it.group == g}) == 1
    assert "3 x" not in report.summary() and "skipped 3" in report.summary()


def test_jsonl_views_and_default_groups(pair_folder):
    path = pair_folder / "pairs.jsonl"
    rows = [{"image:photo": "red.png", "text:caption": "red", "split": "test"},
            {"image:photo": "blue.png", "text:caption": "blue", "split": "train"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_dataset(path)
    assert ds.views("image") == ["photo"] and ds.views("text") == ["caption"]
    assert len(ds.groups()) == 2  # each row its own group
    assert [it.split for it in ds.select(modality="image")] == ["test", "train"]


def test_manifest_wrong_as_a_whole(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="no modality column"):
        load_manifest(p)
    p.write_text("image,text\n")
    with pytest.raises(ValueError, match="no rows"):
        load_manifest(p)
    p.write_text("")
    with pytest.raises(ValueError, match="header"):
        load_manifest(p)
    q = tmp_path / "x.txt"
    q.write_text("image\n")
    with pytest.raises(ValueError, match=r"csv or \.jsonl"):
        load_manifest(q)
    j = tmp_path / "x.jsonl"
    j.write_text("{not json}\n")
    with pytest.raises(ValueError, match="line 1"):
        load_manifest(j)
    with pytest.raises(ModalignError, match="not found"):
        load_manifest(tmp_path / "absent.csv")
    allbad = tmp_path / "bad.csv"
    allbad.write_text("image\nnope.png\n")
    with pytest.raises(ValueError, match="every row was skipped"):
        load_manifest(allbad)
    badsplit = tmp_path / "split.csv"
    badsplit.write_text("text,split\nhello,holdout\nworld,test\n")
    ds, report = load_manifest(badsplit)
    assert len(ds) == 1 and "bad split" in report.skipped[0]["reason"]
