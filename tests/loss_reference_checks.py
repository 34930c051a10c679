"""Helpers for the objective tests: compare a loss with its loop reference (values, gradients)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """A seeded standard normal tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_same_value_and_grad(
    ours: Callable[..., Tensor],
    reference: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    *,
    rtol: float = 1e-9,
    atol: float = 1e-11,
) -> Tensor:
    """Run both on fresh leaf copies of ``inputs``; assert equal values and input gradients.

    Returns our value. An input a function does not use must get no gradient from either.
    """
    a = [t.detach().clone().requires_grad_(True) for t in inputs]
    b = [t.detach().clone().requires_grad_(True) for t in inputs]
    value_ours, value_ref = ours(*a), reference(*b)
    torch.testing.assert_close(value_ours, value_ref, rtol=rtol, atol=atol)
    g_ours = torch.autograd.grad(value_ours, a, allow_unused=True)
    g_ref = torch.autograd.grad(value_ref, b, allow_unused=True)
    for k, (go, gr) in enumerate(zip(g_ours, g_ref, strict=True)):
        go = torch.zeros_like(a[k]) if go is None else go
        gr = torch.zeros_like(b[k]) if gr is None else gr
        torch.testing.assert_close(go, gr, rtol=rtol, atol=atol, msg=f"gradient of input {k}")
    return value_ours.detach()


def unit(v: Tensor) -> Tensor:
    """One vector scaled to unit norm (written out, for the loop references)."""
    return v / torch.sqrt((v * v).sum())


def log_softmax_entry(row: Sequence[Tensor], k: int) -> Tensor:
    """``log(exp(row[k]) / sum_j exp(row[j]))`` with an explicit loop (row max subtracted)."""
    top = max(float(r.detach()) for r in row)
    total = sum(torch.exp(r - top) for r in row)
    return row[k] - top - torch.log(total)
