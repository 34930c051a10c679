"""Search helpers, index files, inverted-array resolution, names and flattened tables."""

from __future__ import annotations

import csv
import os
import time

import numpy as np
import pytest
import torch

from modalign.cli import main
from modalign.embed.store import EmbeddingStore
from modalign.errors import ModalignError
from modalign.evaluate.index_file import read_index, write_index
from modalign.evaluate.inverted import InvertedSpec, parse_inverted, resolve_inverted
from modalign.evaluate.records import (
    flatten_protocol,
    make_record,
    merge_records,
    write_csv,
    write_record,
)
from modalign.evaluate.retrieval import cross_modal_retrieval, toy_embeddings
from modalign.evaluate.search import faiss_available
from modalign.evaluate.semantic import resolve_model_dir, semantic_search
from modalign.naming import dataset_name, model_name
from modalign.vocabulary import describe_metric, parse_direction


def test_semantic_search_equals_a_full_sort():
    gallery = toy_embeddings(groups=9)["image"]
    q = torch.nn.functional.normalize(torch.randn(3, gallery.dim, generator=torch.Generator()
                                                  .manual_seed(0)), dim=1)
    hits = semantic_search(q, gallery, k=4)
    g = torch.nn.functional.normalize(torch.from_numpy(gallery.vectors.copy()), dim=1)
    for row, hs in zip(q @ g.T, hits):
        order = torch.argsort(row, descending=True)[:4].tolist()
        assert [h.id for h in hs] == [gallery.items[i]["id"] for i in order]
        assert [h.rank for h in hs] == [1, 2, 3, 4]
        assert [h.score for h in hs] == pytest.approx(row[order].tolist(), abs=1e-6)
    assert len(semantic_search(q, gallery, k=500)[0]) == len(gallery)
    with pytest.raises(ModalignError, match="k=0"):
        semantic_search(q, gallery, k=0)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_index_file_round_trip_equals_exact_search(tmp_path):
    gallery = toy_embeddings(groups=10)["text"]
    path = write_index(tmp_path / "g.faiss", gallery, "flat", meta={"model": "m"})
    index, rows, meta = read_index(path)
    assert meta["model"] == "m" and meta["kind"] == "flat" and len(rows) == len(gallery)
    q = torch.from_numpy(gallery.vectors[:2].copy())
    via_file = semantic_search(q, rows, k=5, index=index)
    exact = semantic_search(q, gallery, k=5)
    assert [[h.id for h in hs] for hs in via_file] == [[h.id for h in hs] for hs in exact]
    assert [h.score for h in via_file[0]] == pytest.approx([h.score for h in exact[0]], abs=1e-5)
    (tmp_path / "g.faiss.json").unlink()
    with pytest.raises(ModalignError, match="id map"):
        read_index(path)


def test_run_folder_gets_a_hint(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    with pytest.raises(ModalignError, match="run/model"):
        resolve_model_dir(tmp_path / "run")
    assert resolve_model_dir(tmp_path / "run" / "model") == tmp_path / "run" / "model"
    code = main(["search", "--model", str(tmp_path / "run"), "--data", "x.csv", "--text", "a"])
    assert code == 2


def _inverted_array(store, name, split, steps, weights="w1", direction="image-to-text"):
    rows = [{"id": f"i{j}", "modality": "text", "view": "", "group": f"g{j}", "split": split}
            for j in range(3)]
    store.add_array(name, np.eye(3, dtype=np.float32), rows, info={"inversion": {
        "method": "oti", "direction": direction, "split": split, "views": None,
        "model_weights": weights, "settings": {"steps": steps}, "forward": {}}})


def test_inverted_arrays_are_found_by_what_they_are(tmp_path):
    store = EmbeddingStore(tmp_path / "s")
    _inverted_array(store, "text.oti.aaa", "test", 20)
    _inverted_array(store, "text.oti.zzz", "train", 20)
    _inverted_array(store, "text.oti.other", "test", 20, weights="w2")
    spec = parse_inverted("image=oti")
    assert resolve_inverted(spec, store, split="test", model_weights="w1") == "text.oti.aaa"
    time.sleep(0.01)
    _inverted_array(store, "text.oti.bbb", "test", 50)
    os.utime(store.path / "text.oti.bbb.npy", ns=(time.time_ns() + 10**9,) * 2)
    with pytest.raises(ModalignError, match=r"2 arrays match.*steps=50.*image=oti:latest"):
        resolve_inverted(spec, store, split="test", model_weights="w1")
    latest = parse_inverted("image=oti:latest")
    assert resolve_inverted(latest, store, split="test", model_weights="w1") == "text.oti.bbb"
    assert resolve_inverted(parse_inverted("image=text.oti.zzz"), store, split="test") \
        == "text.oti.zzz"
    with pytest.raises(ModalignError, match="run 'modalign invert"):
        resolve_inverted(parse_inverted("text=ovi"), store, split="test")
    with pytest.raises(ModalignError, match="QUERY=METHOD"):
        parse_inverted("image")


@pytest.mark.parametrize("bad", ["image", "image=", "=oti", " = oti", ":noto=oti"])
def test_parse_inverted_refuses_what_is_not_query_equals_what(bad):
    with pytest.raises(ModalignError, match=rf"^--inverted {bad!r}: expected QUERY=METHOD "):
        parse_inverted(bad)


def test_parse_inverted_strips_like_every_key_value():
    assert parse_inverted(" image:noto = oti:latest ") == InvertedSpec("image:noto", "oti", True)
    assert parse_inverted("text=ovi").modality == "text"


def load_dataset_name(folder):
    from modalign.data import load_dataset

    (folder / "manifest.csv").write_text("text,group\na cat,g1\n")
    return load_dataset(folder / "manifest.csv").name


def test_names_and_vocabulary(tmp_path):
    assert dataset_name("data/shop/manifest.csv") == "shop"
    assert load_dataset_name(tmp_path) == tmp_path.name  # the loaded dataset is named so too
    assert dataset_name("birds.jsonl") == "birds" and dataset_name("emoji") == "emoji"
    assert model_name("runs/cua/model") == "cua" and model_name("runs/cua/model/") == "cua"
    assert parse_direction("i2t") == ("image", "text")
    assert parse_direction("image|text") == parse_direction("image-to-text")
    assert describe_metric("image_retrieval_recall@1", ("image", "text")) == \
        "text → image recall@1"
    with pytest.raises(ModalignError, match="QUERY-to-GALLERY"):
        parse_direction("sideways")


def test_merge_keeps_protocols_apart(tmp_path):
    def zeroshot(templates):
        return make_record(dataset="d", split="test", model="runs/a/model", task="zeroshot",
                           protocol={"inputs": "image", "label": "label", "templates": templates,
                                     "num_inputs": 5}, metrics={"acc1": 0.5},
                           intervals={"acc1": (0.2, 0.8)})

    write_record(zeroshot(["a photo of a {}."]), tmp_path)
    write_record(zeroshot(["{}"]), tmp_path)
    rows = merge_records([tmp_path])
    assert sorted(r["templates"] for r in rows) == ["a photo of a {}.", "{}"]
    assert {r["name"] for r in rows} == {"a"} and rows[0]["acc1_ci_low"] == 0.2
    emb = toy_embeddings()
    result = cross_modal_retrieval(emb, k_values=(1,))
    flat = flatten_protocol({"protocol": result.protocol, "bridges": [], "inversion": None})
    assert flat["directions"] == "image-to-text;text-to-image"
    assert flat["num_queries"] == f"{len(emb['image'])};{len(emb['text'])}"
    for key, values in result.per_query.items():  # the intervals' inputs agree with the metrics
        assert values.statistic() == pytest.approx(result.metrics[key])
    out = write_csv(rows, tmp_path / "t.csv")
    header = next(csv.reader(out.open()))
    assert {"templates", "directions", "acc1_ci_high"} <= set(header)
