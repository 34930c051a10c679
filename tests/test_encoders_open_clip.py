"""open_clip adapter: lazy import with an install hint, spec parsing, and the glue (fake module)."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from modalign.encoders import Encoder, load_encoder
from modalign.encoders.open_clip import (
    INSTALL_HINT,
    import_open_clip,
    load_open_clip_towers,
    parse_open_clip_spec,
)

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


def test_missing_open_clip_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(ImportError, match=r"pip install 'modalign\[openclip\]'"):
        import_open_clip()
    with pytest.raises(ImportError, match="modalign"):
        load_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k", modality="image")
    assert INSTALL_HINT == "pip install 'modalign[openclip]'"


def test_spec_parsing(tmp_path):
    assert parse_open_clip_spec("ViT-B-32/openai") == ("ViT-B-32", "openai")
    assert parse_open_clip_spec("RN50") == ("RN50", None)
    assert parse_open_clip_spec("hf-hub:timm/ViT-B-16-SigLIP") == ("hf-hub:timm/ViT-B-16-SigLIP",
                                                                    None)
    assert parse_open_clip_spec(f"local-dir:{tmp_path}") == (f"local-dir:{tmp_path}", None)
    with pytest.raises(ValueError, match="no such folder"):
        parse_open_clip_spec(f"local-dir:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="one '/'"):
        parse_open_clip_spec("a/b/c")
    with pytest.raises(ValueError, match="ARCH/PRETRAINED"):
        parse_open_clip_spec("")
    with pytest.raises(ValueError, match="needs a model"):
        load_encoder("open_clip", modality="text")


class _FakeClip(nn.Module):
    """What the adapter uses of open_clip's CLIP: encode_image, encode_text, visual.output_dim."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Linear(3, 6)
        self.visual.output_dim = 6
        self.token_embedding = nn.Embedding(10, 6)
        self.transformer = types.SimpleNamespace(resblocks=[nn.Linear(6, 6), nn.Linear(6, 6)])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels.mean(dim=(-2, -1)))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens).mean(1)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)


@pytest.fixture
def fake_open_clip(monkeypatch):
    calls = []
    module = types.ModuleType("open_clip")
    module.__version__ = "0.0-test"

    def create_model_and_transforms(name, pretrained=None):
        calls.append((name, pretrained))
        torch.manual_seed(0)
        return _FakeClip(), None, _to_tensor

    def get_tokenizer(name):
        return lambda texts: torch.tensor([[len(t) % 10, 1, 2] for t in texts])

    module.create_model_and_transforms = create_model_and_transforms
    module.get_tokenizer = get_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", module)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return calls


def test_adapter_glue_on_a_stand_in_module(fake_open_clip, tmp_path):
    towers = load_open_clip_towers("ViT-B-32/laion2b_s34b_b79k")
    assert fake_open_clip == [("ViT-B-32", "laion2b_s34b_b79k")]
    image, text = towers["image"], towers["text"]
    assert isinstance(image, Encoder) and isinstance(text, Encoder)
    assert image.model is text.model and (image.dim, text.dim) == (6, 6)
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    white = Image.new("RGB", (16, 16), (255, 255, 255))
    with torch.no_grad():
        a, b = image.encode(image.preprocess([clear, white]))
        torch.testing.assert_close(a, b)  # transparency composited on white
        assert text.encode(text.preprocess(["a cat", "dog"])).shape == (2, 6)
    assert image.identity()["name"] == "open_clip:ViT-B-32/laion2b_s34b_b79k"
    assert len(text.blocks()) == 2
    with pytest.raises(ValueError, match="strings"):
        text.preprocess(["ok", 1])
    tower = load_encoder(f"open_clip:local-dir:{tmp_path}", modality="text")
    assert fake_open_clip[-1] == (f"local-dir:{tmp_path}", None)
    assert tower.modality == "text"


def test_load_failures_name_the_local_dir_alternative(monkeypatch, fake_open_clip):
    def offline(name, pretrained=None):
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(sys.modules["open_clip"], "create_model_and_transforms", offline)
    with pytest.raises(ValueError, match="open_clip:local-dir:PATH"):
        load_open_clip_towers("ViT-B-32/laion2b_s34b_b79k")


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="open_clip is an optional extra, not installed")
def test_real_open_clip_random_weights():  # pragma: no cover - needs the extra
    towers = load_open_clip_towers("RN50")
    with torch.no_grad():
        v = towers["text"].encode(towers["text"].preprocess(["a photo of a cat"]))
    assert v.shape == (1, towers["text"].dim)
