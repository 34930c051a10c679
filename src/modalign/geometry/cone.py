"""Cone effect: the mean cosine between random distinct pairs of embeddings.

``cone(x) = mean_{i != j} cos(x_i, x_j)``. Embeddings of one modality in a trained contrastive
model typically occupy a narrow cone (Liang et al. 2022): values near 1 mean every embedding points
the same way, near 0 the directions are spread over the sphere (as for random Gaussian vectors).

Computed exactly over all n(n-1) ordered pairs in one streamed pass, with no sampling, from

    sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - n,   u_i = x_i / ||x_i||,

accumulated in float64. The same identity over paired rows gives the mean cosine of positives
``cos(x_i, y_i)`` and of the non-positive cross pairs ``cos(x_i, y_j)``, ``i != j``
(:class:`PairedSums`).

Examples:
    >>> import numpy as np
    >>> mean_pairwise_cosine(np.array([[1.0, 0.0], [0.0, 1.0]]))
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modalign.geometry.inputs import (
    DEFAULT_CHUNK_ROWS,
    ArrayLike,
    as_matrix,
    check_paired,
    iter_chunks,
)

__all__ = [
    "PairedSums",
    "cone_from_sum",
    "mean_cross_cosine",
    "mean_pairwise_cosine",
    "mean_positive_cosine",
    "paired_sums",
]


def cone_from_sum(total: torch.Tensor, n: int) -> float:
    """Mean cosine over distinct pairs from the sum ``total`` of ``n`` unit rows."""
    total = total.to(torch.float64)
    return float((total @ total - n) / (n * (n - 1)))


def mean_pairwise_cosine(x: ArrayLike, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """Mean cosine over distinct pairs ``i != j`` of rows of ``x`` (the cone effect), exactly.

    Examples:
        >>> import numpy as np
        >>> round(mean_pairwise_cosine(np.ones((5, 3))), 12)
        1.0
    """
    xm = as_matrix(x, "x", min_rows=2)
    total = torch.zeros(xm.shape[1], dtype=torch.float64)
    for _, chunk in iter_chunks(xm, "x", normalize=True, chunk_rows=chunk_rows):
        total += chunk.sum(dim=0).to(torch.float64)
    return cone_from_sum(total, xm.shape[0])


@dataclass(frozen=True)
class PairedSums:
    """Sums over paired unit rows: ``sum u_i``, ``sum v_i`` and ``sum u_i . v_i`` (float64)."""

    n: int
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    sum_positive: float

    @property
    def mean_positive(self) -> float:
        """Mean cosine of positive pairs."""
        return self.sum_positive / self.n

    @property
    def mean_negative(self) -> float:
        """Mean cosine of non-positive cross pairs ``i != j``."""
        return float((self.sum_x @ self.sum_y - self.sum_positive) / (self.n * (self.n - 1)))


def paired_sums(x: ArrayLike, y: ArrayLike, *,
                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> PairedSums:
    """One streamed pass over paired rows (row i of ``x`` with row i of ``y``), normalised."""
    xm, ym = as_matrix(x, "x", min_rows=2), as_matrix(y, "y", min_rows=2)
    check_paired(xm, ym)
    sx = torch.zeros(xm.shape[1], dtype=torch.float64)
    sy = torch.zeros_like(sx)
    diag = 0.0
    chunks_x = iter_chunks(xm, "x", normalize=True, chunk_rows=chunk_rows)
    chunks_y = iter_chunks(ym, "y", normalize=True, chunk_rows=chunk_rows)
    for (_, cx), (_, cy) in zip(chunks_x, chunks_y):
        sx += cx.sum(dim=0).to(torch.float64)
        sy += cy.sum(dim=0).to(torch.float64)
        diag += float((cx * cy).sum(dim=1).to(torch.float64).sum())
    return PairedSums(xm.shape[0], sx, sy, diag)


def mean_positive_cosine(x: ArrayLike, y: ArrayLike, *,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """Mean cosine of positive pairs ``cos(x_i, y_i)`` (rows paired).

    Examples:
        >>> import numpy as np
        >>> mean_positive_cosine(np.eye(2), -np.eye(2))
        -1.0
    """
    return paired_sums(x, y, chunk_rows=chunk_rows).mean_positive


def mean_cross_cosine(x: ArrayLike, y: ArrayLike, *,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """Mean cosine of the non-positive cross pairs ``cos(x_i, y_j)``, ``i != j``, exactly.

    Examples:
        >>> import numpy as np
        >>> mean_cross_cosine(np.eye(2), np.eye(2))
        0.0
    """
    return paired_sums(x, y, chunk_rows=chunk_rows).mean_negative
