"""Compositional hard negatives in training (DeGLA's image-grounded contrast): the loss against
a naive float64 reference, and training from the config with the shipped generator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from modalign.embed.store import EmbeddingStore
from modalign.encoders.tower import Tower
from modalign.errors import ModalignError
from modalign.train.loop import Trainer
from modalign.train.recipes.negatives import igc_loss
from train_support import small_config


def test_igc_loss_matches_the_naive_reference():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g,
                                                                            dtype=torch.float64)
    n = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    s = torch.tensor(3.0, dtype=torch.float64)
    got = igc_loss(q, p, n, mask, s)
    terms = []
    for i in range(4):
        negs = [float(q[i] @ n[i, k]) for k in range(2) if mask[i, k]]
        if not negs:
            continue  # rows without negatives are left out
        pos = float(q[i] @ p[i])
        terms.append(-(3 * pos - math.log(sum(math.exp(3 * v) for v in [pos, *negs]))))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    q.requires_grad_()
    assert torch.autograd.gradcheck(lambda qq: igc_loss(qq, p, n, mask, s), (q,))


class WordTower(Tower):
    """A text tower with word-order-aware features (test stand-in for MiniLM)."""

    name = "word-text"
    modality = "text"
    dim = 10

    def preprocess(self, inputs):
        return list(inputs)

    def encode(self, batch):
        out = np.zeros((len(batch), self.dim))
        for r, t in enumerate(batch):
            for pos, w in enumerate(t.split()):
                seed = sum(map(ord, w)) * 31 + min(pos, 2)
                out[r] += np.random.default_rng(seed).normal(size=self.dim)
        return torch.tensor(out, dtype=torch.float32)

    def identity(self):
        return {"name": self.name}


def _caption_store(path):
    colours, shapes = ["red", "blue", "green", "yellow"], ["circle", "square", "heart"]
    caps = [f"{c} {s}" for c in colours for s in shapes] * 3
    rng = np.random.default_rng(0)
    store = EmbeddingStore(path)
    tower = WordTower()
    text = tower.encode(caps).numpy().astype(np.float32)
    img = text @ rng.normal(size=(10, 12)) + 0.1 * rng.normal(size=(len(caps), 12))
    split = lambda g: "train" if g < 28 else "val"  # noqa: E731
    store.add_array("image", img.astype(np.float32), [
        {"id": f"i{g}", "modality": "image", "view": "a", "group": f"g{g:02d}", "split": split(g),
         "labels": {}} for g in range(len(caps))], info={"encoder": {"name": "fake-image"}})
    store.add_array("text", text, [
        {"id": f"t{g}", "modality": "text", "view": "name", "group": f"g{g:02d}",
         "split": split(g), "value": c, "labels": {}} for g, c in enumerate(caps)],
        info={"encoder": {"name": "word-text"}})
    return caps


def test_trains_with_generated_and_given_negatives(tmp_path):
    caps = _caption_store(tmp_path / "store")
    cfg = small_config(tmp_path / "store", tmp_path / "run", negatives={"k": 3, "weight": 0.5},
                       model={"towers": {"image": "fake-image", "text": "word-text"}},
                       train={"epochs": 2, "num_threads": 1})
    trainer = Trainer(cfg, towers={"text": WordTower()})
    assert trainer.negatives is not None and trainer.negatives.coverage == 1.0
    logged = trainer.train_step(0, 0)
    assert math.isfinite(logged["negatives"]) and logged["negatives"] > 0
    assert trainer.run().summary["steps"] == 6  # 2 epochs of 3 steps (28 training groups)
    # a given file replaces the generator; captions it does not list get no negatives
    given = tmp_path / "negs.json"
    given.write_text(json.dumps({caps[0]: ["circle red"]}))
    cfg = small_config(tmp_path / "store", tmp_path / "run2",
                       negatives={"k": 2, "file": str(given)},
                       model={"towers": {"image": "fake-image", "text": "word-text"}},
                       train={"epochs": 1, "num_threads": 1})
    trainer = Trainer(cfg, towers={"text": WordTower()})
    assert 0 < trainer.negatives.coverage < 1
    given.write_text(json.dumps({caps[0]: "circle red"}))
    with pytest.raises(ModalignError, match=r"negatives.file=.* must hold a JSON object"):
        Trainer(cfg, towers={"text": WordTower()})
    with pytest.raises(ModalignError, match=r"negatives.text_key=.caption. is not in data.keys"):
        small_config(tmp_path / "store", tmp_path / "r", negatives={"k": 2, "text_key": "caption"})
    with pytest.raises(ModalignError, match=r"needs train.accumulate = 1"):
        small_config(tmp_path / "store", tmp_path / "r", negatives={"k": 2},
                     train={"accumulate": 2})
