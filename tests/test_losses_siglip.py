"""SigLIP: naive loop reference, B log 2, chunked == full, simulated ring, stability, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from modalign.losses import build_loss
from modalign.losses.siglip import SigLipLoss, siglip_loss

torch.set_num_threads(1)
F64 = torch.float64


def naive_siglip(x, y, scale, bias, groups=None, negative_only=False):
    """-1/B sum_ij log sigmoid(z_ij l_ij) by explicit loops."""
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            positive = (i == j) if groups is None else bool(groups[i] == groups[j])
            z = -1.0 if negative_only or not positive else 1.0
            logit = scale * torch.dot(x[i], y[j]) + bias
            total = total - F.logsigmoid(z * logit)
    return total / n


def leaves(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=F64).requires_grad_(),
        torch.randn(n, d, generator=g, dtype=F64).requires_grad_(),
    )


@pytest.mark.parametrize("impl", ["full", "tiled"])
@pytest.mark.parametrize("use_groups", [False, True])
@pytest.mark.parametrize("negative_only", [False, True])
def test_matches_naive_loops_values_and_gradients(impl, use_groups, negative_only):
    x, y = leaves(6, 4)
    log_scale = torch.tensor(math.log(10), dtype=F64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=F64, requires_grad=True)
    groups = torch.tensor([0, 2, 0, 1, 2, 2]) if use_groups else None
    ours = siglip_loss(
        x,
        y,
        log_scale.exp(),
        bias,
        groups=groups,
        negative_only=negative_only,
        impl=impl,
        tile_size=4,
    ).loss
    ref = naive_siglip(x, y, log_scale.exp(), bias, groups, negative_only)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(ours, [x, y, log_scale, bias]),
        torch.autograd.grad(ref, [x, y, log_scale, bias]),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_zero_logits_give_b_log_2():
    for n in (1, 4, 9):
        x = torch.randn(n, 3, dtype=F64)
        assert float(siglip_loss(x, x, 1e-12, 0.0).loss) == pytest.approx(n * math.log(2), rel=1e-9)


@pytest.mark.parametrize("tile", [1, 2, 3, 4, 7, 11, 100])
def test_chunked_equals_full_for_chunk_sizes_including_non_divisors(tile):
    x, y = leaves(11, 5, seed=tile)
    log_scale = torch.tensor(2.3, dtype=F64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=F64, requires_grad=True)
    res = []
    for impl in ("full", "tiled"):
        loss = siglip_loss(x, y, log_scale.exp(), bias, impl=impl, tile_size=tile).loss
        res.append((loss, torch.autograd.grad(loss, [x, y, log_scale, bias])))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-13, atol=1e-13)
    for a, b in zip(res[1][1], res[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_simulated_ring_equals_full_matrix():
    # Split the texts into W blocks: the own block scored with positives, the others negative-only.
    x, y = leaves(12, 4, seed=2)
    full = siglip_loss(x, y, 7.0, -2.0).loss
    for world in (2, 3, 4):
        b = 12 // world
        total = 0.0
        for r in range(world):
            xs = x[r * b : (r + 1) * b]
            for q in range(world):
                ys = y[q * b : (q + 1) * b]
                part = siglip_loss(xs, ys, 7.0, -2.0, negative_only=(q != r)).loss
                total = total + part * b  # undo the per-block 1/b
        torch.testing.assert_close(total / 12, full, rtol=1e-13, atol=0)


def test_negative_only_is_softplus_sum_over_batch():
    x, y = leaves(5, 3, seed=3)
    xn, yn = F.normalize(x, dim=1), F.normalize(y, dim=1)
    expected = F.softplus(4.0 * xn @ yn.T - 1.0).sum() / 5
    got = siglip_loss(x, y, 4.0, -1.0, negative_only=True).loss
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("impl", ["full", "tiled"])
def test_finite_gradients_for_logits_up_to_1e4(impl):
    x, y = leaves(5, 3, seed=4)
    log_scale = torch.tensor(math.log(1e4), dtype=F64, requires_grad=True)
    bias = torch.tensor(0.0, dtype=F64, requires_grad=True)
    out = siglip_loss(x, y, log_scale.exp(), bias, impl=impl, tile_size=2).loss
    grads = torch.autograd.grad(out, [x, y, log_scale, bias])
    assert torch.isfinite(out)
    assert all(torch.isfinite(g).all() for g in grads)
    x32, y32 = x.detach().float(), y.detach().float()
    assert torch.isfinite(siglip_loss(x32, y32, 1e4, -1e4, impl=impl, tile_size=2).loss)


def test_module_defaults_follow_the_paper():
    loss = build_loss("siglip", modalities=["image", "text"])
    assert float(loss.logit_scale().detach()) == pytest.approx(10.0, rel=1e-6)
    assert float(loss.logit_bias.detach()) == -10.0
    out = loss({"image": torch.randn(4, 3), "text": torch.randn(4, 3)})
    out.loss.backward()
    assert loss.log_logit_scale.grad is not None and loss.logit_bias.grad is not None
    with torch.no_grad():
        loss.log_logit_scale.fill_(9.0)
    loss.clamp_()
    assert float(loss.logit_scale().detach()) <= 100.0 + 1e-4


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 10),
    d=st.integers(1, 5),
    tile=st.integers(1, 11),
    log_scale=st.floats(-2.0, 6.0),
    bias=st.floats(-15.0, 5.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 9999),
)
def test_property_tiled_equals_full_and_is_positive(n, d, tile, log_scale, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    full = siglip_loss(x, y, math.exp(log_scale), bias, impl="full").loss
    tiled = siglip_loss(x, y, math.exp(log_scale), bias, impl="tiled", tile_size=tile).loss
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(tiled, full, rtol=tol, atol=tol)
    assert float(full) >= -tol  # a sum of -log sigmoid terms


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"x": torch.zeros(3, 4)}, "x has a row of zero norm"),
        ({"x": torch.full((3, 4), float("inf"))}, "x contains NaN or inf"),
        ({"y": torch.randn(2, 4)}, "y has batch size 2"),
        ({"logit_scale": float("nan")}, "logit_scale must be a finite number > 0"),
        ({"logit_bias": float("nan")}, "logit_bias must be a finite number"),
        ({"groups": torch.tensor([1, 2, 3, 4])}, "groups must have shape (3,)"),
    ],
)
def test_bad_input_names_the_argument(kwargs, needle):
    args = {
        "x": torch.randn(3, 4),
        "y": torch.randn(3, 4),
        "logit_scale": 10.0,
        "logit_bias": -10.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        siglip_loss(**args)
    assert needle in str(err.value)


def test_module_rejects_bad_impl():
    with pytest.raises(ValueError, match="impl must be"):
        SigLipLoss(["a", "b"], impl="ring")
