"""L2-normalised rows with the lean backward against F.normalize: values bitwise, gradients in
float64, rows clamped at the norm floor, and where the losses use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modalign.losses.clip import clip_loss
from modalign.losses.normalize import normalize_rows, row_norms
from modalign.losses.validation import validation

F64 = torch.float64


def raw_rows(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 5, generator=g, dtype=dtype) * torch.logspace(-3, 3, 9, dtype=dtype)[:, None]
    x[4] = 0.0  # clamped: divided by 1e-12
    x[6] *= 1e-14  # below the floor but not zero: also divided by 1e-12
    return x


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_values_are_f_normalize_bitwise(dtype):
    x = raw_rows(dtype)
    want = F.normalize(x, dim=-1)
    assert torch.equal(normalize_rows(x), want)
    assert torch.equal(normalize_rows(x, row_norms(x)), want)
    assert torch.equal(normalize_rows(x.requires_grad_()).detach(), want)


def test_gradients_match_f_normalize_in_float64():
    x = raw_rows(F64, seed=1).requires_grad_()
    upstream = torch.randn(9, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    (got,) = torch.autograd.grad((normalize_rows(x) * upstream).sum(), x)
    (want,) = torch.autograd.grad((F.normalize(x, dim=-1) * upstream).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[4].abs().max() > 1e11  # the clamped rows: upstream / 1e-12, as F.normalize


def test_gradcheck_and_no_second_derivative():
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(normalize_rows, (x,))
    (g,) = torch.autograd.grad(normalize_rows(x)[:, 0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"does not require grad|once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("impl", ["full", "tiled"])
def test_clip_loss_on_raw_rows_matches_normalizing_first(impl):
    # clip_loss normalises (its tiled path inside the walk); against the loss of rows
    # normalised by F.normalize with normalize=False, values and gradients in float64.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(12, 6, generator=g, dtype=F64) * 4).requires_grad_()
    y = (torch.randn(12, 6, generator=g, dtype=F64) / 3).requires_grad_()
    scale = torch.tensor(7.0, dtype=F64, requires_grad=True)
    got = clip_loss(x, y, scale, impl=impl, tile_size=5)
    want = clip_loss(F.normalize(x, dim=-1), F.normalize(y, dim=-1), scale, impl="full",
                     normalize=False)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-13, atol=0)
    for a, b in zip(torch.autograd.grad(got.loss, [x, y, scale]),
                    torch.autograd.grad(want.loss, [x, y, scale]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_zero_rows_without_validation_follow_f_normalize():
    x = raw_rows(F64, seed=4)[:8].requires_grad_()
    y = torch.randn(8, 5, generator=torch.Generator().manual_seed(5), dtype=F64)
    with validation(False):
        got = clip_loss(x, y, 2.0, impl="tiled", tile_size=3).loss
    want = clip_loss(F.normalize(x, dim=-1), F.normalize(y, dim=-1), 2.0, impl="full",
                     normalize=False).loss
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    (ga,) = torch.autograd.grad(got, x)
    (gb,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(ga, gb, rtol=1e-11, atol=1e-3)
