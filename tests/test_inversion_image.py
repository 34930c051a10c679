"""Image-side inversion: pseudo-patch tiling against the official nearest interpolation, the ViT
forward against the tower's own forward, the CNN stage forward against EfficientNet-Lite0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from modalign.bridge.inversion import (
    InversionSettings,
    ProjectedForward,
    StageInversion,
    ViTInversion,
    clip_vision_inversion,
    effnet_stage_inversion,
    encoder_inversion,
    invert,
    tile_patches,
)

torch.set_num_threads(1)


def tiny_vit() -> CLIPVisionModel:
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8)
    return CLIPVisionModel(cfg).double().eval()


@pytest.mark.parametrize(("p", "n"), [(1, 49), (2, 49), (4, 256), (3, 196), (7, 7), (5, 16)])
def test_tiling_equals_the_official_nearest_interpolation(p, n):
    tokens = torch.randn(2, p, 6)
    official = F.interpolate(tokens.unsqueeze(2).transpose(1, 2), size=(n, 6), mode="nearest")
    official = official.transpose(1, 2).squeeze(2)
    torch.testing.assert_close(tile_patches(tokens, n), official, rtol=0, atol=0)
    runs = [(tile_patches(torch.arange(p).view(1, p, 1).float(), n)[0, :, 0] == k).sum()
            for k in range(p)]
    assert max(runs) - min(runs) <= 1  # contiguous runs of about n / p positions
    with pytest.raises(ValueError, match="pseudo-patches"):
        tile_patches(torch.randn(1, n + 1, 2), n)


def test_vit_forward_with_the_real_patches_equals_the_towers_forward():
    vit = tiny_vit()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    patches = vit.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (2, 16, 32)
    fwd = ViTInversion(vit, num_tokens=16)
    torch.testing.assert_close(fwd(patches), vit(pixel_values=pixels).pooler_output,
                               rtol=0, atol=1e-12)


def naive_vit(vit: CLIPVisionModel, tokens: torch.Tensor) -> torch.Tensor:
    """Per sample: each patch position copies its nearest pseudo-token, then the CLIP ViT."""
    outs = []
    n, p = vit.embeddings.num_patches, tokens.shape[1]
    for t in tokens:
        patches = torch.stack([t[(i * p) // n] for i in range(n)])
        h = torch.cat([vit.embeddings.class_embedding[None], patches])
        h = vit.pre_layrnorm(h + vit.embeddings.position_embedding.weight)
        h = vit.encoder(inputs_embeds=h[None]).last_hidden_state[0]
        outs.append(vit.post_layernorm(h[0]))
    return torch.stack(outs)


def test_vit_forward_and_gradient_equal_a_per_sample_loop():
    vit = tiny_vit()
    tokens = torch.randn(3, 2, 32, dtype=torch.float64, requires_grad=True)
    out, ref = ViTInversion(vit, 2)(tokens), naive_vit(vit, tokens)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), [tokens])
    (g_ref,) = torch.autograd.grad(ref.sum(), [tokens])
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


def test_ovi_a_sample_alone_equals_the_same_sample_in_a_batch_of_8():
    fwd = ViTInversion(tiny_vit(), 1)
    targets = torch.randn(8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = InversionSettings(steps=10)
    batch = invert(targets, fwd, s, keys=list(range(8)))
    alone = invert(targets[6:7], fwd, s, keys=[6])
    torch.testing.assert_close(alone.features[0], batch.features[6], rtol=0, atol=1e-10)


def test_clip_model_adapter_uses_its_own_projection():
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
                     projection_dim=8)
    clip = CLIPModel(cfg).eval()
    fwd = clip_vision_inversion(clip, num_tokens=4)
    assert isinstance(fwd, ProjectedForward)
    pixels = torch.randn(2, 3, 32, 32)
    patches = clip.vision_model.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(fwd(patches), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_tokens"):
        ViTInversion(clip, num_tokens=5)


def test_stage_inversion_validates_its_grid():
    with pytest.raises(ValueError, match="square"):
        StageInversion(lambda x: x.mean((2, 3)), channels=4, size=(8, 8), num_tokens=3)
    with pytest.raises(ValueError, match="grid"):
        StageInversion(lambda x: x.mean((2, 3)), channels=4, size=(2, 2), num_tokens=9)


@pytest.fixture(scope="module")
def effnet():
    from modalign.encoders import load_encoder

    return load_encoder("effnet-lite0", image_size=32)


@pytest.mark.parametrize("stage", [0, 3])
def test_effnet_stage_forward_with_the_real_map_equals_the_tower(effnet, stage):
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = effnet.net.stem(pixels)
        for block in effnet.net._blocks[:stage]:
            h = block(h)
        side = h.shape[-1]
        fwd = effnet_stage_inversion(effnet, stage=stage, num_tokens=side * side)
        tokens = h.flatten(2).transpose(1, 2)  # every position its own pseudo-patch
        torch.testing.assert_close(fwd(tokens), effnet.encode(pixels), rtol=1e-5, atol=1e-5)
    assert fwd.token_dim == h.shape[1]
    with pytest.raises(ValueError, match="stage"):
        effnet_stage_inversion(effnet, stage=16)


def test_effnet_grid_upsampling_is_nearest_in_blocks(effnet):
    fwd = effnet_stage_inversion(effnet, stage=0, num_tokens=4)
    seen = {}
    fwd.rest = lambda fmap: seen.setdefault("map", fmap).mean((2, 3))
    tokens = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 32)
    fwd(tokens)
    fmap = seen["map"][0, 0]  # 16 x 16: quadrants in raster order
    assert fmap.shape == (16, 16)
    assert [fmap[0, 0], fmap[0, 15], fmap[15, 0], fmap[15, 15]] == [0.0, 1.0, 2.0, 3.0]


def test_encoder_inversion_dispatches_on_the_tower(effnet):
    fwd = encoder_inversion(effnet)
    assert (fwd.modality, fwd.num_tokens, fwd.token_dim) == ("image", 16, 32)
    with pytest.raises(ValueError, match="encoder"):
        encoder_inversion(torch.nn.Linear(2, 2))


def test_effnet_folded_batchnorm_matches_the_tower_and_follows_weight_changes():
    import torch

    from modalign.bridge.inversion import effnet_stage_inversion
    from modalign.encoders import load_encoder

    enc = load_encoder("effnet-lite0", image_size=32)
    exact = effnet_stage_inversion(enc, stage=1, num_tokens=4)
    folded = effnet_stage_inversion(enc, stage=1, num_tokens=4, fold_bn=True)
    assert folded.identity()["tower"].endswith(":folded-bn")
    tokens = torch.randn(2, 4, exact.token_dim, dtype=torch.float64).float().requires_grad_()
    a, b = exact(tokens), folded(tokens)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    (ga,) = torch.autograd.grad(a.square().sum(), tokens)
    (gb,) = torch.autograd.grad(b.square().sum(), tokens)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # a changed BatchNorm statistic must reach the folded copy
        enc.net._blocks[1]._bn2.running_mean.add_(0.5)
    torch.testing.assert_close(folded(tokens), exact(tokens), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(exact(tokens), a, atol=1e-3)


def test_vit_class_token_shortcut_equals_the_full_last_layer_in_float64():
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from modalign.bridge.inversion import ViTInversion

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=64, patch_size=16)
    model = CLIPVisionModel(cfg).eval().double()
    fast, full = ViTInversion(model, 2), ViTInversion(model, 2)
    assert fast._layers is not None
    full._layers = None  # the whole encoder, every position through the last layer
    tokens = torch.randn(3, 2, 32, dtype=torch.float64, requires_grad=True)
    a, b = fast(tokens), full(tokens)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad(a.square().sum(), tokens)
    (gb,) = torch.autograd.grad(b.square().sum(), tokens)
    torch.testing.assert_close(ga, gb, rtol=1e-11, atol=1e-12)
