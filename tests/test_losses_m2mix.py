"""Geodesic mixup: slerp properties and stability, m²-Mix against a loop reference, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loss_reference_checks import assert_same_value_and_grad, log_softmax_entry, randn, unit
from modalign.losses import build_loss
from modalign.losses.geodesic_mixup import m2mix_loss, sample_beta, slerp


def naive_slerp(a, b, lam):
    theta = torch.acos(a @ b)
    return (torch.sin(lam * theta) * a + torch.sin((1 - lam) * theta) * b) / torch.sin(theta)


def reference_m2mix(x, y, scale, lam):
    bsz = x.shape[0]
    xu = [unit(x[i]) for i in range(bsz)]
    yu = [unit(y[i]) for i in range(bsz)]
    mixed = [naive_slerp(xu[j], yu[j], lam) for j in range(bsz)]
    total = 0.0
    for anchors in (xu, yu):
        for i in range(bsz):
            row = [
                scale * (xu[i] @ yu[i]) if j == i else scale * (anchors[i] @ mixed[j])
                for j in range(bsz)
            ]
            total = total - log_softmax_entry(row, i) / bsz
    return total


def unit_pair(seed, d=5):
    return unit(randn(d, seed=seed)), unit(randn(d, seed=seed + 1))


def test_slerp_endpoints_unit_norm_and_angle():
    a, b = unit_pair(1)
    theta = torch.acos(a @ b)
    torch.testing.assert_close(slerp(a[None], b[None], 1.0)[0], a)
    torch.testing.assert_close(slerp(a[None], b[None], 0.0)[0], b)
    for lam in (0.1, 0.35, 0.8):
        m = slerp(a[None], b[None], lam)[0]
        torch.testing.assert_close(m.norm(), torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(torch.acos((a @ m).clamp(-1, 1)), (1 - lam) * theta)
        torch.testing.assert_close(m, naive_slerp(a, b, lam))


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slerp_finite_at_equal_and_opposite_vectors(sign, dtype):
    a = unit(randn(4, seed=3)).to(dtype)[None].repeat(3, 1).requires_grad_(True)
    b = (sign * a.detach()).clone().requires_grad_(True)
    out = slerp(a, b, torch.tensor([0.2, 0.5, 0.9], dtype=dtype))
    assert torch.isfinite(out).all()
    (out.sum()).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    if sign > 0:  # a = b: every mixture is a itself, where the textbook formula gives 0 / 0
        torch.testing.assert_close(out, a.detach())
        # The textbook formula's 0 / 0, on a vector whose self dot product is exactly 1 in every
        # dtype (a random unit vector's may round below 1 and hide it).
        e = torch.zeros(4, dtype=dtype)
        e[0] = 1.0
        assert not torch.isfinite(naive_slerp(e, e, 0.5)).all()
        half = torch.tensor([0.5], dtype=dtype)
        torch.testing.assert_close(slerp(e[None], e[None], half), e[None])


def test_m2mix_matches_loop_reference_and_keeps_the_diagonal():
    x, y = randn(5, 4, seed=4), randn(5, 4, seed=5)
    assert_same_value_and_grad(
        lambda a, b: m2mix_loss(a, b, 8.0, 0.3).loss,
        lambda a, b: reference_m2mix(a, b, 8.0, 0.3),
        [x, y],
    )


def test_m2mix_with_lam_one_is_clip_like_x_to_y_for_the_x_anchor():
    # lam = 1 makes every mixed negative x_j, so the x-anchored term scores x_i.y_i vs x_i.x_j.
    x, y = randn(4, 3, seed=6), randn(4, 3, seed=7)
    xu, yu = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    logits = xu @ xu.T
    logits.diagonal().copy_((xu * yu).sum(1))
    expected = torch.nn.functional.cross_entropy(5.0 * logits, torch.arange(4))
    torch.testing.assert_close(m2mix_loss(x, y, 5.0, 1.0).parts["x-to-mixed"], expected)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(2, 5), d=st.integers(2, 5), lam=st.floats(0.0, 1.0), scale=st.floats(0.5, 50))
def test_hypothesis_against_reference(b, d, lam, scale):
    x, y = randn(b, d, seed=b + d), randn(b, d, seed=b * d + 11)
    assert_same_value_and_grad(
        lambda p, q: m2mix_loss(p, q, scale, lam).loss,
        lambda p, q: reference_m2mix(p, q, scale, lam),
        [x, y],
        rtol=1e-6,
        atol=1e-9,
    )


def test_module_samples_reproducibly_and_reports_lam():
    emb = {
        "image": randn(4, 3, dtype=torch.float32),
        "text": randn(4, 3, seed=9, dtype=torch.float32),
    }
    a, b = (
        build_loss(
            "m2mix", modalities=["image", "text"], generator=torch.Generator().manual_seed(1)
        )
        for _ in range(2)
    )
    out_a, out_b = a(emb), b(emb)
    torch.testing.assert_close(out_a.loss, out_b.loss)
    lam = float(out_a.parts["lam"])
    torch.testing.assert_close(
        out_a.loss,
        m2mix_loss(emb["image"], emb["text"], math.exp(float(a.log_logit_scale)), lam).loss,
    )
    assert not a.log_logit_scale.requires_grad  # tau2 is fixed, as in the reference code


def test_sample_beta_mean_is_one_half():
    draws = sample_beta(0.5, 4000, generator=torch.Generator().manual_seed(0))
    assert abs(float(draws.mean()) - 0.5) < 0.03 and float(draws.min()) >= 0


def test_bad_input():
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="lam"):
        m2mix_loss(x, x, 1.0, 1.5)
    with pytest.raises(ValueError, match="lam"):
        m2mix_loss(x, x, 1.0, torch.ones(2) / 2)
    with pytest.raises(ValueError, match="y"):
        m2mix_loss(x, torch.ones(2, 2), 1.0, 0.5)
    with pytest.raises(ValueError, match="logit_scale"):
        m2mix_loss(x, x, float("inf"), 0.5)
    with pytest.raises(ValueError, match="beta"):
        sample_beta(0.0)
