"""GRAM: volume closed forms and invariances, batched = per-pair loop, finite gradients at det 0."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loss_reference_checks import assert_same_value_and_grad, randn, unit
from modalign.losses import build_loss
from modalign.losses.gram import gram_loss, gram_volume


def loop_volume(vectors, eps=0.0):
    k = len(vectors)
    g = torch.stack([torch.stack([vectors[r] @ vectors[c] for c in range(k)]) for r in range(k)])
    return torch.sqrt(torch.linalg.det(g).clamp_min(0) + eps)


def reference_gram_loss(anchor, tuples, scale, smoothing, eps):
    b = anchor.shape[0]
    a = [unit(anchor[i]) for i in range(b)]
    t = [[unit(x[j]) for x in tuples] for j in range(b)]
    vol = [[loop_volume([a[i], *t[j]], eps) for j in range(b)] for i in range(b)]

    def smoothed_ce(rows):
        total = 0.0
        for i, row in enumerate(rows):
            logits = torch.stack([-scale * v for v in row])
            logp = logits - torch.logsumexp(logits, 0)
            for j in range(b):
                target = (1 - smoothing) * (j == i) + smoothing / b
                total = total - target * logp[j]
        return total / b

    cols = [[vol[i][j] for i in range(b)] for j in range(b)]
    return (smoothed_ce(vol) + smoothed_ce(cols)) / 2


def test_two_vectors_give_abs_sine_and_aligned_give_zero():
    a, b = unit(randn(5, seed=1)), unit(randn(5, seed=2))
    sine = torch.sqrt(1 - (a @ b) ** 2)
    torch.testing.assert_close(gram_volume(a[None], b[None], eps=0.0)[0, 0], sine)
    c = unit(randn(5, seed=3))
    assert float(gram_volume(a[None], a[None], c[None], eps=0.0)) < 1e-7


def test_unit_vectors_bound_and_orthonormal_equality():
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(
        gram_volume(eye[:1], eye[1:2], eye[2:3], eps=0.0)[0, 0],
        torch.tensor(1.0, dtype=torch.float64),
    )
    xs = [randn(6, 4, seed=s) for s in range(3)]
    assert float(gram_volume(*xs, eps=0.0).max()) < 1.0


def test_permutation_rotation_and_single_sign_invariance():
    a, b, c = (unit(randn(5, seed=s))[None] for s in range(3))
    v = gram_volume(a, b, c, eps=0.0)
    torch.testing.assert_close(gram_volume(c, a, b, eps=0.0), v)
    q, _ = torch.linalg.qr(randn(5, 5, seed=9))
    torch.testing.assert_close(gram_volume(a @ q, b @ q, c @ q, eps=0.0), v)
    # Documented pitfall: an anti-aligned vector scores like an aligned one.
    torch.testing.assert_close(gram_volume(-a, b, c, eps=0.0), v)


def test_batched_volume_equals_per_pair_loop():
    t, v, s = randn(3, 4, seed=1), randn(4, 4, seed=2), randn(4, 4, seed=3)
    got = gram_volume(t, v, s, eps=1e-8)
    for i in range(3):
        for j in range(4):
            want = loop_volume([unit(t[i]), unit(v[j]), unit(s[j])], 1e-8)
            torch.testing.assert_close(got[i, j], want)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_matches_loop_reference(smoothing):
    xs = [randn(4, 5, seed=s) for s in range(3)]
    assert_same_value_and_grad(
        lambda a, b, c: gram_loss(a, [b, c], 6.0, label_smoothing=smoothing).loss,
        lambda a, b, c: reference_gram_loss(a, [b, c], 6.0, smoothing, 1e-8),
        xs,
        rtol=1e-7,
        atol=1e-9,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_finite_where_det_vanishes(dtype):
    a = unit(randn(4, seed=5)).to(dtype)
    anchors = a[None].repeat(2, 1).requires_grad_(True)
    others = a[None].repeat(2, 1).requires_grad_(True)
    gram_loss(anchors, [others], 10.0).loss.backward()
    assert torch.isfinite(anchors.grad).all() and torch.isfinite(others.grad).all()
    # The textbook sqrt(det) is not differentiable there.
    x = a.double().clone().requires_grad_(True)
    c = a.double()
    g = torch.stack([torch.stack([x @ x, x @ c]), torch.stack([c @ x, c @ c])])
    torch.sqrt(torch.linalg.det(g).clamp_min(0)).backward()
    assert not torch.isfinite(x.grad).all()


def test_module_log_scale_is_clamped_and_anchor_first():
    loss = build_loss("gram", modalities=["text", "video", "audio"])
    names = ["text", "video", "audio"]
    emb = {m: randn(4, 3, seed=i, dtype=torch.float32) for i, m in enumerate(names)}
    expected = gram_loss(emb["text"], [emb["video"], emb["audio"]], 1 / 0.07)
    torch.testing.assert_close(loss(emb).loss, expected.loss)
    with torch.no_grad():
        loss.log_logit_scale.fill_(20.0)
    loss.clamp_()
    assert math.isclose(float(loss.logit_scale().detach()), 100.0, rel_tol=1e-5)


@settings(max_examples=10, deadline=None)
@given(k=st.integers(2, 4), b=st.integers(1, 4), d=st.integers(4, 6), scale=st.floats(0.5, 30))
def test_hypothesis_against_reference(k, b, d, scale):
    xs = [randn(b, d, seed=s + 5 * k) for s in range(k)]
    assert_same_value_and_grad(
        lambda *t: gram_loss(t[0], t[1:], scale).loss,
        lambda *t: reference_gram_loss(t[0], t[1:], scale, 0.1, 1e-8),
        xs,
        rtol=1e-6,
        atol=1e-9,
    )


def test_bad_input():
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="tuples"):
        gram_volume(x)
    with pytest.raises(ValueError, match=r"tuples\[0\]"):
        gram_volume(x, torch.ones(3, 3))
    with pytest.raises(ValueError, match="eps"):
        gram_volume(x, x, eps=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        gram_loss(x, [x], 1.0, label_smoothing=1.5)
    with pytest.raises(ValueError, match="batch size"):
        gram_loss(x, [torch.ones(2, 2)], 1.0)
    with pytest.raises(ValueError, match="modalities"):
        build_loss("gram", modalities=["text"])
