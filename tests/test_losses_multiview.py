"""MV-InfoNCE and MV-DHEL: naive exp loops (both conventions), invariances, gradient structure."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loss_reference_checks import assert_same_value_and_grad, randn, unit
from modalign.losses import build_loss
from modalign.losses.multiview import (
    mv_dhel_from_similarity,
    mv_dhel_loss,
    mv_infonce_from_similarity,
    mv_infonce_loss,
)


def _sims(views, scale):
    n, m = len(views), views[0].shape[0]
    u = [[unit(views[v][i]) for i in range(m)] for v in range(n)]
    return lambda v, i, k, j: scale * (u[v][i] @ u[k][j])


def naive_mv_infonce(views, scale, same_view_negatives):
    """Direct exp / log as the formulas are written (fine in float64 at moderate scales)."""
    n, m = len(views), views[0].shape[0]
    s = _sims(views, scale)
    total = 0.0
    for i in range(m):
        num = sum(torch.exp(s(v, i, k, i)) for v in range(n) for k in range(n) if k != v)
        den = 0.0
        for v in range(n):
            for k in range(n):
                for j in range(m):
                    if k == v and (j == i or not same_view_negatives):
                        continue
                    den = den + torch.exp(s(v, i, k, j))
        total = total - torch.log(num / den)
    return total / m


def naive_mv_dhel(views, scale, include_self):
    n, m = len(views), views[0].shape[0]
    s = _sims(views, scale)
    total = 0.0
    for i in range(m):
        num = sum(torch.exp(s(v, i, k, i)) for v in range(n) for k in range(n) if k != v)
        den = 1.0
        for v in range(n):
            den = den * sum(torch.exp(s(v, i, v, j)) for j in range(m) if include_self or j != i)
        total = total - torch.log(num / den)
    return total / m


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("flag", [True, False])
def test_infonce_matches_naive_exp(n_views, flag):
    views = [randn(4, 3, seed=s) for s in range(n_views)]
    assert_same_value_and_grad(
        lambda *v: mv_infonce_loss(v, 2.0, same_view_negatives=flag).loss,
        lambda *v: naive_mv_infonce(v, 2.0, flag),
        views,
    )


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("flag", [True, False])
def test_dhel_matches_naive_exp(n_views, flag):
    views = [randn(4, 3, seed=10 + s) for s in range(n_views)]
    assert_same_value_and_grad(
        lambda *v: mv_dhel_loss(v, 2.0, include_self=flag).loss,
        lambda *v: naive_mv_dhel(v, 2.0, flag),
        views,
    )


def test_dhel_conventions_differ_by_exactly_the_self_term():
    views = [randn(5, 3, seed=s) for s in range(3)]
    scale = 3.0
    with_self = mv_dhel_loss(views, scale, include_self=True).loss
    without = mv_dhel_loss(views, scale, include_self=False).loss
    s = _sims(views, scale)
    diff = 0.0
    for i in range(5):
        for v in range(3):
            others = sum(math.exp(float(s(v, i, v, j))) for j in range(5) if j != i)
            diff += math.log(others + math.exp(scale)) - math.log(others)  # self-similarity = s
    assert float(with_self - without) == pytest.approx(diff / 5, rel=1e-12)


def test_invariant_to_view_order_and_joint_instance_permutation():
    views = [randn(5, 3, seed=s) for s in range(3)]
    perm = torch.tensor([4, 2, 0, 1, 3])
    for fn in (mv_infonce_loss, mv_dhel_loss):
        base = fn(views, 2.0).loss
        torch.testing.assert_close(fn(views[::-1], 2.0).loss, base)
        torch.testing.assert_close(fn([v[perm] for v in views], 2.0).loss, base)


def test_dhel_has_no_gradient_on_cross_view_negatives_and_infonce_has():
    views = [torch.nn.functional.normalize(randn(4, 3, seed=s), dim=1) for s in range(3)]
    u = torch.stack(views)
    sim = (2.0 * torch.einsum("lid,mjd->limj", u, u)).requires_grad_(True)
    cross_negative = torch.ones(3, 4, 3, 4, dtype=torch.bool)
    for v in range(3):
        cross_negative[v, :, v, :] = False  # same view
    for i in range(4):
        cross_negative[:, i, :, i] = False  # same instance
    (g_dhel,) = torch.autograd.grad(mv_dhel_from_similarity(sim).mean(), sim)
    (g_info,) = torch.autograd.grad(mv_infonce_from_similarity(sim).mean(), sim)
    assert torch.all(g_dhel[cross_negative] == 0)
    assert torch.all(g_info[cross_negative] != 0)


def test_stable_at_tiny_temperature_where_exp_overflows():
    views = [randn(4, 3, seed=s, dtype=torch.float32) for s in range(2)]
    scale = 1e4  # tau = 1e-4: exp(1e4) is inf in float32
    assert not math.isfinite(float(naive_mv_dhel(views, scale, False)))  # inf / inf
    for fn in (mv_infonce_loss, mv_dhel_loss):
        leaves = [v.clone().requires_grad_(True) for v in views]
        out = fn(leaves, scale).loss
        out.backward()
        assert math.isfinite(float(out.detach()))
        assert all(torch.isfinite(v.grad).all() for v in leaves)


def test_modules_read_views_as_keys():
    keys = ["crop1", "crop2", "crop3"]
    emb = {k: randn(4, 3, seed=i, dtype=torch.float32) for i, k in enumerate(keys)}
    info = build_loss("mv_infonce", modalities=keys, same_view_negatives=False)
    dhel = build_loss("mv_dhel", modalities=keys)
    views = [emb[k] for k in keys]
    torch.testing.assert_close(
        info(emb).loss, mv_infonce_loss(views, 2.0, same_view_negatives=False).loss
    )
    torch.testing.assert_close(dhel(emb).loss, mv_dhel_loss(views, 2.0).loss)
    assert not dhel.log_logit_scale.requires_grad


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 4), m=st.integers(2, 4), d=st.integers(1, 4), scale=st.floats(0.1, 8))
def test_hypothesis_against_naive(n, m, d, scale):
    views = [randn(m, d, seed=s + 10 * n) for s in range(n)]
    assert_same_value_and_grad(
        lambda *v: mv_infonce_loss(v, scale).loss,
        lambda *v: naive_mv_infonce(v, scale, True),
        views,
        rtol=1e-7,
    )
    assert_same_value_and_grad(
        lambda *v: mv_dhel_loss(v, scale).loss,
        lambda *v: naive_mv_dhel(v, scale, False),
        views,
        rtol=1e-7,
    )


def test_bad_input():
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="views"):
        mv_infonce_loss([x], 1.0)
    with pytest.raises(ValueError, match=r"views\[1\]"):
        mv_dhel_loss([x, torch.ones(4, 2)], 1.0)
    with pytest.raises(ValueError, match=r"views\[0\]"):
        mv_dhel_loss([torch.zeros(3, 2), x], 1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        mv_infonce_loss([x, x], 0.0)
