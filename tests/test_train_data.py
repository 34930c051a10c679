"""Batches of groups: coverage, reproducibility, per-key item sampling, shards, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modalign.embed.store import EmbeddingStore
from modalign.train.data import PairedFeatures, augment_image, draw_batch, shard
from train_support import synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("store"), n_groups=30)


def test_an_epoch_visits_distinct_groups_and_is_a_function_of_seed_and_epoch(store):
    data = PairedFeatures(store, ["image", "text"], "train")
    assert len(data) == 20
    n = data.num_batches(6)
    assert n == 3  # the last partial batch is dropped
    epoch = [data.batch_groups(seed=0, epoch=0, index=i, batch_size=6) for i in range(n)]
    seen = np.concatenate(epoch)
    assert len(set(seen.tolist())) == 18 and set(seen.tolist()) <= set(data.groups.tolist())
    again = data.batch_groups(seed=0, epoch=0, index=1, batch_size=6)
    np.testing.assert_array_equal(again, epoch[1])
    assert not np.array_equal(data.batch_groups(seed=0, epoch=1, index=0, batch_size=6), epoch[0])
    assert not np.array_equal(data.batch_groups(seed=1, epoch=0, index=0, batch_size=6), epoch[0])


def test_drawn_rows_belong_to_their_group_and_view(store):
    data = PairedFeatures(store, ["image:noto", "image:openmoji", "text"], "train")
    groups = data.batch_groups(seed=0, epoch=0, index=0, batch_size=8)
    rows = data.draw_rows(groups, seed=0, epoch=0, index=0)
    for key, picks in rows.items():
        table = data.tables[key]
        np.testing.assert_array_equal(table.group_ids[picks], groups)
        if ":" in key:
            assert {table.items[i]["view"] for i in picks} == {key.split(":")[1]}
    feats = data.features(rows)
    assert feats["text"].shape == (8, 8) and feats["image:noto"].shape == (8, 12)


def test_sampling_covers_every_item_of_a_group_and_off_means_first_item(store):
    data = PairedFeatures(store, ["image", "text"], "train")
    groups = data.groups[:4]
    seen = {tuple(data.draw_rows(groups, seed=0, epoch=0, index=i)["text"]) for i in range(40)}
    per_group = [{s[j] for s in seen} for j in range(4)]
    assert all(len(p) == 2 for p in per_group)  # both texts (name, alias) get drawn
    first = data.draw_rows(groups, seed=0, epoch=0, index=0, sample=False)["text"]
    assert [data.tables["text"].rows_of_group(int(g))[0] for g in groups] == first.tolist()


def _reference_batch(store, keys, *, seed, epoch, index, batch_size, rank, world_size):
    """The batch drawn the naive way: a fresh permutation per call, rows gathered from the
    store's own vectors (float32) by plain indexing."""
    tables = {}
    for k in keys:
        modality, _, view = k.partition(":")
        emb = store.load(modality, view=view or None, split="train")
        tables[k] = (np.asarray(emb.vectors, np.float32), emb.group_ids())
    groups = np.unique(tables[keys[0]][1])
    for _, g in tables.values():
        groups = np.intersect1d(groups, g)
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(groups))
    chosen = groups[perm[index * batch_size:(index + 1) * batch_size]]
    per = batch_size // world_size
    out = {}
    for k_i, k in enumerate(keys):
        vectors, gids = tables[k]
        rows_of = {int(g): np.flatnonzero(gids == g) for g in chosen}
        pick = np.random.default_rng([seed, epoch, index, k_i, 0xD2A3]).integers(
            0, [len(rows_of[int(g)]) for g in chosen])
        rows = np.array([rows_of[int(g)][p] for g, p in zip(chosen, pick, strict=True)])
        out[k] = torch.from_numpy(vectors[rows[rank * per:(rank + 1) * per]])
    indices = np.searchsorted(groups, chosen[rank * per:(rank + 1) * per])
    return out, torch.from_numpy(indices)


def test_batches_equal_the_naive_draw_in_any_call_order(store):
    """The epoch's order is drawn once and rows are gathered from the tables: the batches are
    exactly those of a fresh draw per call, whatever the order of the calls."""
    keys = ["image:noto", "image", "text"]
    data = PairedFeatures(store, keys, "train")
    calls = [(3, 0, 0, 0, 1), (3, 0, 1, 0, 1), (3, 1, 2, 0, 1), (3, 0, 2, 1, 2), (4, 0, 2, 1, 2),
             (3, 1, 0, 0, 2), (4, 1, 0, 0, 2), (3, 0, 0, 0, 1)]
    for seed, epoch, index, rank, world in calls:
        got = draw_batch(data, seed=seed, epoch=epoch, index=index, batch_size=6, rank=rank,
                         world_size=world)
        want, indices = _reference_batch(store, keys, seed=seed, epoch=epoch, index=index,
                                         batch_size=6, rank=rank, world_size=world)
        assert list(got.features) == keys
        for k in keys:
            assert torch.equal(got.features[k], want[k]), (seed, epoch, index, rank, k)
        assert torch.equal(got.indices, indices)


def test_shards_concatenate_to_the_global_batch():
    rows = np.arange(12)
    np.testing.assert_array_equal(np.concatenate([shard(rows, r, 3) for r in range(3)]), rows)
    with pytest.raises(ValueError, match="divisible"):
        shard(rows, 0, 5)


def test_bad_keys_and_batch_sizes_are_clear_errors(store, tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        PairedFeatures(store, ["audio", "text"], "train")
    with pytest.raises(ValueError, match="no rows"):
        PairedFeatures(store, ["image:sketch", "text"], "train")
    with pytest.raises(ValueError, match="batch_size"):
        PairedFeatures(store, ["image", "text"], "train").num_batches(21)
    empty = EmbeddingStore(tmp_path / "s")
    with pytest.raises(ValueError, match="lacks"):
        PairedFeatures(empty, ["image"], "train")


def test_image_augmentation_is_seeded_keeps_size_and_changes_pixels():
    arr = np.random.default_rng(0).integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    a = augment_image(img, np.random.default_rng(5))
    b = augment_image(img, np.random.default_rng(5))
    c = augment_image(img, np.random.default_rng(6))
    assert a.size == img.size
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), arr)
    same = augment_image(img, np.random.default_rng(0), crop_scale=(1.0, 1.0), color_jitter=0.0,
                         ratio=(1.0, 1.0))
    assert np.array_equal(np.asarray(same), arr)


def test_features_move_to_a_device_once_and_are_gathered_there(store):
    data = PairedFeatures(store, ["image", "text"], "train")
    rows = data.draw_rows(data.groups[:5], seed=0, epoch=0, index=0)
    assert data.features_on("text", "cpu") is data.tables["text"].features  # no copy
    on = data.features(rows, "meta")  # another device: the table is copied there once
    assert on["image"].device.type == "meta" and on["image"].shape == (5, 12)
    assert data.features_on("image", "meta") is data.features_on("image", "meta")
    assert data.features_on("image", "meta") is not data.tables["image"].features
