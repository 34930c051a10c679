"""Exact memory-bounded reductions of a logit matrix that is never materialised in full.

For ``S = scale * X Y^T + bias`` (X: n x d, Y: m x d) the contrastive losses only need

* the row and column log-sum-exps of ``S``, or directly the per-row and per-column
  cross-entropies ``LSE - S_target`` (InfoNCE / CLIP: ``tiled_logsumexp``), and
* the sum of ``softplus(S)`` (SigLIP: ``tiled_softplus_sum``; its positive term is O(n d) and is
  left to ordinary autograd).

Both walk ``S`` in tiles of ``tile_size`` rows against all columns (one matmul per tile),
accumulate the column reductions across tiles, and in the backward pass recompute each tile once
to form ``dL/dS`` for it, from which ``dX``, ``dY``, ``d scale`` and ``d bias`` follow with two
more matmuls. Peak extra memory is O(tile_size x m) instead of O(n x m); values and gradients
equal the full-matrix computation up to floating-point rounding.

FLOPs: forward one ``n m d`` product, backward three (recompute, ``G Y``, ``G^T X``). In the
log-sum-exps the bias never touches the tiles: ``LSE(S + b) = LSE(S) + b``.

Examples:
    >>> import torch
    >>> x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    >>> scale = torch.tensor(3.0, dtype=torch.float64)
    >>> rows, cols = tiled_logsumexp(x, y, scale, tile_size=3)
    >>> full = scale * x @ y.T
    >>> torch.allclose(rows, full.logsumexp(1)), torch.allclose(cols, full.logsumexp(0))
    (True, True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

TILE_ELEMENTS = 1 << 22
"""Logits per tile when ``tile_size`` is None: as many rows as fit 4M logits (16 MB in fp32)."""

MIN_TILE_ROWS = 64
"""Fewest rows per tile when ``tile_size`` is None (very wide matrices)."""

SOFTPLUS_THRESHOLD = 40.0
"""``softplus(l)`` is taken as ``l`` above this (the error, exp(-40), is below float64 rounding)."""


def _as_scalar(value: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.reshape(())
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def resolve_tile_size(tile_size: int | None, m: int) -> int:
    """Rows per tile: ``tile_size`` if given, else as many as fit :data:`TILE_ELEMENTS` logits
    of an m-column matrix (at least :data:`MIN_TILE_ROWS`).

    Examples:
        >>> resolve_tile_size(None, 16384), resolve_tile_size(None, 4096), resolve_tile_size(3, 10)
        (256, 1024, 3)
    """
    if tile_size is None:
        return max(MIN_TILE_ROWS, TILE_ELEMENTS // max(m, 1))
    if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer or None, got {tile_size!r}")
    return tile_size


def tiled_logsumexp(
    x: Tensor,
    y: Tensor,
    scale: Tensor | float,
    bias: Tensor | float | None = None,
    *,
    rows: bool = True,
    cols: bool = True,
    row_targets: Tensor | None = None,
    col_targets: Tensor | None = None,
    tile_size: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Row and/or column log-sum-exp of ``S = scale * x @ y.T + bias`` in O(tile_size * m) memory.

    With targets, the positive logit is subtracted inside the reduction, which gives the per-row
    (per-column) cross-entropy ``LSE_j S_ij - S_{i, row_targets[i]}`` with no cancellation between
    two large numbers, in values and in gradients (the one-hot is subtracted from the softmax
    before the backward matmuls, as in a full-matrix cross-entropy). The positive logit also serves
    as the shift of the exponentials, which saves a max pass; a row or column whose exponentials
    would overflow that shift is recomputed exactly.

    Args:
        x: (n, d) rows. y: (m, d) columns (same dtype and device).
        scale: scalar logit scale (a tensor may require grad).
        bias: optional scalar added to every logit (a tensor may require grad); it cancels from
            the cross-entropies and receives a zero gradient there.
        rows: return the reduction over each row (shape (n,)), else None.
        cols: return the reduction over each column (shape (m,)), else None.
        row_targets: optional (n,) column index of each row's positive.
        col_targets: optional (m,) row index of each column's positive.
        tile_size: rows per tile (None: :func:`resolve_tile_size`).

    Returns:
        ``(row_values, col_values)``, differentiable w.r.t. x, y, scale and bias.
    """
    if not (rows or cols):
        raise ValueError("rows and cols must not both be False")
    tile_size = resolve_tile_size(tile_size, y.shape[0])
    if row_targets is not None and (row_targets.shape != (x.shape[0],) or not rows):
        raise ValueError(f"row_targets must have shape ({x.shape[0]},) and needs rows=True")
    if col_targets is not None and (col_targets.shape != (y.shape[0],) or not cols):
        raise ValueError(f"col_targets must have shape ({y.shape[0]},) and needs cols=True")
    s = _as_scalar(scale, x)
    b = None if bias is None else _as_scalar(bias, x)
    row_val, col_val = _TiledLogSumExp.apply(
        x, y, s, b, row_targets, col_targets, rows, cols, tile_size
    )
    return (row_val if rows else None), (col_val if cols else None)


def tiled_softplus_sum(
    x: Tensor,
    y: Tensor,
    scale: Tensor | float,
    bias: Tensor | float | None = None,
    *,
    tile_size: int | None = None,
) -> Tensor:
    """``sum_ij softplus(scale * x_i . y_j + bias)`` in O(tile_size * m) memory (a scalar).

    Examples:
        >>> import torch
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
        >>> full = torch.nn.functional.softplus(2.0 * x @ y.T - 1.0).sum()
        >>> torch.allclose(tiled_softplus_sum(x, y, 2.0, -1.0, tile_size=2), full)
        True
    """
    tile_size = resolve_tile_size(tile_size, y.shape[0])
    s = _as_scalar(scale, x)
    b = None if bias is None else _as_scalar(bias, x)
    return _TiledSoftplusSum.apply(x, y, s, b, tile_size)


def _tiles(n: int, tile_size: int) -> range:
    return range(0, n, tile_size)


def _tile_logits(
    buffer: Tensor, x: Tensor, yt: Tensor, scale: Tensor, i0: int, i1: int,
    bias: Tensor | None = None,
) -> Tensor:
    """``scale x[i0:i1] y^T (+ bias)`` written into the first ``i1 - i0`` rows of ``buffer``."""
    s = buffer[: i1 - i0]
    torch.mm(x[i0:i1] * scale, yt, out=s)
    if bias is not None:
        s.add_(bias)
    return s


def _target_logits(a: Tensor, b: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """``scale * a_i . b_{targets[i]}`` for every row i (no bias: it cancels in a cross-entropy)."""
    return (a * b.index_select(0, targets)).sum(dim=1) * scale


def _exact_lse(x: Tensor, y: Tensor, scale: Tensor, which: Tensor, dim: int) -> Tensor:
    """Exact log-sum-exp of the selected rows (dim=1) or columns (dim=0) of ``scale x y^T``."""
    if dim == 1:
        return torch.logsumexp((x.index_select(0, which) * scale) @ y.t(), dim=1)
    return torch.logsumexp((x * scale) @ y.index_select(0, which).t(), dim=0)


class _TiledLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        y: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        row_targets: Tensor | None,
        col_targets: Tensor | None,
        rows: bool,
        cols: bool,
        tile_size: int,
    ) -> tuple[Tensor, Tensor]:
        n, m = x.shape[0], y.shape[0]
        yt = y.t()
        tile = min(tile_size, max(n, 1))
        logits = x.new_empty((tile, m))
        work = x.new_empty((tile, m)) if (rows and cols) else logits
        # Shifts of the exponentials: the positive logit where a target is given (the result is
        # then the cross-entropy directly), else the running maximum.
        row_shift = None if row_targets is None else _target_logits(x, y, row_targets, scale)
        col_shift = None if col_targets is None else _target_logits(y, x, col_targets, scale)
        row_val = x.new_empty(n if rows else 0)
        col_acc = x.new_full((m if cols else 0,), 0.0 if col_shift is not None else float("-inf"))
        # Tile value of each target logit minus its shift: subtracting it makes the result
        # lse - S_target with S_target bitwise the logit that entered the sum.
        row_off = x.new_zeros(n if row_shift is not None else 0)
        col_off = x.new_zeros(m if col_shift is not None else 0)
        for i0 in _tiles(n, tile):
            i1 = min(n, i0 + tile)
            s = _tile_logits(logits, x, yt, scale, i0, i1)
            if row_shift is not None and row_targets is not None:
                picked = s.gather(1, row_targets[i0:i1, None]).squeeze(1)
                row_off[i0:i1] = picked - row_shift[i0:i1]
            if col_shift is not None and col_targets is not None:
                here = ((col_targets >= i0) & (col_targets < i1)).nonzero().flatten()
                col_off[here] = s[col_targets[here] - i0, here] - col_shift[here]
            if rows:
                w = work[: i1 - i0]
                if row_shift is not None:
                    torch.sub(s, row_shift[i0:i1, None], out=w)
                    row_val[i0:i1] = w.exp_().sum(dim=1).log_()
                else:
                    peak = s.amax(dim=1, keepdim=True)
                    torch.sub(s, peak, out=w)
                    row_val[i0:i1] = w.exp_().sum(dim=1).log_().add_(peak.squeeze(1))
            if cols:
                if col_shift is not None:
                    col_acc += s.sub_(col_shift).exp_().sum(dim=0)
                else:
                    peak = s.amax(dim=0)
                    s.sub_(peak).exp_()
                    col_acc = torch.logaddexp(col_acc, s.sum(dim=0).log_().add_(peak))
        if col_shift is not None:
            col_acc = col_acc.log_()
        # Rows/columns whose exponentials overflowed the positive-logit shift: recompute exactly.
        if row_shift is not None:
            bad = (~torch.isfinite(row_val)).nonzero().flatten()
            if bad.numel():
                row_val[bad] = _exact_lse(x, y, scale, bad, 1) - row_shift[bad]
        if col_shift is not None:
            bad = (~torch.isfinite(col_acc)).nonzero().flatten()
            if bad.numel():
                col_acc[bad] = _exact_lse(x, y, scale, bad, 0) - col_shift[bad]
        # What backward needs to form softmax probabilities: the exact LSE without the bias.
        row_lse = row_val if row_shift is None else row_val + row_shift
        col_lse = col_acc if col_shift is None else col_acc + col_shift
        if row_shift is not None:
            row_val = row_val - row_off
        elif bias is not None:
            row_val = row_val + bias
        if col_shift is not None:
            col_acc = col_acc - col_off
        elif bias is not None:
            col_acc = col_acc + bias
        ctx.save_for_backward(x, y, scale, bias, row_targets, col_targets, row_lse, col_lse)
        ctx.rows, ctx.cols, ctx.tile = rows, cols, tile
        ctx.mark_non_differentiable(*([] if rows else [row_val]), *([] if cols else [col_acc]))
        return row_val, col_acc

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor | None, grad_cols: Tensor | None) -> tuple[Any, ...]:
        x, y, scale, bias, row_targets, col_targets, row_lse, col_lse = ctx.saved_tensors
        rows, cols, tile = ctx.rows, ctx.cols, ctx.tile
        use_rows = rows and grad_rows is not None and bool(grad_rows.any())
        use_cols = cols and grad_cols is not None and bool(grad_cols.any())
        n, m = x.shape[0], y.shape[0]
        gx = torch.zeros_like(x)  # G @ Y, unscaled
        gy = torch.zeros_like(y)  # G^T @ X, unscaled
        # dL/dS_ij = g_i (P_ij - [j = t_i]) + h_j (Q_ij - [i = u_j]) with P, Q the row and column
        # softmaxes. A positive weight is folded into the shift (exp(S - lse + log g)) to save a
        # pass over the tile; the one-hots are subtracted in the tile before the matmuls.
        row_shift = row_fold = col_shift = col_fold = None
        if use_rows:
            assert grad_rows is not None
            row_fold = bool((grad_rows > 0).all())
            row_shift = row_lse - (grad_rows.log() if row_fold else 0.0)
        if use_cols:
            assert grad_cols is not None
            col_fold = bool((grad_cols > 0).all())
            col_shift = col_lse - (grad_cols.log() if col_fold else 0.0)
        if use_rows or use_cols:
            yt = y.t()
            logits = x.new_empty((tile, m))
            work = x.new_empty((tile, m)) if (use_rows and use_cols) else logits
            for i0 in _tiles(n, tile):
                i1 = min(n, i0 + tile)
                s = _tile_logits(logits, x, yt, scale, i0, i1)
                g = s
                if use_rows:
                    assert row_shift is not None and grad_rows is not None
                    g = work[: i1 - i0]
                    torch.sub(s, row_shift[i0:i1, None], out=g)
                    g.exp_()
                    if not row_fold:
                        g.mul_(grad_rows[i0:i1, None])
                if use_cols:
                    assert col_shift is not None and grad_cols is not None
                    s.sub_(col_shift).exp_()
                    if not col_fold:
                        s.mul_(grad_cols)
                    if use_rows:
                        g.add_(s)
                flat = g.view(-1)
                if use_rows and row_targets is not None:
                    assert grad_rows is not None
                    local = torch.arange(i1 - i0, device=x.device) * m + row_targets[i0:i1]
                    flat.index_add_(0, local, -grad_rows[i0:i1])
                if use_cols and col_targets is not None:
                    assert grad_cols is not None
                    here = ((col_targets >= i0) & (col_targets < i1)).nonzero().flatten()
                    local = (col_targets[here] - i0) * m + here
                    flat.index_add_(0, local, -grad_cols[here])
                torch.mm(g, y, out=gx[i0:i1])
                gy.addmm_(g.t(), x[i0:i1])
        d_scale = (x * gx).sum() if ctx.needs_input_grad[2] else None
        d_x = gx.mul_(scale) if ctx.needs_input_grad[0] else None
        d_y = gy.mul_(scale) if ctx.needs_input_grad[1] else None
        d_bias = None
        if bias is not None and ctx.needs_input_grad[3]:
            # Softmax rows/columns sum to 1: d/db LSE = 1, and a target logit cancels it.
            d_bias = torch.zeros_like(bias)
            if rows and row_targets is None and grad_rows is not None:
                d_bias = d_bias + grad_rows.sum()
            if cols and col_targets is None and grad_cols is not None:
                d_bias = d_bias + grad_cols.sum()
        return d_x, d_y, d_scale, d_bias, None, None, None, None, None


class _TiledSoftplusSum(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor | None, tile_size: int
    ) -> Tensor:
        n, m = x.shape[0], y.shape[0]
        yt = y.t()
        tile = min(tile_size, max(n, 1))
        logits = x.new_empty((tile, m))
        total = x.new_zeros(())
        for i0 in _tiles(n, tile):
            i1 = min(n, i0 + tile)
            s = _tile_logits(logits, x, yt, scale, i0, i1, bias)
            total += torch.nn.functional.softplus(s, threshold=SOFTPLUS_THRESHOLD).sum()
        ctx.save_for_backward(x, y, scale, bias)
        ctx.tile = tile
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        x, y, scale, bias = ctx.saved_tensors
        n, m = x.shape[0], y.shape[0]
        tile = ctx.tile
        gx = torch.zeros_like(x)
        gy = torch.zeros_like(y)
        sig_sum = x.new_zeros(())
        logits = x.new_empty((tile, m))
        yt = y.t()
        for i0 in _tiles(n, tile):
            i1 = min(n, i0 + tile)
            s = _tile_logits(logits, x, yt, scale, i0, i1, bias)
            s.sigmoid_()  # d softplus(s) / ds
            sig_sum += s.sum()
            torch.mm(s, y, out=gx[i0:i1])
            gy.addmm_(s.t(), x[i0:i1])
        d_scale = (x * gx).sum() * grad if ctx.needs_input_grad[2] else None
        d_x = gx.mul_(scale * grad) if ctx.needs_input_grad[0] else None
        d_y = gy.mul_(scale * grad) if ctx.needs_input_grad[1] else None
        d_bias = sig_sum * grad if (bias is not None and ctx.needs_input_grad[3]) else None
        return d_x, d_y, d_scale, d_bias, None
