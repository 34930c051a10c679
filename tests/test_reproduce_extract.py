"""Sharded, resumable extraction and cached, resumable inversion for the reproduce protocols."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modalign.bridge.inversion import invert
from modalign.bridge.inversion import store as inversion_store
from modalign.data.dataset import Item, PairedDataset
from modalign.embed import Embeddings, EmbeddingStore
from modalign.errors import ModalignError
from modalign.reproduce.extract import extract_embeddings
from modalign.reproduce.inversion import InversionPlan, inversion_forward, invert_stored
from modalign.reproduce.models import load_towers, resolve_model
from reproduce_fixtures import one_torch_thread, save_tiny_clip  # noqa: F401 (a fixture)

# tiny models lose to thread hand-offs: one torch thread per test
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CharTower:
    """Deterministic text tower: letter counts (so every process computes the same rows)."""

    name, modality, dim = "chars", "text", 26

    def preprocess(self, texts):
        return list(texts)

    def encode(self, batch):
        out = torch.zeros(len(batch), 26)
        for i, t in enumerate(batch):
            for ch in t:
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out

    def identity(self):
        return {"name": self.name}


def _texts(n: int) -> PairedDataset:
    words = ["apple", "banana", "cherry", "date", "elder", "fig", "grape"]
    items = [Item(f"t{i}", "text", "caption", f"{words[i % 7]} {words[(3 * i) % 7]}",
                  f"g{i % 4}", "test") for i in range(n)]
    return PairedDataset("toy", items)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_extraction_equals_one_process(tmp_path: Path, world_size: int) -> None:
    ds = _texts(11)
    single = extract_embeddings(ds, {"text": CharTower()}, tmp_path / "one", batch_size=4,
                                rank=0, world_size=1, progress=False)
    out = tmp_path / "sharded"
    for rank in reversed(range(world_size)):  # rank 0 last: it merges what the others wrote
        store = extract_embeddings(ds, {"text": CharTower()}, out, batch_size=3, rank=rank,
                                   world_size=world_size, progress=False)
    a, b = single.load("text"), store.load("text")
    np.testing.assert_array_equal(np.asarray(a.vectors), np.asarray(b.vectors))
    assert [it["id"] for it in a.items] == [it["id"] for it in b.items]
    assert [it["group"] for it in a.items] == [it["group"] for it in b.items]
    assert store.info("text")["hash"] == single.info("text")["hash"]
    # the merged store is complete: a one-process run over it reuses the array
    before = (out / "text.npy").stat().st_mtime_ns
    extract_embeddings(ds, {"text": CharTower()}, out, rank=0, world_size=1, progress=False)
    assert (out / "text.npy").stat().st_mtime_ns == before


def test_rank0_refuses_to_merge_missing_shards(tmp_path: Path) -> None:
    with pytest.raises(ModalignError, match="rank 1 has not finished"):
        extract_embeddings(_texts(6), {"text": CharTower()}, tmp_path, rank=0, world_size=2,
                           progress=False)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    folder = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    return load_towers(resolve_model(str(folder)))


def _targets(n: int, dim: int = 16) -> Embeddings:
    g = torch.Generator().manual_seed(0)
    rows = [{"id": f"x{i}", "modality": "image", "view": "image", "group": f"x{i}",
             "split": "test", "labels": {}} for i in range(n)]
    return Embeddings(torch.randn(n, dim, generator=g).numpy(), rows, {})


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["oti", "ovi"])
def test_invert_stored_equals_invert_and_resumes(tmp_path: Path, towers, direction: str,
                                                 monkeypatch) -> None:
    plan = InversionPlan(direction, steps=2, batch_size=2)
    targets = _targets(5)
    direct = invert(torch.from_numpy(np.asarray(targets.vectors)), inversion_forward(towers, plan),
                    plan.settings(), keys=[it["id"] for it in targets.items])

    calls = []
    real = inversion_store.invert  # what the chunk loop calls

    def flaky(t, *a, **k):
        calls.append(len(t))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second chunk
        return real(t, *a, **k)

    store = EmbeddingStore(tmp_path)
    monkeypatch.setattr(inversion_store, "invert", flaky)
    with pytest.raises(KeyboardInterrupt):
        invert_stored(store, direction, targets, towers, plan, chunk=2, progress=False)
    calls.clear()
    monkeypatch.setattr(inversion_store, "invert", lambda t, *a, **k: (calls.append(len(t)),
                                                                      real(t, *a, **k))[1])
    got = invert_stored(store, direction, targets, towers, plan, chunk=2, progress=False)
    assert calls == [2, 1]  # the finished first chunk was kept
    np.testing.assert_allclose(np.asarray(got.vectors), direct.features.numpy(), atol=1e-5)
    assert got.items == targets.items
    calls.clear()
    invert_stored(store, direction, targets, towers, plan, chunk=2, progress=False)
    assert calls == []  # cached in the store
    invert_stored(store, direction, targets, towers, InversionPlan(direction, steps=1,
                                                                   batch_size=2),
                  chunk=8, progress=False)
    assert calls == [5]  # other settings: computed again


def test_inversion_needs_hf_clip() -> None:
    with pytest.raises(ValueError, match="--methods native"):
        inversion_forward({"text": CharTower(), "image": CharTower()}, InversionPlan("oti"))
    with pytest.raises(ValueError, match="direction"):
        InversionPlan("both")


@pytest.mark.slow
def test_sharded_inversion_equals_one_process(tmp_path: Path, towers) -> None:
    plan = InversionPlan("oti", steps=2, batch_size=2)
    targets = _targets(5)
    one = invert_stored(EmbeddingStore(tmp_path / "one"), "oti", targets, towers, plan, chunk=2,
                        rank=0, world_size=1, progress=False)
    store = EmbeddingStore(tmp_path / "two")
    with pytest.raises(ModalignError, match="rank 1 has not finished"):
        invert_stored(store, "oti", targets, towers, plan, chunk=2, rank=0, world_size=2,
                      progress=False)
    assert invert_stored(store, "oti", targets, towers, plan, chunk=2, rank=1, world_size=2,
                         progress=False) is None
    two = invert_stored(store, "oti", targets, towers, plan, chunk=2, rank=0, world_size=2,
                        progress=False)
    assert one is not None and two is not None
    np.testing.assert_allclose(np.asarray(two.vectors), np.asarray(one.vectors), atol=1e-6)
    assert not list((tmp_path / "two" / "shards").glob("*/oti*"))  # merged, then dropped
