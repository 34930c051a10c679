"""Multistage contrastive learning (MCL): the cluster-ordered batches and the pseudo-labels
against naive references, k-means on separated blobs, and a two-stage run from the config that
concatenates its stages and resumes bitwise."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from modalign.cli import main
from modalign.errors import ModalignError
from modalign.io import write_json_atomic
from modalign.train.checkpoint import load_checkpoint
from modalign.train.config import TrainConfig
from modalign.train.data import PairedFeatures
from modalign.train.recipes.mcl import MultistageModel, kmeans_labels, mixed_radix
from train_support import synthetic_store


def test_batches_follow_the_clusters_and_one_cluster_is_plain_training(tmp_path):
    store = synthetic_store(tmp_path / "store", n_groups=60)
    data = PairedFeatures(store, ["image", "text"], "train")  # 40 groups
    plain = [data.batch_groups(seed=0, epoch=1, index=i, batch_size=8) for i in range(5)]
    data.clusters = np.zeros(len(data.groups), dtype=np.int64)  # K = 1: the plain batches
    for i in range(5):
        assert np.array_equal(data.batch_groups(seed=0, epoch=1, index=i, batch_size=8),
                              plain[i])
    data.clusters = np.arange(len(data.groups)) % 4  # 4 clusters of 10 groups
    cluster_of = dict(zip(data.groups.tolist(), data.clusters.tolist(), strict=True))
    order = np.concatenate([data.batch_groups(seed=0, epoch=1, index=i, batch_size=8)
                            for i in range(5)])
    assert sorted(order.tolist()) == sorted(data.groups.tolist())  # every group once
    runs = [cluster_of[int(g)] for g in order]
    changes = [i for i in range(1, len(runs)) if runs[i] != runs[i - 1]]
    assert len(changes) == 3  # each cluster is one contiguous run of the epoch
    mixed = sum(len({runs[j] for j in range(i, i + 8)}) > 1 for i in range(0, 40, 8))
    assert mixed <= 3  # at most one batch per cluster boundary holds two clusters
    other = np.concatenate([data.batch_groups(seed=0, epoch=2, index=i, batch_size=8)
                            for i in range(5)])
    assert not np.array_equal(order, other)  # a new order every epoch


def test_mixed_radix_and_kmeans_against_naive_references():
    a, b = np.array([0, 1, 1, 2, 0]), np.array([1, 1, 0, 1, 1])
    got = mixed_radix([a, b], 3)
    pairs = sorted({(int(x) + 3 * int(y)) for x, y in zip(a, b, strict=True)})
    assert got.tolist() == [pairs.index(int(x) + 3 * int(y)) for x, y in zip(a, b, strict=True)]
    rng = np.random.default_rng(0)
    centres = np.eye(6)[:3] * 5
    truth = np.repeat(np.arange(3), 20)
    x = centres[truth] + 0.1 * rng.normal(size=(60, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = kmeans_labels(x, 3, seed=0)
    assert len(set(zip(truth.tolist(), labels.tolist(), strict=True))) == 3  # the blobs found


def test_two_stages_from_the_config_concatenate_and_resume_bitwise(tmp_path, capsys):
    synthetic_store(tmp_path / "store", n_groups=60)
    args = ["train", "--set", f"data.embeddings='{tmp_path / 'store'}'", "--set",
            "data.dataset=''", "--set", "model.towers={image='fake-image', text='fake-text'}",
            "--set", "model.joint_dim=8", "--set", "train.batch_size=8", "--set",
            "train.epochs=2", "--set", "train.num_threads=1", "--set", "mcl.stages=2",
            "--set", "mcl.clusters=3", "--set", "train.checkpoint_every=1", "--set",
            "train.keep_checkpoints=20", "--set", "train.progress=false"]
    assert main([*args, "--set", f"run.dir='{tmp_path / 'full'}'"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stages"] == ["stage-1/model", "stage-2/model"]
    assert summary["detail"][1]["batch_clusters"] == 3
    model = MultistageModel.from_run(tmp_path / "full")
    z = model.project_array("image", np.random.default_rng(0).normal(size=(5, 12)).astype(
        np.float32))
    assert z.shape == (5, 16) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    # the two stages trained different models (same initialisation, other batches)
    s1 = load_checkpoint(tmp_path / "full" / "stage-1" / "checkpoints").weights["model"]
    s2 = load_checkpoint(tmp_path / "full" / "stage-2" / "checkpoints").weights["model"]
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)

    # stopped inside stage 2 (after its step-3 checkpoint) and resumed: stage 1 is skipped
    # (its clusters are read back) and stage 2 ends bit for bit as the uninterrupted one
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    (tmp_path / "part" / "mcl.json").unlink()
    folder = tmp_path / "part" / "stage-2" / "checkpoints"
    for later in folder.glob("ckpt-*"):
        if int(later.name.split("-")[1]) > 3:
            shutil.rmtree(later)
    (tmp_path / "part" / "stage-2" / "clusters.json").unlink()
    write_json_atomic(folder / "latest.json", {"checkpoint": "ckpt-000000003", "step": 3})
    assert main([*args, "--set", f"run.dir='{tmp_path / 'part'}'", "--resume"]) == 0
    s2b = load_checkpoint(folder).weights
    full2 = load_checkpoint(tmp_path / "full" / "stage-2" / "checkpoints").weights
    for module in full2:
        for k, v in full2[module].items():
            assert torch.equal(s2b[module][k], v), f"{module}.{k}"
    assert (tmp_path / "part" / "stage-2" / "clusters.json").read_text() == \
        (tmp_path / "full" / "stage-2" / "clusters.json").read_text()
    with pytest.raises(ModalignError, match=r"mcl\.key"):
        TrainConfig.from_dict({}, ["mcl.stages=2", "mcl.key='audio'"])
