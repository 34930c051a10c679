"""Uniformity, alignment, cross-uniformity, CUA and CUAXU: loops, closed forms, invariances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from modalign.losses import build_loss, gap
from modalign.losses.clip import clip_loss
from modalign.losses.gap import CuaLoss

torch.set_num_threads(1)


# The functional forms return LossOutput; these read its total.
def uniformity_loss(*args, **kwargs):
    return gap.uniformity_loss(*args, **kwargs).loss


def alignment_loss(*args, **kwargs):
    return gap.alignment_loss(*args, **kwargs).loss


def cross_uniformity_loss(*args, **kwargs):
    return gap.cross_uniformity_loss(*args, **kwargs).loss

F64 = torch.float64


def _unit(a):
    return a / a.norm(dim=1, keepdim=True)


def naive_uniformity(x, t=2.0):
    x = _unit(x)
    n = x.shape[0]
    terms = [-t * ((x[i] - x[j]) ** 2).sum() for i in range(n) for j in range(n) if i < j]
    return torch.logsumexp(torch.stack(terms), 0) - math.log(len(terms))


def naive_cross_uniformity(x, y, t=2.0, groups=None):
    x, y = _unit(x), _unit(y)
    n = x.shape[0]
    terms = [
        -t * ((x[i] - y[j]) ** 2).sum()
        for i in range(n)
        for j in range(n)
        if (i != j if groups is None else bool(groups[i] != groups[j]))
    ]
    return torch.logsumexp(torch.stack(terms), 0) - math.log(len(terms))


def naive_alignment(x, y, alpha=2.0):
    x, y = _unit(x), _unit(y)
    return sum(((x[i] - y[i]) ** 2).sum() ** (alpha / 2) for i in range(x.shape[0])) / x.shape[0]


def leaves(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=F64).requires_grad_(),
        torch.randn(n, d, generator=g, dtype=F64).requires_grad_(),
    )


def assert_same_value_and_grad(ours, ref, inputs):
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t", [0.5, 2.0, 5.0])
def test_uniformity_matches_loops(t):
    x, _ = leaves(7, 4)
    assert_same_value_and_grad(uniformity_loss(x, t=t), naive_uniformity(x, t), [x])


@pytest.mark.parametrize("use_groups", [False, True])
def test_cross_uniformity_matches_loops(use_groups):
    x, y = leaves(6, 3, seed=1)
    groups = torch.tensor([0, 0, 1, 2, 2, 2]) if use_groups else None
    assert_same_value_and_grad(
        cross_uniformity_loss(x, y, groups=groups),
        naive_cross_uniformity(x, y, 2.0, groups),
        [x, y],
    )


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_alignment_matches_loops(alpha):
    x, y = leaves(5, 3, seed=2)
    assert_same_value_and_grad(
        alignment_loss(x, y, alpha=alpha), naive_alignment(x, y, alpha), [x, y]
    )


def test_closed_forms():
    same = torch.ones(5, 3, dtype=F64)
    assert float(uniformity_loss(same)) == 0.0  # all identical: the maximum
    antipodal = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=F64)
    assert float(uniformity_loss(antipodal)) == pytest.approx(-8.0, abs=1e-12)
    x = torch.randn(4, 3, dtype=F64)
    assert float(alignment_loss(x, x)) == pytest.approx(0.0, abs=1e-12)
    assert float(alignment_loss(x, -x)) == pytest.approx(4.0, abs=1e-12)


def test_shared_rotation_invariance():
    x, y = leaves(6, 4, seed=3)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0)))
    for fn in (lambda a, b: uniformity_loss(a), alignment_loss, cross_uniformity_loss):
        torch.testing.assert_close(fn(x @ q, y @ q), fn(x, y), rtol=1e-12, atol=1e-12)


def test_cross_uniformity_ignores_the_positive_pairs():
    # Each positive pair enters only through ||x_i - y_i||; a loop that includes the diagonal
    # differs, and dXU/d||x_i - y_i|| is zero: moving y_i onto x_i changes XU only through i != j.
    x, y = leaves(5, 3, seed=4)
    xu = cross_uniformity_loss(x, y)
    with_diag = torch.logsumexp(
        -2 * torch.cdist(_unit(x), _unit(y)).pow(2).flatten(), 0
    ) - math.log(25)
    assert not torch.isclose(xu, with_diag)
    xn, yn = _unit(x.detach()), _unit(y.detach())
    d2 = torch.cdist(xn, yn).pow(2).requires_grad_()
    logits = (-2 * d2).masked_fill(torch.eye(5, dtype=torch.bool), float("-inf"))
    value = torch.logsumexp(logits.flatten(), 0) - math.log(20)
    (grad,) = torch.autograd.grad(value, d2)
    torch.testing.assert_close(value, xu.detach(), rtol=1e-10, atol=1e-12)
    assert torch.all(grad.diagonal() == 0)


def test_regression_uniformity_is_exact_where_the_mean_of_exp_underflows():
    # The official code computes exp(...).mean().log(), which is -inf once every term underflows;
    # logsumexp - log(n) stays exact.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    naive = torch.pdist(x).pow(2).mul(-60).exp().mean().log()
    assert torch.isinf(naive)
    expected = torch.logsumexp(torch.tensor([-240.0, -120.0, -120.0], dtype=F64), 0) - math.log(3)
    torch.testing.assert_close(uniformity_loss(x, t=60.0).double(), expected, rtol=1e-6, atol=0)


def test_cua_and_cuaxu_compose_their_terms():
    x, y = leaves(6, 4, seed=5)
    emb = {"image": x, "text": y}
    cua = build_loss("cua", modalities=["image", "text"])(emb)
    cuaxu = build_loss("cuaxu", modalities=["image", "text"])(emb)
    scale = torch.tensor(math.log(1 / 0.01)).exp()  # fixed tau = 0.01, stored as a float32 log
    clip = clip_loss(x, y, scale).loss
    unif = (uniformity_loss(x) + uniformity_loss(y)) / 2
    align = alignment_loss(x, y)
    torch.testing.assert_close(cua.loss, clip + unif + align, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        cuaxu.loss, clip + unif + align + cross_uniformity_loss(x, y), rtol=1e-12, atol=0
    )
    assert set(cuaxu.parts) >= {"clip", "uniformity", "alignment", "cross_uniformity"}


def test_cua_temperature_is_fixed_unless_asked():
    fixed = CuaLoss(["a", "b"])
    assert not list(fixed.parameters())
    assert float(fixed.log_logit_scale.exp()) == pytest.approx(100.0, rel=1e-6)
    learn = CuaLoss(["a", "b"], learnable_temperature=True, temperature=0.07)
    with torch.no_grad():
        learn.log_logit_scale.fill_(10.0)
    learn.clamp_()
    assert float(learn.log_logit_scale.detach()) == pytest.approx(math.log(100), abs=1e-6)


def test_uniformity_module_averages_modalities():
    x, y = leaves(5, 3, seed=6)
    out = build_loss("uniformity", modalities=["image", "text"])({"image": x, "text": y})
    torch.testing.assert_close(out.loss, (uniformity_loss(x) + uniformity_loss(y)) / 2)
    assert set(out.parts) == {"image", "text"}


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 9),
    d=st.integers(1, 5),
    t=st.floats(0.1, 10.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 9999),
)
def test_property_bounds(n, d, t, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    u = float(uniformity_loss(x, t=t))
    assert -4 * t - tol <= u <= tol  # squared distances of unit vectors lie in [0, 4]
    a = float(alignment_loss(x, y))
    assert -tol <= a <= 4 + tol
    xu = float(cross_uniformity_loss(x, y, t=t))
    assert -4 * t - tol <= xu <= tol
    assert float(alignment_loss(x, y)) == pytest.approx(
        float((F.normalize(x, dim=1) - F.normalize(y, dim=1)).pow(2).sum(1).mean()), abs=tol
    )


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: uniformity_loss(torch.randn(1, 3)), "needs at least 2 rows"),
        (lambda: uniformity_loss(torch.zeros(3, 3)), "x has a row of zero norm"),
        (lambda: uniformity_loss(torch.randn(3, 3), t=0.0), "t must be a finite number > 0"),
        (lambda: alignment_loss(torch.randn(3, 3), torch.randn(2, 3)), "y has batch size 2"),
        (lambda: alignment_loss(torch.randn(3, 3), torch.randn(3, 3), alpha=-1), "alpha"),
        (lambda: cross_uniformity_loss(torch.randn(3, 3), torch.randn(3, 4)), "y has dim 4"),
        (
            lambda: cross_uniformity_loss(
                torch.randn(2, 3), torch.randn(2, 3), groups=torch.tensor([1, 1])
            ),
            "at least one pair",
        ),
        (lambda: CuaLoss(["a", "b"], temperature=0.0), "temperature must be"),
        (lambda: CuaLoss(["a", "b"], weights=(1.0, 1.0)), "weights must be 4"),
    ],
)
def test_bad_input_names_the_argument(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()
