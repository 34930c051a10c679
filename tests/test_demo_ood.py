"""The emoji OoD protocol on a small store: held-out group, training, refinement, report rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modalign.demo.ood import (
    demo_variants,
    holdout_store,
    ood_table,
    pick_holdout,
    run_ood_protocol,
)
from modalign.embed.store import EmbeddingStore
from modalign.evaluate.zeroshot import DEFAULT_TEMPLATES, build_prompts, class_name
from modalign.model import MultiTowerModel
from modalign.refine import RefineConfig
from test_eval_cli import DIMS, make_store

TRAIN = ["train.epochs=2", "train.batch_size=4", "data.val_split="]


pytestmark = pytest.mark.usefixtures("one_thread")  # small networks: one thread is faster


def test_holdout_store_removes_every_row_of_the_group(tmp_path):
    full = make_store(tmp_path / "full", dims=DIMS, shared=False)
    assert pick_holdout(full) == "grp-0"  # the preferred group is absent: smallest, then name
    ind = holdout_store(full, "grp-1", tmp_path / "id")
    for m in ("image", "text"):
        labels = ind.load(m).labels("group")
        assert "grp-1" not in labels and len(labels) == full.load(m).labels("group").count(
            "grp-0")


def test_protocol_trains_refines_and_compares(tmp_path):
    full = make_store(tmp_path / "full", dims=DIMS, shared=False)
    variants = {"raw": RefineConfig(lr=1e-3, epochs=2, batch_size=4)}
    summary = run_ood_protocol(full, tmp_path / "work", holdout="grp-1", variants=variants,
                               train_overrides=TRAIN,
                               n_boot=20)
    base, refined = summary["models"]["base (clip)"], summary["models"]["raw"]
    assert summary["num_id_classes"] == 3 and base["num_ood"] == 24  # 12 groups x 2 views
    # the base model's AUROCs recomputed: its image rows (ID: the other groups' test rows;
    # OOD: the held-out group), the class prompts through its text tower averaged per class,
    # the scores at tau = 1 (MCM: max softmax of the cosines), ID positive, ties counting 1/2
    model = MultiTowerModel.from_pretrained(summary["model_dir"])
    img = full.load("image")
    names = [f"sub-{c}" for c in range(3)]
    prompts = build_prompts([class_name(c) for c in names], DEFAULT_TEMPLATES)
    with torch.no_grad():
        z = torch.from_numpy(model.project_array("image", img.vectors)).double()
        z = torch.nn.functional.normalize(z, dim=1)
        t = model.encode("text", [p for per in prompts for p in per]).double()
    protos = torch.nn.functional.normalize(
        torch.nn.functional.normalize(t, dim=1).reshape(3, len(DEFAULT_TEMPLATES), -1).mean(1),
        dim=1)
    group, split = np.array(img.labels("group")), np.array([it["split"] for it in img.items])
    is_id, is_ood = (group != "grp-1") & (split == "test"), group == "grp-1"
    cos = z @ protos.T
    scores = {"mcm": torch.softmax(cos, dim=1).amax(1), "energy": cos.logsumexp(1),
              "max_logit": cos.amax(1),  # and the cosine to the nearest ID training row:
              "knn": (z @ z[(group != "grp-1") & (split == "train")].T).amax(1)}
    for key, score in scores.items():
        diff = score.numpy()[is_id][:, None] - score.numpy()[is_ood][None, :]
        expected = np.mean((diff > 0) + 0.5 * (diff == 0))
        assert base[f"{key}/auroc"] == pytest.approx(expected, abs=1e-6), key
    change, lo, hi = refined["delta_mcm/auroc"]
    assert change == pytest.approx(refined["mcm/auroc"] - base["mcm/auroc"])
    assert lo <= hi
    rows = ood_table(summary)
    assert [r["model"] for r in rows] == ["base (clip)", "raw"] and rows[0]["ΔMCM AUROC"] == ""
    # a second run reuses the trained model folder
    again = run_ood_protocol(full, tmp_path / "work", holdout="grp-1", variants={},
                             train_overrides=TRAIN,
                             n_boot=20)
    assert again["model_dir"] == summary["model_dir"]
    assert again["models"]["base (clip)"]["mcm/auroc"] == base["mcm/auroc"]


def test_single_group_is_skipped(tmp_path):
    store = EmbeddingStore(tmp_path / "one")
    rows = [{"id": f"i{i}", "modality": "image", "view": "v", "group": f"g{i}", "split": "test",
             "labels": {"group": "only"}} for i in range(3)]
    store.add_array("image", np.ones((3, 2), np.float32), rows)
    assert "skipped" in run_ood_protocol(store, tmp_path / "w")
    assert len(demo_variants()) == 3
