from __future__ import annotations

import numpy as np
import pytest
import torch

from modalign.data import Item, PairedDataset
from modalign.embed import EmbeddingStore, embed_dataset
from modalign.embed.joint import load_joint


class HashText:
    """A deterministic toy text tower: character histogram features."""

    name, modality, dim = "hash-text", "text", 8

    def __init__(self, salt: int = 0) -> None:
        self.salt = salt
        self.calls = 0

    def preprocess(self, inputs):
        return list(inputs)

    def encode(self, batch):
        self.calls += 1
        out = torch.zeros(len(batch), self.dim)
        for i, s in enumerate(batch):
            for ch in s:
                out[i, (ord(ch) + self.salt) % self.dim] += 1
        return out

    def identity(self):
        return {"name": self.name, "salt": self.salt}


def toy_dataset(n=10):
    items = [Item(f"t{i}", "text", "name", f"item number {i} " + "x" * i, f"g{i % 4}",
                  "test" if i % 2 else "train") for i in range(n)]
    return PairedDataset("toy", items)


def test_embed_roundtrip_and_cache(tmp_path):
    ds = toy_dataset()
    enc = HashText()
    store = embed_dataset(ds, {"text": enc}, tmp_path / "s", batch_size=3, progress=False)
    emb = store.load("text")
    assert isinstance(emb.vectors, np.memmap)
    expected = enc.encode([it.value for it in ds.items]).numpy()
    np.testing.assert_array_equal(np.asarray(emb.vectors), expected)
    assert [r["id"] for r in emb.items] == [it.id for it in ds.items]
    assert emb.group_ids().tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert store.load("text", split="test").vectors.shape == (5, 8)
    calls = enc.calls
    embed_dataset(ds, {"text": enc}, tmp_path / "s", batch_size=3, progress=False)
    assert enc.calls == calls  # unchanged inputs and tower: reused
    other = HashText(salt=1)
    store = embed_dataset(ds, {"text": other}, tmp_path / "s", batch_size=3, progress=False)
    assert other.calls > 0  # a changed tower never reuses stale vectors
    assert store.info("text")["encoder"] == {"name": "hash-text", "salt": 1}


def test_embed_resumes_after_interruption(tmp_path):
    ds = toy_dataset(11)
    enc = HashText()
    embed_dataset(ds, {"text": enc}, tmp_path / "s", batch_size=2, progress=False, stop_after=3)
    store = EmbeddingStore(tmp_path / "s")
    assert "text" not in store.arrays and (tmp_path / "s" / "text.partial.npy").exists()
    enc2 = HashText()
    store = embed_dataset(ds, {"text": enc2}, tmp_path / "s", batch_size=2, progress=False)
    assert enc2.calls == 3  # 11 items, 6 already done: batches for items 6-7, 8-9, 10
    full = HashText().encode([it.value for it in ds.items]).numpy()
    np.testing.assert_array_equal(np.asarray(store.load("text").vectors), full)
    assert not (tmp_path / "s" / "text.partial.npy").exists()


def test_store_bad_input(tmp_path):
    store = EmbeddingStore(tmp_path)
    rows = [{"id": "a", "modality": "x", "view": "", "group": "g", "split": "test"}]
    with pytest.raises(ValueError, match="shape"):
        store.add_array("x", np.zeros((2, 3)), rows)
    with pytest.raises(ValueError, match="NaN"):
        store.add_array("x", np.full((1, 3), np.nan), rows)
    with pytest.raises(ValueError, match="not in the store"):
        store.load("nothing")
    with pytest.raises(ValueError, match="batch_size"):
        embed_dataset(toy_dataset(), {"text": HashText()}, tmp_path / "b", batch_size=0)
    with pytest.raises(ValueError, match="no items"):
        embed_dataset(toy_dataset(), {"image": HashText()}, tmp_path / "b")
    with pytest.raises(ValueError, match="--model"):
        load_joint()


def test_load_joint_from_store(tmp_path):
    embed_dataset(toy_dataset(), {"text": HashText()}, tmp_path / "s", progress=False)
    joint = load_joint(embeddings_dir=tmp_path / "s", split="train")
    assert list(joint) == ["text"] and len(joint["text"]) == 5


def test_real_towers_on_a_small_emoji_subset(tmp_path):
    from modalign.data import load_dataset
    from modalign.encoders import load_encoder

    ds = load_dataset("emoji:limit=8,styles=openmoji")
    store = embed_dataset(ds, {"image": load_encoder("effnet-lite0"),
                               "text": load_encoder("minilm")}, tmp_path / "s", progress=False)
    img, txt = store.load("image"), store.load("text")
    assert img.vectors.shape == (8, 1280) and txt.vectors.shape[1] == 384
    assert np.isfinite(img.vectors).all() and np.abs(np.asarray(img.vectors)).sum() > 0
    t = torch.nn.functional.normalize(txt.torch(), dim=-1)
    names = [r["value"] for r in txt.items]
    # the same concept's name and alias are closer than two different concepts' names
    i, j = names.index("grinning face"), names.index("grinning")
    k = names.index("grinning face with big eyes") if "grinning face with big eyes" in names else 2
    assert t[i] @ t[j] > 0.5 and (t[i] @ t[j]) != (t[i] @ t[k])
    assert store.info("image")["items_per_s"] > 0


def test_concurrent_writers_keep_every_array(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_add_arrays, args=(str(tmp_path), k)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    store = EmbeddingStore(tmp_path)
    assert sorted(store.arrays) == sorted(f"a{k}_{i}" for k in range(3) for i in range(10))


def _add_arrays(path: str, k: int) -> None:
    store = EmbeddingStore(path)
    for i in range(10):
        rows = [{"id": f"{k}-{i}", "modality": "x", "view": "", "group": f"g{k}{i}",
                 "split": "test"}]
        store.add_array(f"a{k}_{i}", np.ones((1, 2), np.float32), rows)
