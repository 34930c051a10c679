"""``refine_model`` and ``modalign refine`` on a small store with a real text tower."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from modalign.cli import main
from modalign.errors import ModalignError
from modalign.model import ModelConfig, MultiTowerModel
from modalign.refine import RefineConfig, evaluate_model, refine_model
from modalign.train.data import PairedFeatures
from test_eval_cli import DIMS, make_store


@pytest.fixture()
def setup(tmp_path):
    store = make_store(tmp_path / "features", dims=DIMS, shared=False)
    torch.manual_seed(0)
    cfg = ModelConfig(towers={"image": "effnet-lite0", "text": "minilm"},
                      feature_dims=dict(DIMS), joint_dim=8)
    model_dir = MultiTowerModel(cfg).save_pretrained(tmp_path / "model")
    return store, model_dir


def test_refine_changes_only_heads_and_keeps_the_teacher(setup):
    store, model_dir = setup
    model = MultiTowerModel.from_pretrained(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = PairedFeatures(store, ["image", "text"], "train")
    r = refine_model(model, data, RefineConfig(batch_size=8, lr=1e-2, epochs=3))
    assert r.steps == 6 and {"rafa", "hycd"} <= set(r.log[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = [k for k, v in r.model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and all(k.startswith("heads.") for k in changed)
    m = evaluate_model(r.model, store, split="test")
    # the same numbers, written out: unit joint vectors, centroid distance, text->image top-1
    img, txt = store.load("image", split="test"), store.load("text", split="test")
    zi = r.model.project_array("image", np.asarray(img.vectors)).astype(np.float64)
    zt = r.model.project_array("text", np.asarray(txt.vectors)).astype(np.float64)
    assert m["gap"] == pytest.approx(np.linalg.norm(zi.mean(0) - zt.mean(0)), abs=1e-5)
    top1 = (zt @ zi.T).argmax(axis=1)
    hits = img.group_ids()[top1] == txt.group_ids()
    assert m["image_retrieval_recall@1"] == pytest.approx(hits.mean(), abs=1e-12)


def test_rafa_alone_on_raw_features_closes_the_gap(setup):
    store, model_dir = setup
    model = MultiTowerModel.from_pretrained(model_dir)
    data = PairedFeatures(store, ["image", "text"], "train")
    cfg = RefineConfig(batch_size=16, lr=1e-2, epochs=30, lambda_kd=0.0)
    gap0 = evaluate_model(model, store, split="train")["gap"]
    gap1 = evaluate_model(refine_model(model, data, cfg).model, store, split="train")["gap"]
    assert gap1 < 0.7 * gap0  # measured: 0.29 -> 0.16


def test_errors(setup):
    store, model_dir = setup
    data = PairedFeatures(store, ["image", "text"], "train")
    model = MultiTowerModel.from_pretrained(model_dir)
    with pytest.raises(ModalignError, match="label"):
        refine_model(model, data, RefineConfig(method="cma"))
    with pytest.raises(ModalignError, match="alpha"):
        refine_model(model, data, RefineConfig(alpha=2.0))
    with pytest.raises(ModalignError, match="nothing to train"):
        refine_model(model, data, RefineConfig(lambda_rand=0, lambda_kd=0))


@pytest.mark.parametrize("method", ["clip-refine", "cma"])
def test_refine_command_writes_model_and_record(setup, tmp_path, method):
    store, model_dir = setup
    out = tmp_path / f"refined-{method}"
    argv = ["refine", "--model", str(model_dir), "--embeddings", str(store.path), "--out",
            str(out), "--method", method, "--label", "group", "--lr", "1e-3", "--batch-size",
            "8"]
    assert main(argv) == 0
    refined = MultiTowerModel.from_pretrained(out)
    assert refined.config == MultiTowerModel.from_pretrained(model_dir).config
    rec = json.loads((out / "refine.json").read_text())
    assert rec["task"] == "refine" and rec["protocol"]["refine"]["method"] == method
    for key in ("gap", "image_retrieval_recall@1", "zeroshot_acc1"):
        assert np.isfinite(rec["metrics"][f"before/{key}"])
        assert np.isfinite(rec["metrics"][f"after/{key}"])
    assert main([*argv[:-4], "--alpha", "3"]) == 2


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A model whose image tower is fine-tuned (TinyImageTower), the dataset and its store."""
    from modalign.data.dataset import PairedDataset
    from modalign.embed.store import EmbeddingStore
    from train_support import HashTextEncoder, TinyImageTower, tiny_image_dataset

    root, store = tiny_image_dataset(tmp_path_factory.mktemp("tuned"))
    torch.manual_seed(0)
    model = MultiTowerModel(ModelConfig(towers={"image": "tiny-image", "text": "hash-text"},
                                        feature_dims={"image": 12, "text": 8}, joint_dim=8,
                                        trainable_towers=["image"]))
    model.attach_tower("image", TinyImageTower())
    model.attach_tower("text", HashTextEncoder())
    return model, PairedDataset.load(root), EmbeddingStore(store)


def _naive_image_features(model, dataset, data, rows):
    """Tower features of the drawn image rows, one image at a time."""
    from modalign.embed.encode import raw_input

    by_id = {it.id: it for it in dataset.items}
    tower = model.towers["image"]
    return torch.cat([tower.encode(tower.preprocess(
        [raw_input(dataset, by_id[data.tables["image"].items[r]["id"]])]).double()) for r in rows])


def test_refine_trains_the_tuned_tower_tail_against_a_reference(tuned):
    from modalign.refine.losses import hycd_loss, rafa_loss

    model, dataset, store = tuned
    data = PairedFeatures(store, ["image", "text"], "train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr, wd = 1e-3, 0.1
    cfg = RefineConfig(batch_size=len(data), lr=lr, weight_decay=wd)  # one step
    with pytest.raises(ModalignError, match="dataset"):
        refine_model(model, data, cfg)
    r = refine_model(model, data, cfg, dataset=dataset)
    assert r.steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # teacher kept
    # reference: the step's loss recomputed with images encoded one by one, in float64
    groups = data.batch_groups(seed=0, epoch=0, index=0, batch_size=len(data))
    rows = data.draw_rows(groups, seed=0, epoch=0, index=0)
    ref = copy.deepcopy(model).double()
    img = _naive_image_features(ref, dataset, data, rows["image"].tolist())
    za = ref.head_for("image")(img.double())
    zb = ref.head_for("text")(data.features(rows)["text"].double())
    reference = torch.randn(za.shape, generator=torch.Generator().manual_seed(0)).double()
    rafa = rafa_loss(za, zb, reference=reference)
    hycd = hycd_loss(za, zb, za.detach(), zb.detach())
    assert r.log[0]["rafa"] == pytest.approx(rafa.item(), rel=1e-5)
    assert r.log[0]["hycd"] == pytest.approx(hycd.item(), rel=1e-5)
    (rafa + hycd).backward()
    # AdamW's first step is w (1 - lr wd) - lr g / (|g| + eps): it recovers the gradient's sign
    state = r.model.state_dict()
    params = dict(ref.named_parameters())
    for name in ("towers.image.top.weight", "towers.image.top.bias", "heads.image.layers.0.weight",
                 "heads.text.layers.0.weight"):
        w0 = params[name]
        g = w0.grad
        expected = w0.detach() * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(state[name].double(), expected, atol=2e-6, rtol=0)
        assert g.abs().max() > 0
    # stage 1 of 2 (tower_stages=1): the stem is untouched although it had a gradient
    assert ref.towers["image"].stem.weight.grad.abs().max() > 0
    assert torch.equal(state["towers.image.stem.weight"], before["towers.image.stem.weight"])
    assert not torch.equal(state["towers.image.top.weight"], before["towers.image.top.weight"])
    # the refined model is measured through its own tower
    after = evaluate_model(r.model, store, split="test", dataset=dataset)
    assert after["gap"] >= 0
    with pytest.raises(ModalignError, match="fine-tuned"):
        evaluate_model(r.model, store, split="test")
    with pytest.raises(ModalignError, match="tower_stages"):
        refine_model(model, data, RefineConfig(tower_stages=3), dataset=dataset)


def test_refine_command_on_a_fine_tuned_image_tower(tmp_path):
    from modalign.encoders import load_encoder
    from train_support import tiny_image_dataset

    root, _ = tiny_image_dataset(tmp_path / "data")
    spec = "effnet-lite0:image_size=32"
    model = MultiTowerModel(ModelConfig(towers={"image": spec, "text": "minilm"},
                                        feature_dims={"image": 1280, "text": 384}, joint_dim=8,
                                        trainable_towers=["image"]))
    model.attach_tower("image", load_encoder(spec, modality="image"))
    model_dir = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "refined"
    argv = ["refine", "--model", str(model_dir), "--data", str(root), "--out", str(out),
            "--lr", "1e-3", "--batch-size", "8"]
    assert main(argv) == 0
    start, refined = (MultiTowerModel.from_pretrained(d).state_dict() for d in (model_dir, out))
    changed = {k.split(".")[0] for k, v in refined.items() if not torch.equal(start[k], v)}
    assert changed == {"heads", "towers"}
    tower = model.towers["image"]
    last = {id(p) for p in tower.blocks()[-1].parameters()}
    last_stage = {f"towers.image.{n}" for n, p in tower.named_parameters() if id(p) in last}
    tuned = {k for k, v in refined.items() if k.startswith("towers.")
             and not torch.equal(start[k], v)}
    assert tuned and tuned <= last_stage  # --tower-stages 1: only the last stage moved
    rec = json.loads((out / "refine.json").read_text())
    assert np.isfinite(rec["metrics"]["after/gap"]) and np.isfinite(rec["metrics"]["before/gap"])
    assert rec["protocol"]["refine"]["tower_stages"] == 1
    assert main([*argv[:3], "--embeddings", str(tmp_path), *argv[5:]]) == 2
