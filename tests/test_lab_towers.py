"""The scratch towers' own augmentation and pixel cache, the bag-of-word-pieces text tower, and
the trainer handing raw paths to a tower that augments its inputs itself."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import modalign.lab.towers as towers_mod
from modalign.bridge.inversion import InversionSettings, invert
from modalign.lab.towers import ScratchImageTower, ScratchTextTower, scratch_inversion

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks: one thread is faster


def ramp_image(path, side: int = 32) -> None:
    """Red grows with x, green with y: the pixel values tell where they came from."""
    x = np.linspace(0, 255, side)
    px = np.zeros((side, side, 3), np.uint8)
    px[..., 0] = x[None, :].round()
    px[..., 1] = x[:, None].round()
    Image.fromarray(px).save(path)


def test_pixels_are_decoded_once_per_file_and_again_when_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    ramp_image(path)
    calls = []
    real = towers_mod.images_to_tensor

    def counting(images, size):
        calls.append(len(images))
        return real(images, size)

    monkeypatch.setattr(towers_mod, "images_to_tensor", counting)
    monkeypatch.setattr(towers_mod, "_pixels", {})
    a = ScratchImageTower(image_size=16, width=8, seed=0)
    b = ScratchImageTower(image_size=16, width=8, seed=1)  # another tower shares the cache
    first = a.pixels([str(path), path])
    assert first.dtype == torch.uint8 and first.shape == (2, 3, 16, 16)
    assert calls == [2]  # one batch decoded (the same file twice: both decoded, then kept)
    again = b.pixels([str(path)])
    assert calls == [2] and torch.equal(again[0], first[0])
    # the cached pixels are what the uncached path computes
    expected = real([str(path)], 16).round().clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(again, expected, atol=0, rtol=0)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert int(a.pixels([str(path)]).max()) == 0 and calls == [2, 1]
    # an in-memory image is converted each time, never kept
    a.pixels([Image.new("RGB", (20, 20), (9, 9, 9))])
    assert calls == [2, 1, 1] and len(towers_mod._pixels) == 2  # the file before and after


def test_preprocess_augments_only_while_gradients_are_on(tmp_path) -> None:
    path = tmp_path / "ramp.png"
    ramp_image(path, 32)
    tower = ScratchImageTower(image_size=32, width=8, seed=0, crop_scale=(0.25, 0.25),
                              color_jitter=0.0)
    with torch.no_grad():
        plain = tower.preprocess([str(path)] * 8)
    torch.testing.assert_close(plain, tower.pixels([str(path)] * 8).float() / 127.5 - 1)
    torch.manual_seed(0)
    aug = tower.preprocess([str(path)] * 8)
    assert aug.shape == plain.shape and not torch.allclose(aug, plain)
    # a crop of a quarter of the area with aspect in [3/4, 4/3]: the red ramp (x) spans a
    # sub-range of width sqrt(area * ratio) of the full range, and stays increasing along x
    red = (aug[:, 0] + 1) / 2  # (B, H, W) in [0, 1]
    span = red[:, :, -1].mean(1) - red[:, :, 0].mean(1)
    lo, hi = math.sqrt(0.25 * 3 / 4), math.sqrt(0.25 * 4 / 3)
    assert bool(((span > lo - 0.08) & (span < hi + 0.02)).all()), span
    assert bool((red[:, :, 1:] >= red[:, :, :-1] - 1e-5).all())
    off = ScratchImageTower(image_size=32, width=8, seed=0, crop_scale=(1.0, 1.0),
                            color_jitter=0.0)
    torch.testing.assert_close(off.preprocess([str(path)]), plain[:1])
    jitter = ScratchImageTower(image_size=32, width=8, seed=0, crop_scale=(1.0, 1.0),
                               color_jitter=0.5)
    out = jitter.preprocess([str(path)] * 4)
    assert float(out.min()) >= -1 and float(out.max()) <= 1 and not torch.allclose(out, plain[:4])
    with pytest.raises(ValueError, match="crop_scale"):
        ScratchImageTower(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="color_jitter"):
        ScratchImageTower(color_jitter=1.5)


def test_bag_of_word_pieces_text_tower_inverts_exactly_and_trains_every_stage() -> None:
    text = ScratchTextTower(width=16, dim=8, layers=0, token_mask=0.0, seed=1)
    assert text.position is None and text.encoder is None
    params = {id(p) for b in text.blocks() for p in b.parameters()}
    assert params == {id(p) for p in text.parameters()}  # every weight is in some stage
    word = text.tokenizer("dog", add_special_tokens=False)["input_ids"]
    fwd = scratch_inversion(text)
    with torch.no_grad():
        direct = text.encode(text.preprocess(["a photo of dog"]))
        via = fwd(text.embed(torch.tensor([word]))[:, None, 0])
        # the naive bag: mean of the token embeddings, residual MLP, output
        batch = text.preprocess(["a photo of dog"])
        mean = text.embed(batch["input_ids"]).mean(1)
        naive = text.out(mean + text.mlp(mean))
    torch.testing.assert_close(via, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct, naive, atol=1e-6, rtol=1e-6)
    res = invert(torch.randn(2, 8), fwd, InversionSettings(steps=3), keys=["a", "b"])
    assert res.features.shape == (2, 8)
    deep = ScratchTextTower(width=16, dim=8, layers=1, heads=2, seed=1)
    params = {id(p) for b in deep.blocks() for p in b.parameters()}
    assert params == {id(p) for p in deep.parameters()}  # the positions train too
    with pytest.raises(ValueError, match="layers"):
        ScratchTextTower(layers=-1)


def test_draw_batch_leaves_images_of_self_augmenting_towers_raw(tmp_path) -> None:
    from lab_fakes import attach_fake_dataset, fake_store
    from modalign.train.data import PairedFeatures, RawInputs, draw_batch

    store = fake_store(tmp_path / "store")
    folder = attach_fake_dataset(store, tmp_path / "data")
    data = PairedFeatures(store, ["image", "text"], "train")
    raw = RawInputs(str(folder))
    kw = dict(seed=0, epoch=0, index=0, batch_size=4, raw=raw, raw_keys=["image"])
    plain = draw_batch(data, augment_keys=[], **kw)
    assert all(isinstance(v, str) and v.endswith(".png") for v in plain.raw["image"])
    augmented = draw_batch(data, **kw)
    assert all(isinstance(v, Image.Image) for v in augmented.raw["image"])
    assert plain.rows["image"].tolist() == augmented.rows["image"].tolist()
