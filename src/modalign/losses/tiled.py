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

On the CPU both walk each tile in column blocks of about :data:`BLOCK_ELEMENTS` logits, so that
the elementwise passes over a block run in cache right after its matmul; no temporary of the
inputs' size is allocated; the row/column positions of the target cells are grouped by block
once; and exponents that would underflow into the slow subnormal range are raised to the
smallest normal number only where a bound says they can occur (:func:`_exp_floor`). Where both
directions are reduced (CLIP's two cross-entropies, and every backward pass that needs both
softmaxes), one exponential per logit serves both: ``E = exp(S - sigma)`` with one number
``sigma`` per block, whose row and column sums (forward) or ``E * (alpha_i + kappa_j)``
(backward) give both results exactly (:class:`_SharedExp` states when; other blocks take two
exponentials). The gradient accumulators are written by their first product, not zero-filled.

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

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from modalign.losses.normalize import row_dots
from modalign.losses.validation import NORM_EPS, scalar_tensor

TILE_ELEMENTS = 1 << 22
"""Logits per tile when ``tile_size`` is None: as many rows as fit 4M logits (16 MB in fp32)."""

MIN_TILE_ROWS = 64
"""Fewest rows per tile when ``tile_size`` is None (very wide matrices)."""

BLOCK_ELEMENTS = 1 << 18
"""Logits per block on the CPU: a tile's columns are walked in blocks of about this many logits
(1 MB in fp32), so that the exp/sum passes over a block run in the core's L2 cache."""

MIN_BLOCK_COLUMNS = 256
"""Fewest columns per block on the CPU (keeps each block's matrix product efficient)."""

WEIGHT_STRIP_ELEMENTS = 1 << 17
"""Backward weights ``alpha_i + kappa_j`` formed per strip of about this many (512 KB in fp32,
half a block) on the CPU, so that the strip is still in cache when the block is multiplied by
it."""

SOFTPLUS_THRESHOLD = 40.0
"""``softplus(l)`` is taken as ``l`` above this (the error, exp(-40), is below float64 rounding)."""


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
    normalize: bool = False,
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
        normalize: L2-normalise the rows of x and y first, as ``F.normalize(., dim=-1)`` (rows
            of norm at most 1e-12 are divided by 1e-12). x's rows are normalised in each tile's
            scaling pass, y once; the gradients reach the raw x and y through the normalisation
            in place in the backward's own buffers (no normalised copy of x, no temporaries of
            the inputs' size).

    Returns:
        ``(row_values, col_values)``, differentiable w.r.t. x, y, scale and bias.

    Examples:
        >>> import torch
        >>> x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
        >>> rows, _ = tiled_logsumexp(x, y, 2.0, cols=False, tile_size=4, normalize=True)
        >>> unit = torch.nn.functional.normalize
        >>> torch.allclose(rows, (2.0 * unit(x, dim=1) @ unit(y, dim=1).T).logsumexp(1))
        True
    """
    if not (rows or cols):
        raise ValueError("rows and cols must not both be False")
    tile_size = resolve_tile_size(tile_size, y.shape[0])
    if row_targets is not None and (row_targets.shape != (x.shape[0],) or not rows):
        raise ValueError(f"row_targets must have shape ({x.shape[0]},) and needs rows=True")
    if col_targets is not None and (col_targets.shape != (y.shape[0],) or not cols):
        raise ValueError(f"col_targets must have shape ({y.shape[0]},) and needs cols=True")
    s = scalar_tensor(scale, x)
    b = None if bias is None else scalar_tensor(bias, x)
    row_val, col_val = _TiledLogSumExp.apply(
        x, y, s, b, row_targets, col_targets, rows, cols, tile_size, bool(normalize)
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
    s = scalar_tensor(scale, x)
    b = None if bias is None else scalar_tensor(bias, x)
    return _TiledSoftplusSum.apply(x, y, s, b, tile_size)


def _tiles(n: int, tile_size: int) -> range:
    return range(0, n, tile_size)


def _scaled_blocks(
    x: Tensor, yt: Tensor, scale: Tensor, tile: int, width: int, scaled: Tensor, logits: Tensor
) -> Iterator[tuple[int, int, int, int, int, int, Tensor, Tensor]]:
    """``(ti, bj, i0, i1, j0, j1, xs, s)`` for each block of the logits ``scale * x @ yt``:
    tile ``ti`` holds rows ``i0:i1`` (``xs``: them scaled, in ``scaled``), block ``bj`` columns
    ``j0:j1``, and ``s`` is the block's logits, written into ``logits`` (reused: each block is
    overwritten by the next). ``scale``: a 0-d tensor or one per row (:func:`_row_scale`)."""
    n, m = x.shape[0], yt.shape[1]
    for ti, i0 in enumerate(_tiles(n, tile)):
        i1 = min(n, i0 + tile)
        xs = torch.mul(x[i0:i1], _rows(scale, i0, i1), out=scaled[: i1 - i0])
        for bj, j0 in enumerate(range(0, m, width)):
            j1 = min(m, j0 + width)
            s = logits[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
            torch.mm(xs, yt[:, j0:j1], out=s)
            yield ti, bj, i0, i1, j0, j1, xs, s


def _rows(scale: Tensor, i0: int, i1: int) -> Tensor:
    """The scale of rows ``i0:i1``: ``scale`` itself if 0-d, else its rows."""
    return scale if scale.dim() == 0 else scale[i0:i1]


def _row_scale(x: Tensor, scale: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """``(factor, norms)``: the factor each row of ``x`` is multiplied by in the logits, and the
    row norms clamped at :data:`NORM_EPS`. Without ``normalize``: ``(scale, None)``; with it:
    ``scale / max(||x_i||, eps)`` as an (n, 1) column, and those clamped norms."""
    if not normalize:
        return scale, None
    norms = torch.linalg.vector_norm(x, dim=1).clamp_min_(NORM_EPS)
    return (scale / norms).unsqueeze(1), norms


def _unit_gradient_(grad: Tensor, rows: Tensor, norms: Tensor, dots: Tensor,
                    rows_are_unit: bool) -> Tensor:
    """In place, the gradient w.r.t. the unit rows ``u_i = r_i / n_i`` turned into the gradient
    w.r.t. the raw rows r: ``(g_i - u_i (u_i . g_i)) / n_i``, given ``dots`` = ``rows_i . g_i``
    and ``rows`` the raw rows or (``rows_are_unit``) the unit rows. A row whose norm was raised to
    :data:`NORM_EPS` is divided by it only (the clamp has no gradient), as in ``F.normalize``."""
    coef = dots / (norms if rows_are_unit else norms ** 3)
    coef.masked_fill_(norms <= NORM_EPS, 0.0)
    return grad.div_(norms.unsqueeze(1)).addcmul_(rows, coef.unsqueeze(1), value=-1)


def block_width(tile_rows: int, m: int, device: torch.device) -> int:
    """Columns per block of a tile: on the CPU as many as fit :data:`BLOCK_ELEMENTS` logits (at
    least :data:`MIN_BLOCK_COLUMNS`), so that a block's elementwise passes run in cache; on other
    devices the whole row (one kernel per pass over the tile).

    Examples:
        >>> import torch
        >>> block_width(256, 16384, torch.device("cpu")), block_width(256, 300, torch.device("cpu"))
        (1024, 300)
    """
    if device.type != "cpu":
        return max(m, 1)
    return max(1, min(m, max(MIN_BLOCK_COLUMNS, BLOCK_ELEMENTS // max(tile_rows, 1))))


def _gradient_buffers(x: Tensor, y: Tensor, walked: bool) -> tuple[Tensor, Tensor]:
    """The ``G Y`` and ``G^T (scale X)`` accumulators: empty where blocks will be walked (their
    first products write them, see :func:`_add_products`), else zeros."""
    if walked and x.shape[0] > 0 and y.shape[0] > 0:
        return x.new_empty(x.shape), y.new_empty(y.shape)
    return x.new_zeros(x.shape), y.new_zeros(y.shape)


def _add_products(gx: Tensor, gy: Tensor, g: Tensor, y: Tensor, xs: Tensor, first_block: bool,
                  first_tile: bool, i0: int, i1: int, j0: int, j1: int) -> None:
    """``gx[i0:i1] += g @ y[j0:j1]`` and ``gy[j0:j1] += g^T @ xs`` for block ``g``; the first
    block of a row tile and the first tile of a column block write instead (no zero fill)."""
    if first_block:
        torch.mm(g, y[j0:j1], out=gx[i0:i1])
    else:
        gx[i0:i1].addmm_(g, y[j0:j1])
    if first_tile:
        torch.mm(g.t(), xs, out=gy[j0:j1])
    else:
        gy[j0:j1].addmm_(g.t(), xs)


def _scale_by_sum(e: Tensor, alpha: Tensor, kappa: Tensor, buffer: Tensor) -> Tensor:
    """``e *= alpha[:, None] + kappa[None, :]`` in place. On the CPU the weights are formed a
    strip of about :data:`WEIGHT_STRIP_ELEMENTS` at a time in the start of ``buffer``, which then
    stays in cache between its write and its use."""
    rows, cols = e.shape
    step = rows if e.device.type != "cpu" else max(1, WEIGHT_STRIP_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = buffer[: (r1 - r0) * cols].view(r1 - r0, cols)
        e[r0:r1].mul_(torch.add(alpha[r0:r1, None], kappa, out=w))
    return e


def _target_logits(a: Tensor, b: Tensor, targets: Tensor | None, scale: Tensor, chunk: int
                   ) -> Tensor:
    """``scale * a_i . b_{targets[i]}`` for every row i (no bias: it cancels in a cross-entropy),
    ``chunk`` rows at a time through one reused buffer (no n x d temporary); ``targets=None``:
    the identity (``b_i``, no gather). ``scale``: 0-d, or one per row of ``a`` (shape (n,))."""
    out = a.new_empty(a.shape[0])
    buf = a.new_empty((min(chunk, a.shape[0]), a.shape[1]))
    for i0 in range(0, a.shape[0], chunk):
        i1 = min(a.shape[0], i0 + chunk)
        if targets is None:
            picked = torch.mul(b[i0:i1], a[i0:i1], out=buf[: i1 - i0])
        else:
            picked = torch.index_select(b, 0, targets[i0:i1], out=buf[: i1 - i0]).mul_(a[i0:i1])
        torch.sum(picked, dim=1, out=out[i0:i1])
    return out.mul_(scale)


def _is_identity(targets: Tensor | None, n: int, m: int) -> bool:
    """Whether ``targets`` is ``arange(n)`` of a square matrix (CLIP's diagonal)."""
    if targets is None or n != m:
        return False
    return bool(torch.equal(targets, torch.arange(n, device=targets.device, dtype=targets.dtype)))


def _exact_lse(x: Tensor, y: Tensor, scale: Tensor, which: Tensor, dim: int, budget: int
               ) -> Tensor:
    """Exact log-sum-exp of the selected rows (dim=1) or columns (dim=0) of ``scale x y^T``,
    a chunk of them at a time so that no chunk holds more than about ``budget`` logits
    (``scale``: 0-d or one per row of x, shape (n, 1))."""
    other = (y if dim == 1 else x).shape[0]
    step = max(1, budget // max(other, 1))
    parts = []
    for k in range(0, which.numel(), step):
        chosen = which[k:k + step]
        if dim == 1:
            rows = scale if scale.dim() == 0 else scale.index_select(0, chosen)
            parts.append(torch.logsumexp((x.index_select(0, chosen) * rows) @ y.t(), dim=1))
        else:
            parts.append(torch.logsumexp((x * scale) @ y.index_select(0, chosen).t(), dim=0))
    return torch.cat(parts)


def _logit_bound(x: Tensor, y: Tensor, scale: Tensor) -> float:
    """``max_i |scale_i| |x_i| max|y_j|``: no logit of ``scale x y^T`` lies outside +-this
    (``scale``: 0-d or one per row of x)."""
    norms = torch.linalg.vector_norm(x, dim=1)
    top = float((norms * scale.abs().view(-1)).max()) if scale.dim() else float(
        scale.abs()) * float(norms.max())
    return top * float(torch.linalg.vector_norm(y, dim=1).max())


def _exp_floor(x: Tensor, y: Tensor, scale: Tensor, *shifts: Tensor | None,
               bound: float | None = None) -> float | None:
    """The exponent floor for ``exp(S - shift)``, or None where no exponent can fall below it.

    On x86 CPUs an exponential that underflows into the subnormal range or to zero costs tens of
    times a normal one. There the exponents are raised to the log of the dtype's smallest normal
    number, which changes each term by less than that number; every sum such a term enters holds
    a term of at least 1 (the shift is the positive logit, the maximum, or the log-sum-exp), so
    the sums are unchanged at the dtype's precision. The clamp pass is skipped when the bound
    ``S - shift >= -|scale| max|x_i| max|y_j| - max(shift)`` already keeps every exponent above
    the floor (e.g. unit vectors at CLIP's initial scale), and on other devices. ``bound``:
    :func:`_logit_bound`, where already known.
    """
    if x.device.type != "cpu" or x.numel() == 0 or y.numel() == 0:
        return None
    floor = math.log(torch.finfo(x.dtype).tiny)
    bound = _logit_bound(x, y, scale) if bound is None else bound
    top = max([bound] + [float(s.max()) for s in shifts if s is not None and s.numel()])
    return floor if -bound - top < floor else None


def _floored_exp(t: Tensor, floor: float | None) -> Tensor:
    """``t.exp_()`` with the exponents first raised to ``floor`` (see :func:`_exp_floor`)."""
    return (t if floor is None else t.clamp_(min=floor)).exp_()


def _extrema(v: Tensor, size: int) -> list[tuple[float, float]]:
    """``(min, max)`` of each run of ``size`` consecutive entries of ``v`` (one host transfer)."""
    k = -(-v.shape[0] // size)
    pad = k * size - v.shape[0]
    lo = torch.nn.functional.pad(v, (0, pad), value=math.inf).view(k, size).amin(1)
    hi = torch.nn.functional.pad(v, (0, pad), value=-math.inf).view(k, size).amax(1)
    return list(zip(lo.tolist(), hi.tolist(), strict=True))


class _SharedExp:
    """One exponential per logit for both the row and the column reductions of a block.

    With row shifts ``a`` and column shifts ``c`` (positive logits in the forward pass,
    log-sum-exps in the backward) and one number ``sigma`` per block,
    ``exp(S_ij - a_i) = E_ij exp(sigma - a_i)`` and ``exp(S_ij - c_j) = E_ij exp(sigma - c_j)``
    with ``E = exp(S - sigma)``: the block's row sums and column sums of ``E``, times per-row and
    per-column factors, give both reductions (the backward's ``dL/dS`` is ``E * (alpha_i +
    kappa_j)``). It is exact where ``sigma`` can be chosen with

    * ``sigma <= min(a, c) + log(eps / N) - log(tiny)`` (N = the longer side): an exponential
      that underflows, or is floored at ``log(tiny)``, is then below ``eps / N`` of a sum that
      holds a term of at least 1 (the positive logit or the log-sum-exp is its shift), and
    * ``top - sigma <= log(max / N)``, ``top`` the largest logit the block can hold (at most
      ``|scale| max|x| max|y|``, and in the backward at most the shifts): no sum of ``E`` over a
      row or column of a block overflows.

    ``sigma = 0`` where allowed saves the subtraction (unit vectors at a logit scale below 79 in
    float32). Blocks with no such ``sigma`` take two exponentials (:meth:`shift` says which).
    """

    def __init__(self, a: Tensor, c: Tensor, tile: int, width: int, bound: float,
                 shifts_bound: bool, row_weights: Tensor | None = None,
                 col_weights: Tensor | None = None) -> None:
        info = torch.finfo(a.dtype)
        self.a, self.c, self.row_weights, self.col_weights = a, c, row_weights, col_weights
        self._at_zero: dict[str, Tensor] = {}
        count = math.log(max(a.numel(), c.numel(), 1))
        self.log_tiny = math.log(info.tiny)
        self.headroom = math.log(info.eps) - count - self.log_tiny
        self.cap = math.log(info.max) - count
        self.rows, self.cols = _extrema(a, tile), _extrema(c, width)
        self.bound = bound
        self.shifts_bound = shifts_bound  # logits are at most their row's and column's shift
        self.floors = a.device.type == "cpu"  # see _exp_floor

    def shift(self, ti: int, bj: int) -> tuple[float, float | None] | None:
        """``(sigma, floor)`` for block (ti, bj) (floor: the exponent floor of the clamp pass, or
        None), or None where it needs two exponentials."""
        a_lo, a_hi = self.rows[ti]
        c_lo, c_hi = self.cols[bj]
        if not all(map(math.isfinite, (a_lo, a_hi, c_lo, c_hi, self.bound))):
            return None
        top = min(self.bound, a_hi, c_hi) if self.shifts_bound else self.bound
        low = min(a_lo, c_lo) + self.headroom
        sigma = 0.0 if (top <= self.cap and low >= 0.0) else min(top, low)
        if not top - sigma <= self.cap:
            return None
        clamp = self.floors and -self.bound - sigma < self.log_tiny
        return sigma, (self.log_tiny if clamp else None)

    def row_factors(self, sigma: float, i0: int, i1: int) -> Tensor:
        """``exp(sigma - a[i0:i1])``, times the row weights if given (kept whole for sigma 0)."""
        return self._factors("rows", self.a, self.row_weights, sigma, i0, i1)

    def col_factors(self, sigma: float, j0: int, j1: int) -> Tensor:
        """``exp(sigma - c[j0:j1])``, times the column weights if given."""
        return self._factors("cols", self.c, self.col_weights, sigma, j0, j1)

    def _factors(self, side: str, shift: Tensor, weights: Tensor | None, sigma: float,
                 start: int, stop: int) -> Tensor:
        if sigma == 0.0:
            if side not in self._at_zero:
                whole = shift.neg().exp_()
                self._at_zero[side] = whole if weights is None else whole.mul_(weights)
            return self._at_zero[side][start:stop]
        part = (sigma - shift[start:stop]).exp_()
        return part if weights is None else part.mul_(weights[start:stop])


class _TargetCells:
    """The target cells of the logit matrix, grouped by (row tile, column block) once, so a block
    finds its own with no per-block search.

    ``rows[b]`` / ``cols[b]`` are the global row and column indices of the target cells that lie
    in block ``b = tile_index * blocks + block_index`` (empty where none).
    """

    def __init__(self, row_targets: Tensor | None, col_targets: Tensor | None, tile: int,
                 width: int, n: int, m: int) -> None:
        self.blocks = -(-m // width)
        count = -(-n // tile) * self.blocks
        self.row_cells = self.col_cells = None
        if row_targets is not None:
            r = torch.arange(n, device=row_targets.device)
            self.row_cells = self._group(r, row_targets, (r // tile) * self.blocks
                                         + row_targets // width, count)
        if col_targets is not None:
            c = torch.arange(m, device=col_targets.device)
            self.col_cells = self._group(col_targets, c, (col_targets // tile) * self.blocks
                                         + c // width, count)

    @staticmethod
    def _group(r: Tensor, c: Tensor, keys: Tensor, count: int
               ) -> tuple[Tensor, Tensor, list[int]]:
        order = torch.argsort(keys, stable=True)
        offsets = [0, *torch.bincount(keys, minlength=count).cumsum(0).tolist()]
        return r[order], c[order], offsets

    def rows(self, tile_index: int, block_index: int) -> tuple[Tensor, Tensor] | None:
        """(rows, cols) of the row-target cells in a block, or None."""
        return self._cells(self.row_cells, tile_index, block_index)

    def cols(self, tile_index: int, block_index: int) -> tuple[Tensor, Tensor] | None:
        """(rows, cols) of the column-target cells in a block, or None."""
        return self._cells(self.col_cells, tile_index, block_index)

    def _cells(self, cells: tuple[Tensor, Tensor, list[int]] | None, ti: int, bj: int
               ) -> tuple[Tensor, Tensor] | None:
        if cells is None:
            return None
        r, c, offsets = cells
        b = ti * self.blocks + bj
        a, z = offsets[b], offsets[b + 1]
        return (r[a:z], c[a:z]) if z > a else None


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
        normalize: bool,
    ) -> tuple[Tensor, Tensor]:
        x, y = x.contiguous(), y.contiguous()
        n, m = x.shape[0], y.shape[0]
        # normalize: x's rows scaled by scale / ||x_i|| in each tile, y normalised once
        x_scale, x_norms = _row_scale(x, scale, normalize)
        y_norms = None
        if normalize:
            y_norms = torch.linalg.vector_norm(y, dim=1).clamp_min_(NORM_EPS)
            y = y / y_norms.unsqueeze(1)
        yt = y.t()
        tile = min(tile_size, max(n, 1))
        width = block_width(tile, m, x.device)
        logits = x.new_empty(tile * width)
        work: Tensor | None = None if (rows and cols) else logits  # allocated where needed
        scaled = x.new_empty((tile, x.shape[1]))
        # Shifts of the exponentials: the positive logit where a target is given (the result is
        # then the cross-entropy directly), else the running maximum.
        # (The diagonal's positives are one vector for both directions: taken once, no gather.)
        diagonal = _is_identity(row_targets, n, m) and _is_identity(col_targets, n, m)
        row_shift = (None if row_targets is None
                     else _target_logits(x, y, None if diagonal else row_targets,
                                         x_scale.view(-1), tile))
        col_shift = (row_shift if diagonal else None if col_targets is None
                     else _target_logits(y, x, col_targets, x_scale if x_norms is None
                                         else x_scale.view(-1)[col_targets], tile))
        # Both cross-entropies: one exponential per logit where the block's shifts allow it.
        bound = _logit_bound(x, y, x_scale) if x.numel() and y.numel() else 0.0
        shared = None
        if row_shift is not None and col_shift is not None and x.numel() and y.numel():
            shared = _SharedExp(row_shift, col_shift, tile, width, bound, shifts_bound=False)
        floor = _exp_floor(x, y, scale, row_shift, col_shift, bound=bound)  # two-exp blocks
        row_acc = x.new_full((n if rows else 0,), 0.0 if row_shift is not None else float("-inf"))
        col_acc = x.new_full((m if cols else 0,), 0.0 if col_shift is not None else float("-inf"))
        # Tile value of each target logit minus its shift: subtracting it makes the result
        # lse - S_target with S_target bitwise the logit that entered the sum.
        row_off = x.new_zeros(n if row_shift is not None else 0)
        col_off = x.new_zeros(m if col_shift is not None else 0)
        cells = _TargetCells(row_targets, col_targets, tile, width, n, m)
        for ti, bj, i0, i1, j0, j1, _, s in _scaled_blocks(x, yt, x_scale, tile, width, scaled,
                                                           logits):
            if row_shift is not None and (hit := cells.rows(ti, bj)) is not None:
                r, c = hit
                row_off[r] = s[r - i0, c - j0] - row_shift[r]
            if col_shift is not None and (hit := cells.cols(ti, bj)) is not None:
                r, c = hit
                col_off[c] = s[r - i0, c - j0] - col_shift[c]
            if shared is not None and (plan := shared.shift(ti, bj)) is not None:
                assert row_shift is not None and col_shift is not None
                sigma, fl = plan
                e = _floored_exp(s.sub_(sigma) if sigma else s, fl)  # exp(S - sigma)
                row_acc[i0:i1].addcmul_(e.sum(dim=1), shared.row_factors(sigma, i0, i1))
                col_acc[j0:j1].addcmul_(e.sum(dim=0), shared.col_factors(sigma, j0, j1))
                continue
            if work is None:
                work = x.new_empty(tile * width)
            if rows:
                w = work[: s.numel()].view_as(s)
                if row_shift is not None:
                    torch.sub(s, row_shift[i0:i1, None], out=w)
                    row_acc[i0:i1] += _floored_exp(w, floor).sum(dim=1)
                else:
                    peak = s.amax(dim=1, keepdim=True)
                    torch.sub(s, peak, out=w)
                    part = w.exp_().sum(dim=1).log_().add_(peak.squeeze(1))
                    row_acc[i0:i1] = torch.logaddexp(row_acc[i0:i1], part)
            if cols:
                if col_shift is not None:
                    col_acc[j0:j1] += _floored_exp(s.sub_(col_shift[j0:j1]), floor).sum(0)
                else:
                    peak = s.amax(dim=0)
                    part = s.sub_(peak).exp_().sum(dim=0).log_().add_(peak)
                    col_acc[j0:j1] = torch.logaddexp(col_acc[j0:j1], part)
        row_val = row_acc.log_() if row_shift is not None else row_acc
        if col_shift is not None:
            col_acc = col_acc.log_()
        # Rows/columns whose exponentials overflowed the positive-logit shift: recompute exactly.
        if row_shift is not None:
            bad = (~torch.isfinite(row_val)).nonzero().flatten()
            if bad.numel():
                row_val[bad] = _exact_lse(x, y, x_scale, bad, 1, tile * m) - row_shift[bad]
        if col_shift is not None:
            bad = (~torch.isfinite(col_acc)).nonzero().flatten()
            if bad.numel():
                col_acc[bad] = _exact_lse(x, y, x_scale, bad, 0, tile * m) - col_shift[bad]
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
        ctx.save_for_backward(x, y, scale, bias, row_targets, col_targets, row_lse, col_lse,
                              x_norms, y_norms)
        ctx.rows, ctx.cols, ctx.tile, ctx.bound = rows, cols, tile, bound
        ctx.mark_non_differentiable(*([] if rows else [row_val]), *([] if cols else [col_acc]))
        return row_val, col_acc

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor | None, grad_cols: Tensor | None) -> tuple[Any, ...]:
        (x, y, scale, bias, row_targets, col_targets, row_lse, col_lse, x_norms,
         y_norms) = ctx.saved_tensors
        rows, cols, tile = ctx.rows, ctx.cols, ctx.tile
        # where normalising: y is the unit rows; x's rows are scaled by scale / ||x_i||
        x_scale = scale if x_norms is None else (scale / x_norms).unsqueeze(1)
        use_rows = rows and grad_rows is not None and bool(grad_rows.any())
        use_cols = cols and grad_cols is not None and bool(grad_cols.any())
        n, m = x.shape[0], y.shape[0]
        # G @ Y (unscaled) and G^T @ (scale X): the first block of each row tile and the first
        # tile of each column block write them (no zero fill), the others accumulate.
        gx, gy = _gradient_buffers(x, y, use_rows or use_cols)
        # dL/dS_ij = g_i (P_ij - [j = t_i]) + h_j (Q_ij - [i = u_j]) with P, Q the row and column
        # softmaxes; the one-hots are subtracted in the block before the matmuls. Both parts:
        # G = E * (alpha_i + kappa_j) from one exponential E = exp(S - sigma), alpha = g exp(sigma
        # - lse_rows), kappa = h exp(sigma - lse_cols), where the block allows it (_SharedExp).
        # One part: a positive weight is folded into the shift (exp(S - lse + log g)) to save a
        # pass over the block.
        row_shift = row_fold = col_shift = col_fold = None
        if use_rows and not use_cols:
            assert grad_rows is not None
            row_fold = bool((grad_rows > 0).all())
            row_shift = row_lse - (grad_rows.log() if row_fold else 0.0)
        if use_cols and not use_rows:
            assert grad_cols is not None
            col_fold = bool((grad_cols > 0).all())
            col_shift = col_lse - (grad_cols.log() if col_fold else 0.0)
        if use_rows or use_cols:
            yt = y.t()
            width = block_width(tile, m, x.device)
            bound = ctx.bound
            shared = None
            if use_rows and use_cols and n and m:
                shared = _SharedExp(row_lse, col_lse, tile, width, bound, shifts_bound=True,
                                    row_weights=grad_rows, col_weights=grad_cols)
                floor = _exp_floor(x, y, scale, row_lse, col_lse, bound=bound)  # two-exp blocks
            else:
                floor = _exp_floor(x, y, scale, row_shift, col_shift, bound=bound)
            logits = x.new_empty(tile * width)
            work = x.new_empty(tile * width) if (use_rows and use_cols) else logits
            scaled = x.new_empty((tile, x.shape[1]))
            cells = _TargetCells(row_targets if use_rows else None,
                                 col_targets if use_cols else None, tile, width, n, m)
            for ti, bj, i0, i1, j0, j1, xs, s in _scaled_blocks(x, yt, x_scale, tile, width,
                                                                scaled, logits):
                g = s
                if shared is not None:
                    assert grad_rows is not None and grad_cols is not None
                    if (plan := shared.shift(ti, bj)) is not None:
                        sigma, fl = plan
                        _floored_exp(s.sub_(sigma) if sigma else s, fl)  # exp(S - sigma)
                        _scale_by_sum(s, shared.row_factors(sigma, i0, i1),
                                      shared.col_factors(sigma, j0, j1), work)
                    else:
                        w = work[: s.numel()].view_as(s)
                        torch.sub(s, col_lse[j0:j1], out=w)
                        _floored_exp(w, floor).mul_(grad_cols[j0:j1])
                        _floored_exp(s.sub_(row_lse[i0:i1, None]), floor)
                        s.mul_(grad_rows[i0:i1, None]).add_(w)
                elif use_rows:
                    assert row_shift is not None and grad_rows is not None
                    _floored_exp(s.sub_(row_shift[i0:i1, None]), floor)
                    if not row_fold:
                        s.mul_(grad_rows[i0:i1, None])
                else:
                    assert col_shift is not None and grad_cols is not None
                    _floored_exp(s.sub_(col_shift[j0:j1]), floor)
                    if not col_fold:
                        s.mul_(grad_cols[j0:j1])
                if (hit := cells.rows(ti, bj)) is not None:
                    assert grad_rows is not None
                    r, c = hit
                    g.index_put_((r - i0, c - j0), -grad_rows[r], accumulate=True)
                if (hit := cells.cols(ti, bj)) is not None:
                    assert grad_cols is not None
                    r, c = hit
                    g.index_put_((r - i0, c - j0), -grad_cols[c], accumulate=True)
                _add_products(gx, gy, g, y, xs, bj == 0, ti == 0, i0, i1, j0, j1)
        if x_norms is None:
            d_scale = torch.dot(x.reshape(-1), gx.view(-1)) if ctx.needs_input_grad[2] else None
            d_x = gx.mul_(scale) if ctx.needs_input_grad[0] else None
            d_y = gy if ctx.needs_input_grad[1] else None
        else:
            # dL/d(unit x_i) = scale gx_i, dL/d(unit y_j) = gy_j; through the normalisation
            assert y_norms is not None
            dots = row_dots(x, gx, tile)  # x_i . gx_i
            d_scale = (dots / x_norms).sum() if ctx.needs_input_grad[2] else None
            d_x = (_unit_gradient_(gx.mul_(scale), x, x_norms, dots.mul_(scale), False)
                   if ctx.needs_input_grad[0] else None)
            d_y = (_unit_gradient_(gy, y, y_norms, row_dots(y, gy, tile), True)
                   if ctx.needs_input_grad[1] else None)
        d_bias = None
        if bias is not None and ctx.needs_input_grad[3]:
            # Softmax rows/columns sum to 1: d/db LSE = 1, and a target logit cancels it.
            d_bias = torch.zeros_like(bias)
            if rows and row_targets is None and grad_rows is not None:
                d_bias = d_bias + grad_rows.sum()
            if cols and col_targets is None and grad_cols is not None:
                d_bias = d_bias + grad_cols.sum()
        return d_x, d_y, d_scale, d_bias, None, None, None, None, None, None


class _TiledSoftplusSum(torch.autograd.Function):
    """``sum softplus(S)``, walked in the same column blocks as the log-sum-exps (one block of
    logits in memory); the backward's ``sigmoid(S)`` is ``dL/dS`` block by block."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor | None, tile_size: int
    ) -> Tensor:
        x, y = x.contiguous(), y.contiguous()
        n, m = x.shape[0], y.shape[0]
        tile = min(tile_size, max(n, 1))
        width = block_width(tile, m, x.device)
        logits = x.new_empty(tile * width)
        scaled = x.new_empty((tile, x.shape[1]))
        total = x.new_zeros(())
        for *_, s in _scaled_blocks(x, y.t(), scale, tile, width, scaled, logits):
            if bias is not None:
                s.add_(bias)
            total += torch.ops.aten.softplus.out(s, 1, SOFTPLUS_THRESHOLD, out=s).sum()
        ctx.save_for_backward(x, y, scale, bias)
        ctx.tile = tile
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        x, y, scale, bias = ctx.saved_tensors
        tile = ctx.tile
        width = block_width(tile, y.shape[0], x.device)
        gx, gy = _gradient_buffers(x, y, True)
        sig_sum = x.new_zeros(())
        logits = x.new_empty(tile * width)
        scaled = x.new_empty((tile, x.shape[1]))
        for ti, bj, i0, i1, j0, j1, xs, s in _scaled_blocks(x, y.t(), scale, tile, width,
                                                            scaled, logits):
            if bias is not None:
                s.add_(bias)
            s.sigmoid_()  # d softplus(s) / ds
            sig_sum += s.sum()
            _add_products(gx, gy, s, y, xs, bj == 0, ti == 0, i0, i1, j0, j1)
        d_scale = torch.dot(x.reshape(-1), gx.view(-1)) * grad if ctx.needs_input_grad[2] else None
        d_x = gx.mul_(scale * grad) if ctx.needs_input_grad[0] else None
        d_y = gy.mul_(grad) if ctx.needs_input_grad[1] else None
        d_bias = sig_sum * grad if (bias is not None and ctx.needs_input_grad[3]) else None
        return d_x, d_y, d_scale, d_bias, None
