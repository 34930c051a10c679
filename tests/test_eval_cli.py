"""``modalign eval`` end to end on a small embedding store (and a model with real text tower)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modalign.cli import main
from modalign.embed.store import EmbeddingStore
from modalign.evaluate.records import read_record
from modalign.evaluate.retrieval import cross_modal_retrieval, intra_modal_retrieval
from modalign.evaluate.zeroshot import save_class_embeddings

GROUPS = 24
DIMS = {"image": 16, "text": 384}


def make_store(path, dims=None, shared=True):
    """Two image views and two text views per group; groups 0-15 train, 16-23 test."""
    dims = dims or {"image": 16, "text": 16}
    gen = np.random.default_rng(0)
    centers = {m: gen.normal(size=(GROUPS, d)) for m, d in dims.items()}
    if shared:
        centers["text"] = centers["image"]
    store = EmbeddingStore(path)
    views = {"image": ("noto", "openmoji"), "text": ("name", "alias")}
    for modality, d in dims.items():
        rows, vecs = [], []
        for g in range(GROUPS):
            for v in views[modality]:
                vecs.append(centers[modality][g] + 0.8 * gen.normal(size=d))
                rows.append({"id": f"{modality}/{v}/{g}", "modality": modality, "view": v,
                             "group": f"g{g}", "split": "train" if g < 16 else "test",
                             "labels": {"subgroup": f"sub-{g % 3}", "group": f"grp-{g % 2}"}})
        store.add_array(modality, np.asarray(vecs, np.float32), rows)
    return store


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path / "store")


def run(*argv):
    return main(["eval", *map(str, argv)])


def only_record(folder):
    files = list(folder.glob("*.json"))
    assert len(files) == 1, files
    return read_record(files[0])


def test_retrieval_record_matches_the_library(store, tmp_path, capsys):
    out = tmp_path / "records"
    assert run("--embeddings", store.path, "--data", "toy", "--task", "retrieval",
               "--k", 1, 5, "--out", out) == 0
    rec = only_record(out)
    test = {m: store.load(m, split="test") for m in ("image", "text")}
    expected = cross_modal_retrieval(test, k_values=(1, 5)).metrics
    assert rec["metrics"] == pytest.approx(expected)
    assert rec["dataset"] == "toy" and rec["split"] == "test" and rec["task"] == "retrieval"
    assert [d["query"] for d in rec["protocol"]["directions"]] == ["image", "text"]
    assert rec["seed"] == 0 and rec["bridges"] == [] and rec["inversion"] is None
    assert "text → image recall@5" in capsys.readouterr().out


def test_bridges_and_merge(store, tmp_path):
    out = tmp_path / "records"
    assert run("--embeddings", store.path, "--out", out) == 0
    assert run("--embeddings", store.path, "--bridge", "centering",
               "--bridge", "localadj:r_gallery=0.3,pool_rate=0.1", "--out", out) == 0
    records = [read_record(p) for p in sorted(out.glob("*.json"))]
    assert sorted(len(r["bridges"]) for r in records) == [0, 2]
    bridged = next(r for r in records if r["bridges"])
    assert [b["name"] for b in bridged["bridges"]] == ["centering", "localadj"]
    assert run("merge", out, "--out", tmp_path / "table.csv") == 0
    lines = (tmp_path / "table.csv").read_text().splitlines()
    assert len(lines) == 3 and "image_retrieval_map" in lines[0]


def test_intra_modal(store, tmp_path):
    out = tmp_path / "r.json"
    assert run("--embeddings", store.path, "--task", "intra", "--modality", "image",
               "--query-view", "noto", "--gallery-view", "openmoji", "--out", out) == 0
    rec = read_record(out)
    expected = intra_modal_retrieval(store.load("image", split="test"), "image",
                                     query_view="noto", gallery_view="openmoji").metrics
    assert rec["metrics"] == pytest.approx(expected)


def test_inverted_queries_are_used_and_recorded(store, tmp_path):
    test_images = store.load("image", split="test")
    texts = store.load("text", split="test").filter(view="name")
    by_group = {it["group"]: texts.vectors[i] for i, it in enumerate(texts.items)}
    # "Inverted" image features: the name text of the same group (a perfect inversion).
    vecs = np.stack([by_group[it["group"]] for it in test_images.items])
    store.add_array("image_inv", vecs, test_images.items, info={"method": "test"})
    out = tmp_path / "r.json"
    assert run("--embeddings", store.path, "--inverted", "image=image_inv", "--out", out) == 0
    rec = read_record(out)
    assert rec["metrics"]["text_retrieval_recall@1"] == 1.0
    assert rec["inversion"]["queries"]["image"]["array"] == "image_inv"
    assert rec["protocol"]["directions"][0]["inverted_queries"] is True


def test_zero_shot_with_class_embedding_file(store, tmp_path):
    names = ["sub-0", "sub-1", "sub-2"]
    text = store.load("text", split="train")
    protos = torch.stack([torch.from_numpy(np.asarray(text.vectors))[
        [i for i, it in enumerate(text.items) if it["labels"]["subgroup"] == n]].mean(0)
        for n in names])
    save_class_embeddings(tmp_path / "c.safetensors", names, protos)
    out = tmp_path / "z.json"
    assert run("--embeddings", store.path, "--task", "zeroshot", "--label", "subgroup",
               "--class-embeddings", tmp_path / "c.safetensors", "--out", out) == 0
    rec = read_record(out)
    assert set(rec["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert rec["metrics"]["acc5"] == 1.0  # only three classes
    assert rec["protocol"]["num_classes"] == 3


def test_clear_errors(store, tmp_path, capsys):
    assert run("--embeddings", store.path, "--task", "zeroshot", "--out", tmp_path) == 2
    assert "--class-embeddings" in capsys.readouterr().err
    assert run("--embeddings", store.path, "--split", "val", "--out", tmp_path) == 2
    assert "no rows in that split" in capsys.readouterr().err
    assert run("--embeddings", store.path, "--bridge", "whiten", "--out", tmp_path) == 2
    assert "expected one of" in capsys.readouterr().err
    assert run("--out", tmp_path) == 2
    assert "--embeddings" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.slow
def test_model_folder_projects_features_and_encodes_prompts(tmp_path):
    from modalign.model import ModelConfig, MultiTowerModel

    store = make_store(tmp_path / "features", dims=DIMS, shared=False)
    torch.manual_seed(0)
    cfg = ModelConfig(towers={"image": "effnet-lite0", "text": "minilm"},
                      feature_dims=dict(DIMS), joint_dim=8)
    model_dir = MultiTowerModel(cfg).save_pretrained(tmp_path / "model")
    out = tmp_path / "records"
    assert run("--model", model_dir, "--embeddings", store.path, "--out", out) == 0
    rec = only_record(out)
    assert rec["model"] == str(model_dir)
    # text -> image mAP written out: each test text has its group's two images as positives
    model = MultiTowerModel.from_pretrained(model_dir)
    img, txt = store.load("image", split="test"), store.load("text", split="test")
    zi = model.project_array("image", np.asarray(img.vectors)).astype(np.float64)
    zt = model.project_array("text", np.asarray(txt.vectors)).astype(np.float64)
    aps = []
    for q in range(len(zt)):
        order = np.argsort(-(zi @ zt[q]), kind="stable")
        hit = img.group_ids()[order] == txt.group_ids()[q]
        ranks = np.flatnonzero(hit) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    assert rec["metrics"]["image_retrieval_map"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert run("--model", model_dir, "--embeddings", store.path, "--task", "zeroshot",
               "--label", "group", "--template", "an emoji of {}.", "--out", out) == 0
    zs = next(read_record(p) for p in out.glob("*.json") if "zeroshot" in p.name)
    assert zs["protocol"]["templates"] == ["an emoji of {}."]
    assert zs["protocol"]["num_classes"] == 2
    json.dumps(zs)


def test_split_all_bootstrap_off_and_clear_split_errors(store, tmp_path, capsys):
    out = tmp_path / "all.json"
    assert run("--embeddings", store.path, "--split", "all", "--bootstrap", 0, "--out", out) == 0
    rec = read_record(out)
    assert rec["split"] == "all" and rec["intervals"] == {} and rec["bootstrap"] is None
    assert rec["protocol"]["directions"][0]["num_queries"] == 2 * GROUPS
    assert run("--embeddings", store.path, "--split", "val", "--out", out) == 2
    err = capsys.readouterr().err
    assert "splits present: ['test', 'train']" in err and "--split all" in err
    assert run("--embeddings", store.path, "--bootstrap", -1, "--out", out) == 2
    with pytest.warns(UserWarning, match="few queries \\(image → text: 16"):
        assert run("--embeddings", store.path, "--out", tmp_path / "few.json") == 0


def test_group_as_label_and_neutral_templates():
    from modalign.evaluate.zeroshot import DEFAULT_TEMPLATES, default_templates
    from modalign.evaluate.zeroshot import group_as_label as _group_as_label

    rows = [{"id": "a", "group": "cat", "labels": {}}, {"id": "b", "group": "dog"}]
    from modalign.embed.store import Embeddings

    emb = _group_as_label(Embeddings(np.zeros((2, 3), np.float32), rows, {"cat": 0, "dog": 1}))
    assert emb.labels("group") == ["cat", "dog"]
    assert default_templates("emoji") == DEFAULT_TEMPLATES
    assert not any("emoji" in t for t in default_templates("shop/manifest.csv"))


def test_data_check_warns_about_leakage_and_a_small_test_split(tmp_path, capsys):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("text,group,split\na cat,g1,train\na cat,g2,test\na dog,g3,test\n")
    assert main(["data", "check", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "leakage: 1 text value(s) appear in more than one split (2 rows)" in out
    assert "small test split: 2 test groups" in out


def test_the_store_name_given_at_embed_time_names_the_record(store, tmp_path):
    from modalign.io import write_json_atomic

    write_json_atomic(store.path / "dataset.json", {"name": "toy", "display_name": "Toy set"})
    out = tmp_path / "records"
    assert run("--embeddings", store.path, "--out", out) == 0
    rec = only_record(out)
    assert rec["dataset"] == "Toy set"
    assert next(out.glob("*.json")).name.startswith("Toy-set_")


def test_few_queries_warning_suggests_more_data_only_where_there_is_more():
    from types import SimpleNamespace

    from modalign.evaluate.runner import small_data_warnings as _small_data_warnings

    result = SimpleNamespace(protocol={"directions": [
        {"query": "text", "gallery": "image", "num_queries": 21}]})
    with pytest.warns(UserWarning, match=r"text → image: 21\) in split 'test'.*--split all"):
        _small_data_warnings(result, "test")
    with pytest.warns(UserWarning) as seen:
        _small_data_warnings(result, "all")
    assert "--split all" not in str(seen[0].message)


def test_loading_a_model_folder_prints_no_transformers_progress_bar(tmp_path, capfd):
    """evaluate.run with --model: the MiniLM tower's weights load without transformers' bar,
    and transformers' own progress-bar setting is left as it was."""
    from transformers.utils import logging as hf_logging

    from modalign.evaluate import run as evaluate
    from modalign.model import ModelConfig, MultiTowerModel

    store = make_store(tmp_path / "features", dims=DIMS, shared=False)
    cfg = ModelConfig(towers={"image": "effnet-lite0", "text": "minilm"},
                      feature_dims=dict(DIMS), joint_dim=8)
    model_dir = MultiTowerModel(cfg).save_pretrained(tmp_path / "model")
    assert hf_logging.is_progress_bar_enabled()  # the default: bars on
    capfd.readouterr()
    # zero-shot: the text tower is loaded from the model folder to encode the prompts
    outcome = evaluate(model=model_dir, embeddings=store.path, task="zeroshot", label="group",
                       bootstrap=0)
    captured = capfd.readouterr()
    assert outcome.record["protocol"]["num_classes"] == 2
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled()
