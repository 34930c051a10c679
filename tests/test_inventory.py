"""``modalign runs`` / ``modalign stores`` list what exists; a missing extra is one line."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from modalign.cli import main
from modalign.embed.store import EmbeddingStore
from modalign.inventory import list_runs, list_stores


def test_runs_and_stores_are_listed(tmp_path, capsys):
    run = tmp_path / "runs" / "shop"
    (run / "model").mkdir(parents=True)
    (run / "log.jsonl").write_text('{"epoch": 1}\n')
    (run / "model" / "config.json").write_text(json.dumps(
        {"model": {"towers": {"image": "effnet-lite0", "text": "minilm"}}}))
    (run / "config.resolved.json").write_text(json.dumps(
        {"config": {"data": {"dataset": "shop/manifest.csv"}}}))
    (run / "summary.json").write_text(json.dumps({"metric": "i2t_r1", "best": {"i2t_r1": 0.25}}))
    (tmp_path / "runs" / "not-a-run").mkdir()
    rows = list_runs([tmp_path / "runs"])
    assert [r["name"] for r in rows] == ["shop"]
    # an older summary's i2t_r1 reads as today's key (no recorded pair: image, text)
    assert rows[0]["data"] == "shop/manifest.csv"
    assert rows[0]["best"] == "image-to-text_recall@1 0.250"
    assert rows[0]["towers"] == "image=effnet-lite0,text=minilm"
    store = EmbeddingStore(tmp_path / "emb" / "shop-abc")
    store.add_array("text", np.zeros((3, 2), np.float32),
                    [{"id": str(i), "modality": "text", "group": str(i)} for i in range(3)],
                    info={"encoder": {"name": "minilm"}})
    (row,) = list_stores([tmp_path / "emb"])
    assert row["data"] == "shop" and row["arrays"] == "text:3(minilm)"
    assert main(["runs", str(tmp_path / "runs")]) == 0
    assert "shop/manifest.csv" in capsys.readouterr().out
    assert main(["stores", str(tmp_path / "emb"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "shop-abc"


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None,
                    reason="open_clip is installed")
def test_a_missing_optional_extra_is_one_line(tmp_path, capsys):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("text,group\na cat,g1\na dog,g2\n")
    code = main(["embed", "--data", str(manifest), "--text", "open_clip:ViT-B-32/none",
                 "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'modalign[openclip]'" in err


def test_embed_name_is_shown_and_the_store_is_still_found(tmp_path, capsys, monkeypatch):
    import modalign.encoders
    from modalign.data import load_dataset
    from modalign.embed.paths import default_store_dir
    from train_support import HashTextEncoder

    monkeypatch.setenv("MODALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(modalign.encoders, "load_encoder", lambda spec, modality=None: (
        HashTextEncoder()))
    manifest = tmp_path / "shop" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("text,group\na cat,g1\na dog,g2\na cow,g3\n")
    argv = ["embed", "--data", str(manifest), "--modalities", "text"]
    assert main([*argv, "--name", "Shop photos"]) == 0
    assert "as 'Shop photos'" in capsys.readouterr().out
    # the folder key is the data and towers, so train/eval/search --data find the same store
    path = default_store_dir(load_dataset(manifest), {"text": "minilm"})
    assert path.name.startswith("shop-") and EmbeddingStore(path).display_name == "Shop photos"
    (row,) = list_stores()
    assert row["data"] == "Shop photos" and row["name"] == path.name
    assert main(argv) == 0  # updated without --name: the name is kept
    assert EmbeddingStore(path).display_name == "Shop photos"
    assert main([*argv, "--name", "Shop v2"]) == 0
    assert list_stores()[0]["data"] == "Shop v2"
    capsys.readouterr()
    assert main([*argv, "--name", " "]) == 2
    assert "--name ' ': expected a non-empty dataset name" in capsys.readouterr().err
