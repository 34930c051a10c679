"""The one runtime module (device, ranks, shards, autocast) and the inversion store built on it."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modalign.bridge.inversion import store as inversion_store
from modalign.distributed import runtime
from modalign.embed import Embeddings, EmbeddingStore
from modalign.errors import ModalignError
from modalign.io import array_hash
from modalign.reproduce import inversion as inversion_module
from modalign.reproduce.inversion import InversionPlan, invert_stored


def test_resolve_device_names_the_argument():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device("auto", 0) == (torch.device("cuda:0") if torch.cuda.is_available()
                                                 else torch.device("cpu"))
    with pytest.raises(ModalignError, match=r"^--device='gpu0' is not a device"):
        runtime.resolve_device("gpu0", argument="--device")
    if not torch.cuda.is_available():
        with pytest.raises(ModalignError, match=r"^train\.device='cuda' but CUDA is not "):
            runtime.resolve_device("cuda", argument="train.device")


def test_shard_bounds_tile_the_rows_in_order():
    """(Moved here from test_reproduce_extract with the function.)"""
    for n in (0, 1, 5, 7, 10, 11):
        for world in (1, 2, 3, 4, 5):
            bounds = [runtime.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ModalignError, match="0 <= rank < world_size"):
        runtime.shard_bounds(5, 2, 2)


def test_setup_in_one_process_and_a_reusable_cpu_autocast(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = runtime.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    assert runtime.process_rank() == (0, 1)
    runtime.barrier(ctx)  # a no-op, not a hang
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ModalignError, match="WORLD_SIZE='two': expected an integer"):
        runtime.process_rank()
    cast = runtime.autocast("cpu", torch.bfloat16)
    for _ in range(2):  # entered once per step
        with cast:
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert runtime.mean_over_ranks(2.5, ctx) == 2.5


def test_array_hash_sees_every_byte():
    a = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    b = a.copy()
    b[1, 0] = np.nextafter(b[1, 0], np.float32(np.inf))  # one ulp in a row a sample would skip
    assert array_hash(a) != array_hash(b)
    assert array_hash(a) == array_hash(a.copy())
    assert array_hash(a) != array_hash(a.astype(np.float64))
    assert array_hash(a) != array_hash(a.reshape(2000, 2))


@pytest.fixture
def fake_inversion(monkeypatch):
    """OTI's bookkeeping without a CLIP: the 'inversion' normalises 2 * target."""
    calls: list[int] = []

    def invert(t, forward, settings, keys, progress):
        calls.append(len(t))
        progress(len(t))
        return SimpleNamespace(features=F.normalize(2 * t, dim=-1))

    forward = SimpleNamespace(identity=lambda: {"forward": "fake"})
    monkeypatch.setattr(inversion_store, "invert", invert)  # the chunk loop's inversion
    monkeypatch.setattr(inversion_module, "inversion_forward", lambda towers, plan: forward)
    towers = {"text": SimpleNamespace(model=torch.nn.Identity())}
    return calls, towers


def _targets(vectors: np.ndarray) -> Embeddings:
    rows = [{"id": f"x{i}", "modality": "image", "view": "image", "group": f"x{i}",
             "split": "test", "labels": {}} for i in range(len(vectors))]
    return Embeddings(vectors, rows, {})


def test_inverted_arrays_are_keyed_by_every_byte_of_the_targets(tmp_path, fake_inversion):
    """Before: the key hashed 256 sampled rows rounded to 5 decimals, so targets that differed
    elsewhere reused the other targets' inversion."""
    calls, towers = fake_inversion
    a = np.random.default_rng(0).normal(size=(600, 4)).astype(np.float32)
    b = a.copy()
    b[1] += 1.0  # row 1 is not among the rows the old fingerprint sampled (step 2)
    store = EmbeddingStore(tmp_path)
    plan = InversionPlan("oti", steps=1)
    got_a = invert_stored(store, "oti", _targets(a), towers, plan, chunk=256, progress=False)
    assert calls == [256, 256, 88]
    np.testing.assert_allclose(np.asarray(got_a.vectors), a / np.linalg.norm(a, axis=1,
                                                                             keepdims=True),
                               rtol=1e-6)
    calls.clear()
    invert_stored(store, "oti", _targets(a), towers, plan, chunk=256, progress=False)
    assert calls == []
    got_b = invert_stored(store, "oti", _targets(b), towers, plan, chunk=256, progress=False)
    assert calls == [256, 256, 88]
    assert not np.allclose(np.asarray(got_b.vectors)[1], np.asarray(got_a.vectors)[1])
    assert store.info("oti")["bridge"] == "oti" and not list(tmp_path.glob("oti.p*"))


def test_sharded_inversion_with_an_empty_rank_equals_one_process(tmp_path, fake_inversion):
    calls, towers = fake_inversion
    targets = _targets(np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32))
    plan = InversionPlan("oti", steps=1)
    one = invert_stored(EmbeddingStore(tmp_path / "one"), "oti", targets, towers, plan,
                        progress=False)
    store = EmbeddingStore(tmp_path / "three")
    for rank in (2, 1):  # rank 2 has no rows
        assert invert_stored(store, "oti", targets, towers, plan, rank=rank, world_size=3,
                             progress=False) is None
    three = invert_stored(store, "oti", targets, towers, plan, rank=0, world_size=3,
                          progress=False)
    np.testing.assert_array_equal(np.asarray(three.vectors), np.asarray(one.vectors))
    assert three.items == targets.items
    assert calls == [2, 1, 1]  # one process, then ranks 1 and 0; rank 2 inverts nothing
    assert not list((tmp_path / "three" / "shards").glob("*/oti.npy"))
