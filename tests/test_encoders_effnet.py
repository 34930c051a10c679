"""EfficientNet-Lite0: strict loading of the shipped weights, a real photo, TF SAME padding."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from modalign.encoders import Encoder, load_encoder
from modalign.encoders.effnet import (
    EfficientNetLite0,
    EfficientNetLite0Encoder,
    SameConv2d,
    default_weights_path,
    load_state_dict,
    same_padding,
)

torch.set_num_threads(2)

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet-1k class index
# Clothing classes a portrait of a uniformed officer may sensibly get: military uniform,
# mortarboard, academic gown, suit, Windsor tie, bow tie, vestment.
SENSIBLE_FOR_GRACE_HOPPER = {652, 667, 400, 834, 906, 457, 887}


@pytest.fixture(scope="module")
def tower() -> EfficientNetLite0Encoder:
    return EfficientNetLite0Encoder(image_size=96)


def test_shipped_state_dict_matches_architecture_exactly():
    state = load_state_dict(default_weights_path())
    net = EfficientNetLite0()
    assert set(state) == set(net.state_dict())
    for key, value in net.state_dict().items():
        assert state[key].shape == value.shape, key
    net.load_state_dict(state, strict=True)
    n_params = sum(p.numel() for p in net.parameters())
    assert 4.6e6 < n_params < 4.7e6  # EfficientNet-Lite0 has 4.65M parameters
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_strict_loading_rejects_a_missing_key(tmp_path):
    state = load_state_dict(default_weights_path())
    state.pop("_bn1.running_var")
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(RuntimeError, match="running_var"):
        EfficientNetLite0Encoder(weights=path)


def test_real_photo_lands_in_a_sensible_imagenet_class():
    tower = EfficientNetLite0Encoder(image_size=224)
    with torch.no_grad():
        probs = tower.classify(tower.preprocess([GRACE_HOPPER])).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    # Measured: top-1 "military uniform" (p ~0.41), then mortarboard, suit, Windsor tie, vestment.
    assert top5[0] == MILITARY_UNIFORM
    assert set(top5) <= SENSIBLE_FOR_GRACE_HOPPER
    assert probs[MILITARY_UNIFORM] > 0.2


def _conv_same_reference(x, weight, stride, groups):
    """TF SAME convolution by loops: output o reads input rows o*s - floor(total/2) + i."""
    b, _, h, w = x.shape
    c_out, c_per_group, k, _ = weight.shape
    out_h, out_w = math.ceil(h / stride), math.ceil(w / stride)
    pad_top = max((out_h - 1) * stride + k - h, 0) // 2
    pad_left = max((out_w - 1) * stride + k - w, 0) // 2
    out = torch.zeros(b, c_out, out_h, out_w, dtype=x.dtype)
    per_group_out = c_out // groups
    for co in range(c_out):
        g = co // per_group_out
        for oy in range(out_h):
            for ox in range(out_w):
                total = torch.zeros(b, dtype=x.dtype)
                for ci in range(c_per_group):
                    for dy in range(k):
                        for dx in range(k):
                            iy, ix = oy * stride - pad_top + dy, ox * stride - pad_left + dx
                            if 0 <= iy < h and 0 <= ix < w:
                                total += x[:, g * c_per_group + ci, iy, ix] * weight[co, ci, dy, dx]
                out[:, co, oy, ox] = total
    return out


@pytest.mark.parametrize("size,kernel,stride,groups",
                         [(7, 3, 2, 1), (8, 3, 2, 1), (9, 5, 2, 2), (6, 5, 1, 2), (5, 3, 1, 1)])
def test_same_conv_matches_a_loop_reference(size, kernel, stride, groups):
    torch.manual_seed(size + kernel)
    conv = SameConv2d(2, 2, kernel, stride=stride, groups=groups).double()
    x = torch.randn(2, 2, size, size + 1, dtype=torch.float64)
    got = conv(x)
    assert got.shape[-2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))
    torch.testing.assert_close(got, _conv_same_reference(x, conv.weight, stride, groups))


def test_same_padding_puts_the_odd_pixel_after():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(96, 5, 2) == (1, 2)
    assert same_padding(10, 1, 1) == (0, 0)


def test_encoder_follows_protocol_and_works_at_any_size(tower):
    assert isinstance(tower, Encoder)
    assert (tower.modality, tower.dim) == ("image", 1280)
    with torch.no_grad():
        for size in (33, 97):
            pixels = torch.randn(2, 3, size, size + 4)
            assert tower.encode(pixels).shape == (2, 1280)


def test_preprocess_composites_transparency_on_white_and_normalises(tower, tmp_path):
    clear = Image.new("RGBA", (30, 40), (255, 0, 0, 0))
    path = tmp_path / "clear.png"
    clear.save(path)
    batch = tower.preprocess([clear, path, Image.new("RGB", (50, 50), (0, 0, 0))])
    assert batch.shape == (3, 3, 96, 96)
    white, black = (255 - 127) / 128, (0 - 127) / 128
    torch.testing.assert_close(batch[0], torch.full((3, 96, 96), white))
    torch.testing.assert_close(batch[1], batch[0])
    torch.testing.assert_close(batch[2], torch.full((3, 96, 96), black))


def test_encode_equals_stage_by_stage_forward(tower):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = tower.net.stem(x)
        for block in tower.net._blocks[:5]:
            h = block(h)
        torch.testing.assert_close(tower.net.features_from(h, 5), tower.encode(x))


def test_weights_from_safetensors_give_the_same_vectors(tower, tmp_path):
    path = tmp_path / "lite0.safetensors"
    state = load_state_dict(default_weights_path())
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    other = load_encoder(f"effnet-lite0:{path}")
    x = tower.preprocess([GRACE_HOPPER])
    with torch.no_grad():
        torch.testing.assert_close(other.encode(x), tower.encode(x))
    assert other.identity()["weights_hash"] != tower.identity()["weights_hash"]


def test_trainable_tail_unfreezes_only_the_last_stages():
    tower = EfficientNetLite0Encoder()
    tower.freeze()
    assert len(tower.blocks()) == 18  # stem, 16 MBConv blocks, head
    params = tower.trainable_tail(2)
    expected = {id(p) for p in tower.net._blocks[15].parameters()}
    expected |= {id(p) for m in (tower.net._conv_head, tower.net._bn1) for p in m.parameters()}
    assert {id(p) for p in params} == expected
    assert {id(p) for p in tower.parameters() if p.requires_grad} == expected
    with pytest.raises(ValueError, match="k must be"):
        tower.trainable_tail(19)


def test_bad_inputs_raise_value_errors(tower, tmp_path):
    with pytest.raises(ValueError, match="image path"):
        tower.preprocess([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="images must"):
        tower.preprocess([])
    with pytest.raises(ValueError, match="PIL"):
        tower.preprocess([42])
    with pytest.raises(ValueError, match="batch"):
        tower.encode(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="image_size"):
        EfficientNetLite0Encoder(image_size=4)
    bad = tmp_path / "weights.pth"
    torch.save(torch.zeros(3), bad)
    with pytest.raises(ValueError, match="state dict"):
        EfficientNetLite0Encoder(weights=bad)
    with pytest.raises(ValueError, match="weights"):
        EfficientNetLite0Encoder(weights=tmp_path / "nothing.safetensors")


def test_identity_describes_weights_and_preprocessing(tower):
    ident = tower.identity()
    assert ident["name"] == "effnet-lite0"
    assert len(ident["weights_hash"]) == 16
    assert "(x - 127) / 128" in ident["preprocessing"] and "96" in ident["preprocessing"]


def test_pixels_alone_do_not_explain_the_features(tower):
    # Two different real images must not collapse to the same vector.
    with torch.no_grad():
        a, b = tower.encode(tower.preprocess([GRACE_HOPPER, Image.new("RGB", (96, 96), "blue")]))
    assert F.cosine_similarity(a, b, dim=0) < 0.95
