"""SLIP from a release-format checkpoint: loading (weights_only, Namespace admitted, nothing
else), its towers, and OTI/OVI through the OpenAI-layout text and timm-layout image forwards."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from modalign.bridge.inversion import (
    InversionSettings,
    TemplateTokens,
    encoder_inversion,
    invert,
    vit_geometry,
)
from modalign.errors import ModalignError
from modalign.reproduce import load_towers, resolve_model
from modalign.reproduce.inversion import ovi_family
from modalign.reproduce.slip import BPE_FILE, SLIPModel, load_slip_checkpoint

torch.set_num_threads(1)


def _bpe() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the CLIP BPE file is not installed (make setup installs clip-anytorch)")
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE


def tiny_slip() -> SLIPModel:
    torch.manual_seed(0)
    return SLIPModel(vision_width=384, vision_layers=1, vision_heads=12, image_size=32, patch=16,
                     text_width=64, text_layers=2, text_heads=1, context=16, vocab=49408,
                     embed_dim=32).eval()


def save_release(model: SLIPModel, path: Path, extra: object = None) -> Path:
    """The layout of SLIP's released files: DDP-prefixed keys, the SimCLR head, the args."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.image_mlp.layer1.weight"] = torch.zeros(4, 384)
    args = argparse.Namespace(model="SLIP_VITB16", ssl_mlp_dim=4096, ssl_emb_dim=256)
    torch.save({"epoch": 100, "state_dict": state, "args": args, "best_acc1": 0.0,
                **({"extra": extra} if extra is not None else {})}, path)
    return path


@pytest.fixture(scope="module")
def slip_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slip")
    shutil.copy(_bpe(), folder / BPE_FILE)
    return save_release(tiny_slip(), folder / "slip_tiny.pt")


class Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_checkpoint_loads_exactly_and_refuses_other_globals(slip_file: Path, tmp_path) -> None:
    model = load_slip_checkpoint(slip_file)
    ref = tiny_slip()
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert vit_geometry(model) == (16, 384)
    evil = save_release(tiny_slip(), tmp_path / "evil.pt", extra=Evil())
    with pytest.raises(ModalignError, match="not a loadable SLIP checkpoint"):
        load_slip_checkpoint(evil)
    with pytest.raises(ModalignError, match="no checkpoint file"):
        load_slip_checkpoint(tmp_path / "missing.pt")


def test_slip_towers_and_inversion_forwards(slip_file: Path, tmp_path) -> None:
    from PIL import Image

    model = resolve_model(f"slip:{slip_file}")
    assert model.family == "slip" and model.label == "slip_tiny.pt"
    towers = load_towers(model)
    assert ovi_family(model, towers) == "slip"
    text, image = towers["text"], towers["image"]
    ids = text.preprocess(["a photo of a dog."])
    assert ids.shape == (1, 16) and ids[0, 0] == 49406 and int(ids[0].argmax()) == 7
    # OTI forward: the template with the placeholder's own embedding = the tower's encode
    oti = encoder_inversion(text, template="a photo of {}.")
    t: TemplateTokens = oti.template
    assert oti.identity()["positions"] == t.ids.index(49407) + 1 == 7  # causal: cut at the EOT
    own = text.model.token_embedding(torch.tensor([t.ids[t.slot]]))[None].detach()
    with torch.no_grad():
        want = text.encode(torch.tensor([t.ids]))
        torch.testing.assert_close(oti(own), want, rtol=0, atol=1e-5)
    # OVI forward: every patch's own embedding = the tower's encode
    Image.new("RGB", (40, 50), (200, 30, 90)).save(tmp_path / "im.png")
    pixels = image.preprocess([str(tmp_path / "im.png")])
    assert pixels.shape == (1, 3, 32, 32)
    ovi = encoder_inversion(image, num_tokens=4)
    with torch.no_grad():
        patches = image.model.visual.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        torch.testing.assert_close(ovi(patches), image.encode(pixels), rtol=0, atol=1e-5)
        text_target = text.encode(text.preprocess(["a photo of cat."]))
        image_target = ovi(torch.randn(1, 4, 384, generator=torch.Generator().manual_seed(1)))
    settings = InversionSettings(steps=150, lr=0.05)
    assert invert(image_target, ovi, settings).final_cosine.item() > 0.99
    assert invert(text_target, oti, settings).final_cosine.item() > 0.99
