"""load_encoder: spec strings, modality checks, and plugging in a tower of one's own."""

from __future__ import annotations

import pytest
import torch

from modalign.encoders import Encoder, available_encoders, check_encoder, load_encoder
from modalign.errors import ModalignError


def test_every_listed_spec_is_documented():
    specs = available_encoders()
    assert set(specs) == {"minilm", "effnet-lite0", "logmel", "hf-clip", "hf-siglip", "open_clip"}
    assert all(isinstance(v, str) and v for v in specs.values())


@pytest.mark.parametrize("spec,modality,match", [
    ("", None, "non-empty"),
    ("resnet50", None, "unknown encoder 'resnet50'"),
    ("effnet-lite0", "text", "image tower"),
    ("minilm", "image", "text tower"),
    ("logmel:extra", None, "takes no argument"),
    ("hf-clip", "image", "needs a model"),
    ("hf-siglip:some/model", "audio", "say which one with the option tower=image"),
    ("effnet-lite0:image_size=48,bogus=1", "image", "unexpected keyword argument 'bogus'"),
])
def test_bad_specs_raise_value_errors(spec, modality, match):
    with pytest.raises(ValueError, match=match):
        load_encoder(spec, modality=modality)


def test_built_in_towers_resolve_back_from_their_names():
    tower = load_encoder("effnet-lite0", modality="image", image_size=48)
    assert isinstance(tower, Encoder)
    again = load_encoder(tower.name)
    assert again.identity()["weights_hash"] == tower.identity()["weights_hash"]
    with pytest.raises(ModalignError, match="no_such_option"):
        load_encoder("effnet-lite0", no_such_option=1)


def test_spec_options_and_any_modality_name_of_the_kind():
    """``--tower sketch=effnet-lite0`` (the --help example) and ``NAME:key=value`` options.
    Before: "effnet-lite0 is a image tower, got modality='sketch'"."""
    tower = load_encoder("effnet-lite0:image_size=48", modality="sketch")
    assert tower.dim == 1280 and tower.image_size == 48
    assert load_encoder("minilm", modality="x-ray report").dim == 384


class CharCounts:
    """A tower of one's own: follows the Protocol, no base class needed."""

    name, modality, dim = "char-counts", "text", 26

    def preprocess(self, inputs):
        return list(inputs)

    def encode(self, batch):
        out = torch.zeros(len(batch), self.dim)
        for row, text in enumerate(batch):
            for ch in text.lower():
                if "a" <= ch <= "z":
                    out[row, ord(ch) - ord("a")] += 1
        return out

    def identity(self):
        return {"name": self.name, "preprocessing": "lowercase letters"}


def test_a_tower_of_ones_own_plugs_in():
    tower = check_encoder(CharCounts())
    assert isinstance(tower, Encoder)
    v = tower.encode(tower.preprocess(["abc", "zz"]))
    assert v[0, :3].tolist() == [1, 1, 1] and v[1, 25] == 2
    with pytest.raises(TypeError, match="encode"):
        check_encoder(object())


def test_unsafe_tower_weights_are_refused_in_one_line(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    pth = tmp_path / "w.pth"
    torch.save({"x": Evil()}, pth)
    with pytest.raises(ModalignError, match=r"w\.pth: refused, it holds Python objects") as info:
        load_encoder(f"effnet-lite0:{pth}")
    assert "weights_only" not in str(info.value)
    fake = tmp_path / "w.safetensors"
    fake.write_bytes(pth.read_bytes())
    with pytest.raises(ModalignError, match=r"w\.safetensors: refused, not a valid safetensors"):
        load_encoder(f"effnet-lite0:{fake}")
