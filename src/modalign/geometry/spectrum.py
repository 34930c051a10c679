"""Spectrum of an embedding cloud: covariance eigenvalues, effective rank, explained variance.

For rows ``x_i`` (L2-normalised by default) with covariance
``C = 1/(n-1) sum_i (x_i - mu)(x_i - mu)^T`` and eigenvalues ``lambda_1 >= ... >= lambda_d >= 0``:

* ``explained_variance[k] = (lambda_1 + ... + lambda_k) / sum_j lambda_j``: the share of the
  variance in the top-k principal directions (near 1 for small k: a collapsed,
  low-dimensional cloud).
* ``effective_rank = exp(H(p))`` with ``p_i = s_i / sum_j s_j`` over the singular values
  ``s_i = sqrt(lambda_i)`` of the centred matrix and ``H`` the Shannon entropy (Roy & Vetterli
  2007): 1 when one direction carries everything, d when all directions are used equally.

The covariance is accumulated in float64 over streamed row chunks (``sum x`` and
``sum x x^T``; each chunk's product in the input's precision), so memory stays ``O(d^2)`` for any
n. :func:`joint_spectrum` pools several modalities from their sums.

Examples:
    >>> import numpy as np
    >>> s = spectrum(np.random.default_rng(0).normal(size=(5000, 4)), normalize=False)
    >>> 3.9 < s.effective_rank <= 4.0
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modalign.geometry.inputs import (
    DEFAULT_CHUNK_ROWS,
    ArrayLike,
    as_matrices,
    as_matrix,
    iter_chunks,
)

__all__ = [
    "Moments",
    "Spectrum",
    "effective_rank",
    "joint_spectrum",
    "moments",
    "spectrum",
    "spectrum_from_moments",
]

DEFAULT_TOP = (1, 2, 5, 10, 32)


@dataclass(frozen=True)
class Moments:
    """Row count, row sum and sum of outer products of a matrix (float64)."""

    n: int
    total: torch.Tensor
    outer: torch.Tensor

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.total + other.total, self.outer + other.outer)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n

    @property
    def covariance(self) -> torch.Tensor:
        """Unbiased covariance ``(sum x x^T - n mu mu^T) / (n - 1)``."""
        mu = self.mean
        return (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues (descending) of the covariance, and summaries derived from them."""

    eigenvalues: np.ndarray
    effective_rank: float
    explained_variance: dict[int, float]
    n_rows: int

    def to_dict(self, keep: int = 64) -> dict[str, Any]:
        """JSON-ready summary with the top ``keep`` eigenvalues."""
        return {
            "effective_rank": self.effective_rank,
            "explained_variance": {str(k): v for k, v in self.explained_variance.items()},
            "eigenvalues": [float(v) for v in self.eigenvalues[:keep]],
            "total_variance": float(self.eigenvalues.sum()),
            "n_rows": self.n_rows,
        }


def moments(x: ArrayLike, *, normalize: bool = True, name: str = "x",
            chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Moments:
    """Streamed float64 ``n``, ``sum_i x_i`` and ``sum_i x_i x_i^T`` of ``x``."""
    xm = as_matrix(x, name, min_rows=2)
    d = xm.shape[1]
    total = torch.zeros(d, dtype=torch.float64)
    outer = torch.zeros(d, d, dtype=torch.float64)
    for _, chunk in iter_chunks(xm, name, normalize=normalize, chunk_rows=chunk_rows):
        total += chunk.sum(dim=0).to(torch.float64)
        outer += (chunk.T @ chunk).to(torch.float64)
    return Moments(xm.shape[0], total, outer)


def effective_rank(eigenvalues: ArrayLike) -> float:
    """``exp`` of the entropy of the normalised singular values ``sqrt(eigenvalues)``.

    Examples:
        >>> effective_rank(np.array([1.0, 1.0, 0.0]))
        2.0
    """
    ev = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    s = np.sqrt(ev)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def spectrum_from_moments(m: Moments, top: Sequence[int] = DEFAULT_TOP) -> Spectrum:
    """The :class:`Spectrum` of the covariance held by ``m``."""
    if any(k < 1 for k in top):
        raise ValueError(f"top: expected positive component counts, got {list(top)}")
    ev = torch.linalg.eigvalsh(m.covariance).flip(0).clamp_min(0).numpy()
    total = ev.sum()
    csum = np.cumsum(ev)
    explained = {int(k): float(csum[min(k, len(ev)) - 1] / total) if total > 0 else math.nan
                 for k in top}
    return Spectrum(eigenvalues=ev, effective_rank=effective_rank(ev),
                    explained_variance=explained, n_rows=m.n)


def spectrum(x: ArrayLike, *, normalize: bool = True, top: Sequence[int] = DEFAULT_TOP,
             chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Spectrum:
    """Covariance spectrum of one modality (see the module docstring).

    Examples:
        >>> spectrum(np.eye(3)).explained_variance[2]
        1.0
    """
    return spectrum_from_moments(moments(x, normalize=normalize, chunk_rows=chunk_rows), top)


def joint_spectrum(xs: Sequence[ArrayLike], *, normalize: bool = True,
                   top: Sequence[int] = DEFAULT_TOP,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Spectrum:
    """Spectrum of the pooled rows of several modalities (as if stacked into one matrix).

    Examples:
        >>> joint_spectrum([np.eye(2), -np.eye(2)]).n_rows
        4
    """
    if len(xs) == 0:
        raise ValueError("xs: expected at least one embedding matrix")
    mats = as_matrices({f"xs[{i}]": x for i, x in enumerate(xs)}, min_rows=2)
    total = moments(mats[0], normalize=normalize, name="xs[0]", chunk_rows=chunk_rows)
    for i, m in enumerate(mats[1:], start=1):
        total = total + moments(m, normalize=normalize, name=f"xs[{i}]", chunk_rows=chunk_rows)
    return spectrum_from_moments(total, top)
