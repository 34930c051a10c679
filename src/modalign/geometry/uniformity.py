"""Alignment and uniformity (Wang & Isola 2020), within a modality and across two modalities.

With L2-normalised rows and t = 2 (the default):

* ``alignment(x, y) = mean_i ||x_i - y_i||^alpha`` over positive pairs (alpha = 2): 0 when every
  pair coincides, 4 when every pair is antipodal. Exact, streamed.
* ``uniformity(x) = log( mean_{i<j} exp(-t ||x_i - x_j||^2) )`` over distinct pairs: 0 when all
  points coincide, lower (down to -t*4 = -8 for two antipodal points) when points spread out.
* ``cross_uniformity(x, y) = log( mean_{i != j} exp(-t ||x_i - y_j||^2) )`` over the non-positive
  cross-modal pairs (the positives ``i == j`` are left out).

**Sample-size robust estimator.** The common one-liner ``log mean exp(-t * cdist(x, x)^2)`` over
all n^2 entries includes the n self-pairs (each contributes exp(0) = 1) and so is biased upwards by
about ``1/n`` of the mean: it drifts with the batch size. The estimators here are U-statistics over
distinct pairs only, computed exactly in blocks with a running log-sum-exp (float64), so their
expectation does not depend on n. Above ``max_rows`` rows the same U-statistic is taken over a
seeded uniform sample of ``max_rows`` rows (paired rows for the cross version); a U-statistic of a
uniform subsample is still unbiased for the pair mean.

Examples:
    >>> import numpy as np
    >>> uniformity(np.array([[1.0, 0.0], [-1.0, 0.0]]))
    -8.0
    >>> alignment(np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]]))
    4.0
"""

from __future__ import annotations

import math

import torch

from modalign.geometry.inputs import (
    DEFAULT_CHUNK_ROWS,
    ArrayLike,
    as_matrix,
    check_paired,
    iter_chunks,
    sample_indices,
    sample_rows,
    take_rows,
)

__all__ = ["alignment", "cross_uniformity", "uniformity"]

#: Rows above which the pairwise U-statistics are taken over a seeded sample of rows.
DEFAULT_MAX_ROWS = 8192


def alignment(x: ArrayLike, y: ArrayLike, *, alpha: float = 2.0, normalize: bool = True,
              chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """Mean ``||x_i - y_i||^alpha`` over positive pairs (row i of ``x`` with row i of ``y``).

    Examples:
        >>> import numpy as np
        >>> alignment(np.eye(3), np.eye(3))
        0.0
    """
    if alpha <= 0:
        raise ValueError(f"alpha: expected a positive exponent, got {alpha}")
    xm, ym = as_matrix(x, "x"), as_matrix(y, "y")
    check_paired(xm, ym)
    total = 0.0
    chunks_x = iter_chunks(xm, "x", normalize=normalize, chunk_rows=chunk_rows)
    chunks_y = iter_chunks(ym, "y", normalize=normalize, chunk_rows=chunk_rows)
    for (_, cx), (_, cy) in zip(chunks_x, chunks_y):
        total += float((cx - cy).norm(dim=1).pow(alpha).sum(dtype=torch.float64))
    return total / xm.shape[0]


def _pair_logsumexp(a: torch.Tensor, b: torch.Tensor, t: float, mask: torch.Tensor | None
                    ) -> torch.Tensor:
    """log sum exp(-t ||a_i - b_j||^2) over the entries where ``mask`` is True (all if None).

    ``-t ||a - b||^2 = 2t a.b - t|a|^2 - t|b|^2``, clamped at 0 against rounding; the block's
    result is returned in float64.
    """
    bias = -t * (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :])
    logits = torch.addmm(bias, a, b.T, alpha=2.0 * t).clamp_max_(0.0)
    if mask is not None:
        logits.masked_fill_(~mask, -math.inf)
    return torch.logsumexp(logits.reshape(-1), dim=0).to(torch.float64)


def uniformity(x: ArrayLike, *, t: float = 2.0, normalize: bool = True,
               max_rows: int | None = DEFAULT_MAX_ROWS, seed: int = 0,
               block_rows: int = 2048) -> float:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` over distinct pairs (a U-statistic).

    Args:
        x: embeddings (n, d), n >= 2.
        t: the temperature of the Gaussian potential (2 in Wang & Isola).
        normalize: L2-normalise rows first.
        max_rows: above this many rows, use a seeded sample of this many rows (None: all rows).
        seed: seed of that sample.
        block_rows: rows per block of the pairwise computation (memory ~ block_rows^2 floats).

    Examples:
        >>> import numpy as np
        >>> uniformity(np.ones((4, 3)))
        0.0
    """
    if t <= 0:
        raise ValueError(f"t: expected a positive temperature, got {t}")
    xm = as_matrix(x, "x", min_rows=2)
    xs = sample_rows(xm, max_rows, seed, "x", normalize=normalize)
    n = xs.shape[0]
    lse = torch.tensor(-math.inf, dtype=torch.float64)
    for i in range(0, n, block_rows):
        a = xs[i:i + block_rows]
        for j in range(i, n, block_rows):
            b = xs[j:j + block_rows]
            mask = None
            if i == j:
                mask = torch.ones(len(a), len(b), dtype=torch.bool).triu(diagonal=1)
            lse = torch.logaddexp(lse, _pair_logsumexp(a, b, t, mask))
    return float(lse - math.log(n * (n - 1) / 2))


def cross_uniformity(x: ArrayLike, y: ArrayLike, *, t: float = 2.0, normalize: bool = True,
                     max_rows: int | None = DEFAULT_MAX_ROWS, seed: int = 0,
                     block_rows: int = 2048) -> float:
    """``log mean_{i != j} exp(-t ||x_i - y_j||^2)`` over non-positive cross-modal pairs.

    Rows are paired (row i of ``x`` is the positive of row i of ``y``); a sample keeps pairs
    together. The positive entries ``i == j`` are excluded, so how close positives are does not
    enter the value.

    Examples:
        >>> import numpy as np
        >>> cross_uniformity(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [1.0, 0.0]]))
        0.0
    """
    if t <= 0:
        raise ValueError(f"t: expected a positive temperature, got {t}")
    xm, ym = as_matrix(x, "x", min_rows=2), as_matrix(y, "y", min_rows=2)
    check_paired(xm, ym)
    idx = sample_indices(xm.shape[0], max_rows, seed)
    xs = take_rows(xm, idx, "x", normalize=normalize)
    ys = take_rows(ym, idx, "y", normalize=normalize)
    n = xs.shape[0]
    lse = torch.tensor(-math.inf, dtype=torch.float64)
    for i in range(0, n, block_rows):
        a = xs[i:i + block_rows]
        for j in range(0, n, block_rows):
            b = ys[j:j + block_rows]
            mask = None
            if i == j:
                mask = ~torch.eye(len(a), len(b), dtype=torch.bool)
            lse = torch.logaddexp(lse, _pair_logsumexp(a, b, t, mask))
    return float(lse - math.log(n * (n - 1)))
