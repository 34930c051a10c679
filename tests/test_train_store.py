"""Training on a dataset spec keeps its embedding store in step with the data."""

from __future__ import annotations

import numpy as np

from modalign.train.config import TrainConfig
from modalign.train.loop import resolve_store


def test_resolve_store_reencodes_an_edited_manifest(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("text:caption,text:title,group\na red apple,Apple,1\na blue car,Car,2\n")
    cfg = TrainConfig.from_dict({
        "data": {"dataset": str(csv), "keys": ["text:caption", "text:title"]},
        "model": {"towers": {"text": "minilm"}},
        "objectives": [{"loss": "intra", "modalities": ["text:caption", "text:title"]}],
    })
    before = np.array(resolve_store(cfg).load("text").vectors)
    csv.write_text("text:caption,text:title,group\na green pear,Pear,1\na blue car,Car,2\n")
    after = np.array(resolve_store(cfg).load("text").vectors)
    assert before.shape == after.shape
    assert not np.allclose(before[0], after[0])  # the edited caption is encoded again
    np.testing.assert_allclose(before[-1], after[-1], atol=1e-6)  # "Car" did not change
