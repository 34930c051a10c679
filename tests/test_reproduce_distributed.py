"""Two real processes (gloo): sharded extraction and inversion equal one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from modalign.embed import EmbeddingStore
from modalign.reproduce.extract import extract_embeddings
from modalign.reproduce.inversion import InversionPlan, invert_stored
from modalign.reproduce.models import load_towers, resolve_model
from reproduce_fixtures import save_tiny_clip
from test_reproduce_extract import CharTower, _targets, _texts

PLAN = InversionPlan("ovi", steps=2, batch_size=2)


def _worker(rank: int, folder: str) -> None:
    root = Path(folder)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{root / 'pg'}",
                                         rank=rank, world_size=2)
    try:
        store = extract_embeddings(_texts(9), {"text": CharTower()}, root / "two", batch_size=2,
                                   progress=False)
        towers = load_towers(resolve_model(str(root / "clip")))
        got = invert_stored(store, "ovi", _targets(5), towers, PLAN, chunk=2, progress=False)
        if rank == 0:
            assert got is not None
            np.save(root / "two-ovi.npy", np.asarray(got.vectors))
            np.save(root / "two-text.npy", np.asarray(store.load("text").vectors))
        else:
            assert got is None
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path: Path) -> None:
    save_tiny_clip(tmp_path / "clip")
    one = EmbeddingStore(tmp_path / "one")
    extract_embeddings(_texts(9), {"text": CharTower()}, one.path, rank=0, world_size=1,
                       progress=False)
    towers = load_towers(resolve_model(str(tmp_path / "clip")))
    ref = invert_stored(one, "ovi", _targets(5), towers, PLAN, chunk=2, rank=0, world_size=1,
                        progress=False)
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    np.testing.assert_array_equal(np.load(tmp_path / "two-text.npy"),
                                  np.asarray(one.load("text").vectors))
    np.testing.assert_allclose(np.load(tmp_path / "two-ovi.npy"), np.asarray(ref.vectors),
                               atol=1e-6)
    info = json.loads((tmp_path / "two" / "manifest.json").read_text())["arrays"]
    assert info["text"]["shards"] == 2 and info["ovi"]["processes"] == 2
