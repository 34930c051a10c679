"""What every added objective shares: float32 agrees with float64, finite gradients, user names and
dims, building from data inside an objective list, and the log scale clamp."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalign.losses import available_losses, build_loss, build_objective

# name -> (constructor params besides modalities, modality names, extra keys, needed call input)
SPECS = {
    "cwcl": ({}, ["speech", "words"], [], None),
    "isogclr": ({"dataset_size": 64}, ["speech", "words"], [], "indices"),
    "m2mix": ({"generator": None}, ["speech", "words"], [], None),
    "m3col": ({"generator": None}, ["speech", "words"], [], None),
    "one_to_k": ({}, ["speech", "words"], [], "anchor_rows"),
    "slap": ({}, ["speech", "words"], ["speech_target", "words_target"], None),
    "modx": ({}, ["speech", "words"], ["speech_old", "words_old"], None),
    "symile": ({"negatives": "n_squared"}, ["ecg", "xray", "labs"], [], None),
    "gram": ({}, ["ecg", "xray", "labs"], [], None),
    "mv_infonce": ({}, ["crop_a", "crop_b", "crop_c"], [], None),
    "mv_dhel": ({}, ["crop_a", "crop_b", "crop_c"], [], None),
}


def run(name, batch, dim, dtype, seed=0):
    params, mods, extra, needs = SPECS[name]
    torch.manual_seed(seed)
    loss = build_loss(name, modalities=mods, **params)
    g = torch.Generator().manual_seed(seed)
    emb = {
        k: torch.randn(batch, dim, generator=g).to(dtype).requires_grad_(True)
        for k in [*mods, *extra]
    }
    kwargs = {}
    if needs == "indices":
        kwargs["indices"] = torch.arange(batch)
    if needs == "anchor_rows":
        kwargs["anchor_rows"] = torch.arange(batch)
    torch.manual_seed(seed + 1)
    out = loss(emb, **kwargs)
    grads = torch.autograd.grad(out.loss, list(emb.values()), allow_unused=True)
    return out, grads


def test_every_objective_is_registered():
    assert set(SPECS) <= set(available_losses())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_float32_agrees_with_float64_and_gradients_are_finite(name):
    out32, g32 = run(name, 6, 5, torch.float32)
    out64, g64 = run(name, 6, 5, torch.float64)
    assert out32.loss.dtype == torch.float32
    torch.testing.assert_close(out32.loss.double(), out64.loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(g32, g64, strict=True):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)
    assert all(torch.isfinite(v).all() for v in out32.parts.values())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_missing_key_is_a_value_error_naming_it(name):
    _, mods, _, _ = SPECS[name]
    params = SPECS[name][0]
    loss = build_loss(name, modalities=mods, **params)
    with pytest.raises(ValueError, match=mods[-1]):
        loss({m: torch.randn(4, 3) for m in mods[:-1]})


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(SPECS)), batch=st.integers(2, 6), dim=st.integers(1, 6))
def test_hypothesis_any_batch_and_dim_gives_a_finite_scalar(name, batch, dim):
    out, grads = run(name, batch, dim, torch.float64, seed=batch * dim)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_objective_combines_added_terms_as_data():
    objective = build_objective(
        [
            {"loss": "clip", "modalities": ["image", "text"]},
            {"loss": "cwcl", "modalities": ["image", "text"], "weight": 0.5, "sharpness": 2.0},
            {"loss": "mv_dhel", "modalities": ["image", "image_style"], "weight": 0.25},
            {"loss": "gram", "modalities": ["text", "image", "image_style"], "weight": 0.1},
        ]
    )
    g = torch.Generator().manual_seed(0)
    emb = {k: torch.randn(5, 4, generator=g) for k in ["image", "text", "image_style"]}
    out = objective(emb)
    labels = [
        "clip[image,text]",
        "cwcl[image,text]",
        "mv_dhel[image,image_style]",
        "gram[text,image,image_style]",
    ]
    expected = sum(w * out.parts[k] for w, k in zip([1.0, 0.5, 0.25, 0.1], labels, strict=True))
    torch.testing.assert_close(out.loss, expected)
    with torch.no_grad():
        for p in objective.parameters():
            p.fill_(50.0)
    objective.clamp_()
    assert (
        max(float(p.detach()) for p in objective.parameters())
        <= torch.log(torch.tensor(100.0)) + 1e-6
    )


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("defect", ["nan", "dim"])
def test_bad_tensor_error_names_the_users_modality(name, defect):
    params, mods, extra, needs = SPECS[name]
    loss = build_loss(name, modalities=mods, **params)
    emb = {k: torch.randn(4, 3) for k in [*mods, *extra]}
    bad = mods[-1]
    emb[bad] = torch.full((4, 3), float("nan")) if defect == "nan" else torch.randn(4, 5)
    kwargs = {"indices": torch.arange(4)} if needs == "indices" else {}
    if needs == "anchor_rows":
        kwargs["anchor_rows"] = torch.arange(4)
    with pytest.raises(ValueError, match=bad):
        loss(emb, **kwargs)
