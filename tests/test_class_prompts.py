"""``class_prompt_store``: class prompts as the text modality, and ``train`` with CMA on it."""

from __future__ import annotations

import numpy as np
import pytest

from modalign.embed.class_prompts import class_prompt_store
from modalign.embed.store import EmbeddingStore
from modalign.errors import ModalignError
from modalign.io import read_jsonl
from modalign.train.loop import LOG_NAME, train
from train_support import HashTextEncoder, small_config


def _labelled_store(path):
    rng = np.random.default_rng(0)
    store = EmbeddingStore(path)
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    rows = [{"id": f"i{g}", "modality": "image", "view": "v", "group": f"g{g:02d}",
             "split": splits[g],
             "labels": {"subgroup": "animal-bird" if g % 2 else "food-fruit"} if g != 5 else {}}
            for g in range(24)]
    store.add_array("image", rng.normal(size=(24, 12)).astype(np.float32), rows,
                    info={"encoder": {"name": "fake-image"}})
    return store


def test_prompt_rows_and_features(tmp_path):
    store = _labelled_store(tmp_path / "src")
    templates = ["a photo of a {}.", "{}"]
    new = class_prompt_store(store, HashTextEncoder(), "subgroup", tmp_path / "new",
                             templates=templates)
    text = new.load("text", view="prompt")
    assert len(text) == 23 * 2  # group g05 has no label: no prompt rows
    tower = HashTextEncoder()
    for row, vec in zip(text.items, np.asarray(text.vectors), strict=True):
        image_row = next(r for r in store.load("image").items if r["group"] == row["group"])
        assert row["split"] == image_row["split"]
        name = image_row["labels"]["subgroup"].replace("-", " ")
        t = int(row["id"].split("/")[1])
        assert row["value"] == templates[t].format(name)
        np.testing.assert_allclose(vec, tower.encode([templates[t].format(name)])[0].numpy(),
                                   rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new.load("image").vectors),
                                  np.asarray(store.load("image").vectors))
    with pytest.raises(ModalignError, match="label='missing'"):
        class_prompt_store(store, tower, "missing", tmp_path / "other")
    with pytest.raises(ModalignError, match="templates"):
        class_prompt_store(store, tower, "subgroup", tmp_path / "other", templates=["no slot"])


def test_train_with_cma_on_class_prompts(tmp_path):
    store = class_prompt_store(_labelled_store(tmp_path / "src"), HashTextEncoder(), "subgroup",
                               tmp_path / "prompts")
    cfg = small_config(store.path, tmp_path / "run",
                       model={"towers": {"image": "fake-image", "text": "hash-text"}},
                       train={"epochs": 4, "batch_size": 8},
                       objectives=[{"loss": "cma", "modalities": ["image", "text"],
                                    "lam": 0.001}])
    result = train(cfg)
    assert result.summary["steps"] == 4  # 15 labelled training groups, batch 8: 1 step/epoch
    rows = [r for r in read_jsonl(result.run_dir / LOG_NAME) if "train_loss" in r]
    assert rows and all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # the CMA objective is being minimised
