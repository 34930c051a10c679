"""register_encoder: a tower of one's own gets a spec name, and models trained with it reload."""

from __future__ import annotations

import json

import pytest
import torch

from modalign import encoders
from modalign.encoders import (
    available_encoders,
    load_encoder,
    register_encoder,
    registered_encoder,
    unregister_encoder,
)
from modalign.errors import ModalignError, ProtocolError
from modalign.model import ModelConfig, MultiTowerModel
from modalign.train.loop import train
from train_support import TinyImageTower, small_config, synthetic_store


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Each test registers into a copy, so the built-in table is left as it was."""
    monkeypatch.setattr(encoders, "_REGISTRY", dict(encoders._REGISTRY))


class Char8:
    """An 8-d text tower of one's own: letter counts folded into 8 bins (no base class)."""

    modality, dim = "text", 8

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.name = "char8" if scale == 1.0 else f"char8:scale={scale}"

    def preprocess(self, inputs):
        return list(inputs)

    def encode(self, batch):
        out = torch.zeros(len(batch), self.dim)
        for row, text in enumerate(batch):
            for ch in text:
                out[row, ord(ch) % self.dim] += self.scale
        return out

    def identity(self):
        return {"name": self.name}


def _char8(arg, modality, **options):
    return Char8(**options)


def test_registered_names_are_specs_with_options_and_any_name_of_their_kind():
    register_encoder("char8", _char8, kind="text", description="text: letter counts")
    assert registered_encoder("char8") and available_encoders()["char8"] == "text: letter counts"
    tower = load_encoder("char8:scale=2.0", modality="caption")
    assert isinstance(tower, Char8) and tower.scale == 2.0
    assert tower.encode(["aa"]).sum().item() == 4.0
    assert load_encoder(tower.name).scale == 2.0  # its name rebuilds it
    with pytest.raises(ModalignError, match="text tower and cannot encode 'image'"):
        load_encoder("char8", modality="image")
    with pytest.raises(ModalignError, match="unexpected keyword argument 'bogus'"):
        load_encoder("char8:bogus=1")


def test_registration_errors_are_one_type_each():
    register_encoder("char8", _char8)
    with pytest.raises(ModalignError, match="already registered; pass replace=True"):
        register_encoder("char8", _char8)
    register_encoder("char8", _char8, replace=True)
    with pytest.raises(ModalignError, match="without ':'"):
        register_encoder("a:b", _char8)
    with pytest.raises(ProtocolError, match="factory must be callable"):
        register_encoder("nothing", None)  # type: ignore[arg-type]
    register_encoder("not-a-tower", lambda arg, modality, **o: object())
    with pytest.raises(ProtocolError, match="encoder object lacks name") as info:
        load_encoder("not-a-tower")
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    with pytest.raises(ModalignError, match="register_encoder first"):
        load_encoder("char9")
    with pytest.raises(ModalignError, match="'char9' is not registered"):
        unregister_encoder("char9")


def test_a_model_trained_with_a_custom_tower_reloads_it_by_its_registered_name(tmp_path):
    """Before: from_pretrained knew only the built-in towers, so encode() on raw inputs of a
    model trained with ``Trainer(towers=...)`` failed with 'unknown encoder'."""
    register_encoder("char8", _char8, kind="text")
    store = synthetic_store(tmp_path / "store", n_groups=12)
    cfg = small_config(store.path, tmp_path / "run", model={"towers": {}, "joint_dim": 8},
                       train={"epochs": 1})
    result = train(cfg, towers={"text": Char8()})
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["model"]["towers"] == {"image": "fake-image", "text": "char8"}
    model = MultiTowerModel.from_pretrained(result.model_dir)
    tower = model.tower("text")
    assert isinstance(tower, Char8)
    texts = ["grinning face", "cat"]
    expected = model.project("text", Char8().encode(texts)).detach()
    torch.testing.assert_close(model.encode("text", texts), expected)
    unregister_encoder("char8")
    fresh = MultiTowerModel.from_pretrained(result.model_dir)
    with pytest.raises(ModalignError, match=r"unknown encoder 'char8'.*register_encoder"):
        fresh.encode("text", texts)


def test_a_trainable_custom_tower_reloads_with_its_trained_weights(tmp_path):
    register_encoder("tiny-image", lambda arg, modality, **o: TinyImageTower(), kind="image")
    model = MultiTowerModel(ModelConfig(towers={"image": "tiny-image"}, feature_dims={"image": 12},
                                        joint_dim=4, trainable_towers=["image"]))
    tower = TinyImageTower()
    with torch.no_grad():
        tower.top.weight.add_(1.0)  # "trained": differs from what the factory builds
    model.attach_tower("image", tower)
    model.save_pretrained(tmp_path / "m")
    loaded = MultiTowerModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.tower("image").top.weight, tower.top.weight)
    assert not torch.equal(TinyImageTower().top.weight, tower.top.weight)
    batch = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded({}, raw={"image": batch})["image"],
                               model({}, raw={"image": batch})["image"])
