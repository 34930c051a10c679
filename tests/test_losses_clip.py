"""CLIP InfoNCE: naive loop reference, spec property checks, full == tiled, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalign.losses import build_loss
from modalign.losses.clip import ClipLoss, clip_loss

torch.set_num_threads(1)
F64 = torch.float64


def naive_clip(x, y, scale, bias=None, groups=None):
    """Symmetric InfoNCE by explicit loops over rows and columns (soft targets for groups)."""
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)
    n = x.shape[0]
    b = 0.0 if bias is None else bias
    logit = [[scale * torch.dot(x[i], y[j]) + b for j in range(n)] for i in range(n)]
    pos = [
        [(i == j) if groups is None else bool(groups[i] == groups[j]) for j in range(n)]
        for i in range(n)
    ]
    x2y = 0.0
    for i in range(n):
        lse = torch.logsumexp(torch.stack([logit[i][j] for j in range(n)]), 0)
        targets = [j for j in range(n) if pos[i][j]]
        x2y = x2y + sum(lse - logit[i][j] for j in targets) / len(targets)
    y2x = 0.0
    for j in range(n):
        lse = torch.logsumexp(torch.stack([logit[i][j] for i in range(n)]), 0)
        targets = [i for i in range(n) if pos[i][j]]
        y2x = y2x + sum(lse - logit[i][j] for i in targets) / len(targets)
    return (x2y / n + y2x / n) / 2


def leaves(n, d, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    y = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    return x, y


@pytest.mark.parametrize("impl", ["full", "tiled"])
@pytest.mark.parametrize("use_groups", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_naive_loops_values_and_gradients(impl, use_groups, use_bias):
    x, y = leaves(7, 5)
    log_scale = torch.tensor(1.3, dtype=F64, requires_grad=True)
    bias = torch.tensor(-0.7, dtype=F64, requires_grad=True) if use_bias else None
    groups = torch.tensor([3, 1, 3, 0, 1, 2, 3]) if use_groups else None
    params = [x, y, log_scale] + ([bias] if use_bias else [])
    ours = clip_loss(x, y, log_scale.exp(), bias, groups=groups, impl=impl, tile_size=3).loss
    ref = naive_clip(x, y, log_scale.exp(), bias, groups)
    g_ours = torch.autograd.grad(ours, params)
    g_ref = torch.autograd.grad(ref, params)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tile", [1, 2, 3, 5, 8, 64])
def test_tiled_equals_full_for_tile_sizes_including_non_divisors(tile):
    x, y = leaves(13, 6, seed=tile)
    log_scale = torch.tensor(2.0, dtype=F64, requires_grad=True)
    bias = torch.tensor(0.25, dtype=F64, requires_grad=True)
    out = {}
    for impl in ("full", "tiled"):
        loss = clip_loss(x, y, log_scale.exp(), bias, impl=impl, tile_size=tile)
        grads = torch.autograd.grad(loss.loss, [x, y, log_scale, bias])
        out[impl] = (loss, grads)
    (lf, gf), (lt, gt) = out["full"], out["tiled"]
    torch.testing.assert_close(lt.loss, lf.loss, rtol=1e-13, atol=1e-13)
    for k in lf.parts:
        torch.testing.assert_close(lt.parts[k], lf.parts[k], rtol=1e-13, atol=1e-13)
    for a, b in zip(gt, gf, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    assert abs(float(gt[3])) < 1e-12  # the bias cancels in the softmax


def test_constant_logits_give_log_b():
    for n in (2, 5, 8):
        x = torch.ones(n, 4, dtype=F64)
        assert float(clip_loss(x, x, 14.0).loss) == pytest.approx(math.log(n), abs=1e-12)


def test_joint_permutation_and_modality_swap_invariance():
    x, y = leaves(9, 4, seed=3)
    groups = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])
    base = clip_loss(x, y, 5.0, groups=groups).loss
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    permuted = clip_loss(x[perm], y[perm], 5.0, groups=groups[perm]).loss
    swapped = clip_loss(y, x, 5.0, groups=groups).loss
    torch.testing.assert_close(permuted, base, rtol=1e-13, atol=0)
    torch.testing.assert_close(swapped, base, rtol=1e-13, atol=0)


def test_scale_limits():
    x, _ = leaves(6, 6, seed=4)
    y = x + 0.01 * torch.randn(6, 6, dtype=F64)  # the diagonal is every row's argmax
    assert float(clip_loss(x, y, 1e4, impl="full").loss.detach()) < 1e-6
    assert float(clip_loss(x, y, 1e4, impl="tiled", tile_size=4).loss.detach()) < 1e-6
    assert float(clip_loss(x, y, 1e-9).loss.detach()) == pytest.approx(math.log(6), abs=1e-7)


def test_clamp_after_optimizer_step_keeps_scale_at_most_100():
    loss = ClipLoss(["image", "text"])
    opt = torch.optim.SGD(loss.parameters(), lr=1e3)
    # Each text equals its image, so every positive has cosine 1, above every negative: the
    # scale's gradient is clearly negative at the start and the huge first step overshoots into
    # the clamp. (At the clamp the loss is 0 in float32 and the gradient is rounding noise, so
    # later steps are only required to stay within the bounds.)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=gen)
    for step in range(3):
        opt.zero_grad()
        loss({"image": x, "text": x.clone()}).loss.backward()
        opt.step()
        loss.clamp_()
        assert 1.0 <= float(loss.logit_scale().detach()) <= 100.0 + 1e-4
        if step == 0:
            assert float(loss.log_logit_scale.detach()) == pytest.approx(math.log(100), abs=1e-6)


def test_module_defaults_and_registry():
    loss = build_loss("clip", modalities=["image", "text"], init_logit_bias=-1.0)
    assert float(loss.log_logit_scale.detach()) == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    assert isinstance(loss.log_logit_scale, torch.nn.Parameter)
    assert isinstance(loss.logit_bias, torch.nn.Parameter)
    out = loss({"image": torch.randn(4, 3), "text": torch.randn(4, 3)})
    out.loss.backward()
    assert loss.logit_bias.grad is not None  # used, so DDP does not flag it as unused
    fixed = ClipLoss(["a", "b"], learnable_temperature=False)
    assert not list(fixed.parameters())


def test_normalize_false_uses_inputs_as_given():
    x, y = leaves(5, 3, seed=8)
    scaled = clip_loss(3 * x, 3 * y, 2.0, normalize=False).loss
    manual = clip_loss(x, y, 18.0, normalize=False).loss
    torch.testing.assert_close(scaled, manual, rtol=1e-13, atol=0)


def test_huge_logits_stay_finite_and_exact_on_tiled_path():
    # |logit| up to 1e4 and negatives far above positives: the positive-logit shift overflows and
    # the rows/columns are recomputed exactly; values and gradients agree with the full matrix.
    x, y = leaves(6, 3, seed=9)
    with torch.no_grad():
        y[0] = -x[0]
    for impl in ("full", "tiled"):
        out = clip_loss(x, y, 1e4, impl=impl, tile_size=4).loss
        g = torch.autograd.grad(out, [x, y])
        assert torch.isfinite(out) and all(torch.isfinite(t).all() for t in g)
    full = clip_loss(x, y, 1e4, impl="full").loss
    tiled = clip_loss(x, y, 1e4, impl="tiled", tile_size=4).loss
    torch.testing.assert_close(tiled, full, rtol=1e-12, atol=1e-9)


def test_float32_tiled_close_to_float64_reference():
    x, y = leaves(300, 32, seed=5)
    ref = clip_loss(x, y, 20.0, impl="full").loss
    x32, y32 = x.detach().float().requires_grad_(), y.detach().float().requires_grad_()
    ours = clip_loss(x32, y32, 20.0, impl="tiled", tile_size=64).loss
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 6),
    tile=st.integers(1, 13),
    log_scale=st.floats(-3.0, 5.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_property_tiled_equals_full_and_bounds(n, d, tile, log_scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, d, generator=g, dtype=dtype)
    scale = math.exp(log_scale)
    full = clip_loss(x, y, scale, impl="full")
    tiled = clip_loss(x, y, scale, impl="tiled", tile_size=tile)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(tiled.loss, full.loss, rtol=tol, atol=tol)
    assert full.loss.dtype == dtype
    # InfoNCE with one positive among n is >= 0 and, for logits within [-s, s], <= log n + 2s.
    assert -tol <= float(full.loss) <= math.log(n) + 2 * scale + tol


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"x": torch.zeros(3, 4)}, "x has a row of zero norm"),
        ({"y": torch.full((3, 4), float("nan"))}, "y contains NaN"),
        ({"x": torch.randn(0, 4), "y": torch.randn(0, 4)}, "x is an empty batch"),
        ({"y": torch.randn(4, 4)}, "y has batch size 4"),
        ({"y": torch.randn(3, 5)}, "y has dim 5"),
        ({"logit_scale": 0.0}, "logit_scale must be a finite number > 0"),
        ({"logit_scale": -1.0}, "logit_scale"),
        ({"logit_bias": float("inf")}, "logit_bias must be a finite number"),
        ({"groups": torch.tensor([0, 1])}, "groups must have shape (3,)"),
        ({"groups": torch.tensor([0.0, 1.0, 2.0])}, "groups must hold integer"),
        ({"impl": "fast"}, "impl must be"),
        ({"x": torch.randn(3)}, "x must have shape (batch, dim)"),
    ],
)
def test_bad_input_names_the_argument(kwargs, needle):
    args = {"x": torch.randn(3, 4), "y": torch.randn(3, 4), "logit_scale": 10.0}
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        clip_loss(**args)
    assert needle in str(err.value)


def test_module_bad_config():
    with pytest.raises(ValueError, match="modalities must name exactly 2"):
        ClipLoss(["image"])
    with pytest.raises(ValueError, match="embeddings is missing modalities"):
        ClipLoss(["image", "text"])({"image": torch.randn(2, 3)})
    with pytest.raises(ValueError, match="gather must be one of"):
        ClipLoss(["image", "text"], gather="everything")
