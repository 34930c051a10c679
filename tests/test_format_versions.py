"""Every format records its version: the layout from before versions loads, a newer one is refused.

"Old layout" files are the current ones with the version key removed, which is exactly what the
previous release wrote (the layouts did not otherwise change).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modalign.embed.store import EmbeddingStore
from modalign.evaluate.records import make_record, read_record, write_record
from modalign.io import NewerFormatError
from modalign.model import ModelConfig, MultiTowerModel
from modalign.train import checkpoint as ck
from modalign.train.config import TrainConfig
from modalign.train.loop import CONFIG_NAME, check_resume


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def test_model_folder(tmp_path):
    cfg = ModelConfig(towers={"text": "minilm"}, feature_dims={"text": 4}, joint_dim=2)
    folder = MultiTowerModel(cfg).save_pretrained(tmp_path / "m")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["format_version"] == 2 and saved["model"]["temperature"] == 0.07
    # version 1 (the scale as logit_scale_init) and 0 (no version key) are migrated
    old = {k: v for k, v in saved["model"].items()
           if k not in ("temperature", "learnable_temperature")}
    for version in (1, None):
        _edit_json(folder / "config.json", format_version=version,
                   model={**old, "logit_scale_init": 20.0, "learn_logit_scale": False})
        got = MultiTowerModel.from_pretrained(folder).config
        assert got.temperature == 1 / 20.0 and got.learnable_temperature is False
        assert {**got.to_dict(), "temperature": 0.07, "learnable_temperature": True} == \
            cfg.to_dict()
    _edit_json(folder / "config.json", format_version=3)
    with pytest.raises(NewerFormatError, match=r"model folder .*m was written by a newer "
                                               r"modalign \(format_version 3; this one reads up "
                                               r"to 2\): upgrade modalign"):
        MultiTowerModel.from_pretrained(folder)


def _rows(n, modality="text"):
    return [{"id": f"{modality}{i}", "modality": modality, "view": modality, "group": f"g{i}",
             "split": "test", "labels": {}} for i in range(n)]


def test_store_manifest_is_migrated_on_the_next_write(tmp_path):
    store = EmbeddingStore(tmp_path)
    store.add_array("text", np.eye(3, dtype=np.float32), _rows(3))
    manifest = tmp_path / "manifest.json"
    assert json.loads(manifest.read_text())["format_version"] == 1
    _edit_json(manifest, format_version=None)
    np.testing.assert_array_equal(np.asarray(store.load("text").vectors), np.eye(3))
    store.add_array("image", np.ones((2, 3), np.float32), _rows(2, "image"))
    saved = json.loads(manifest.read_text())
    assert saved["format_version"] == 1 and sorted(saved["arrays"]) == ["image", "text"]
    _edit_json(manifest, format_version=7)
    with pytest.raises(NewerFormatError, match=r"embedding store .* \(format_version 7"):
        store.load("text")
    _edit_json(manifest, format_version="1")
    with pytest.raises(ValueError, match="format_version '1' is not an integer"):
        store.load("text")


def test_checkpoint(tmp_path):
    mods = {"model": torch.nn.Linear(2, 2)}
    ck.save_checkpoint(tmp_path, 1, mods, {"epoch": 0})
    ck.save_checkpoint(tmp_path, 2, mods, {"epoch": 0})
    trainer_file = tmp_path / "ckpt-000000002" / "trainer.pt"
    state = torch.load(trainer_file, weights_only=True)
    assert state["format_version"] == 1
    # the old layout: no version in latest.json or trainer.pt
    _edit_json(tmp_path / "latest.json", format_version=None)
    torch.save({k: v for k, v in state.items() if k != "format_version"}, trainer_file)
    assert ck.load_checkpoint(tmp_path).step == 2
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-000000002"
    # a newer trainer.pt is refused, not skipped for the previous checkpoint
    torch.save({**state, "format_version": 5}, trainer_file)
    with pytest.raises(NewerFormatError, match=r"trainer\.pt was written by a newer modalign"):
        ck.load_checkpoint(tmp_path)
    _edit_json(tmp_path / "latest.json", format_version=5)
    with pytest.raises(NewerFormatError, match=r"latest\.json was written by a newer"):
        ck.latest_checkpoint(tmp_path)


def test_resolved_run_config(tmp_path):
    cfg = TrainConfig()
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({"config": cfg.to_dict()}))  # written before versions
    check_resume(tmp_path, cfg)
    path.write_text(json.dumps({"format_version": 4, "config": cfg.to_dict()}))
    with pytest.raises(NewerFormatError, match=r"config\.resolved\.json was written by a newer"):
        check_resume(tmp_path, cfg)


def test_evaluation_record(tmp_path):
    path = write_record(make_record(dataset="d", split="test", model="m", task="t", protocol={},
                                    metrics={"map": 0.5}), tmp_path)
    _edit_json(path, schema=None)
    assert read_record(path)["metrics"] == {"map": 0.5}
    _edit_json(path, schema=2)
    with pytest.raises(NewerFormatError, match=r"record .* was written by a newer modalign "
                                               r"\(schema 2"):
        read_record(path)


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path):
    cfg = ModelConfig(towers={"text": "minilm"}, feature_dims={"text": 4}, joint_dim=2)
    folder = MultiTowerModel(cfg).save_pretrained(tmp_path / "m")
    _edit_json(folder / "config.json", model={**cfg.to_dict(), "joint_dim": 3})
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its config: "
                                         r"size mismatch for heads\.text\.layers\.0\.bias: .*"
                                         r"torch\.Size\(\[2\]\) from checkpoint"):
        MultiTowerModel.from_pretrained(folder)
