"""Modality gap: the distance between the centroids of two modalities in the joint space.

With rows L2-normalised (the default), ``mu_x = mean_i x_i`` and ``mu_y = mean_j y_j``:

* ``centroid_distance = ||mu_x - mu_y||`` (centroids **not** renormalised, as in Liang et al. 2022
  and Fahim et al. 2024); 0 means the two clouds share a centre, 2 is the maximum on the sphere.
* ``renormalized_distance = ||mu_x/||mu_x|| - mu_y/||mu_y||||`` and ``centroid_cosine`` (the cosine
  of the two centroid directions): the gap in direction only, blind to how spread each cloud is.
* ``gap_vector = mu_x - mu_y``: the shift that moves one centroid onto the other.

Everything is streamed in row chunks (float64 sums), so memory-mapped matrices of any length
work.
The two modalities need not have the same number of rows.

Examples:
    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0]]); y = np.array([[0.0, 1.0]])
    >>> round(modality_gap(x, y).centroid_distance, 6)
    1.414214
"""

from __future__ import annotations

import math
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

__all__ = ["GapResult", "centroid", "gap_from_centroids", "modality_gap"]


@dataclass(frozen=True)
class GapResult:
    """Centroid distances between two modalities; see the module docstring for definitions."""

    centroid_distance: float
    renormalized_distance: float
    centroid_cosine: float
    centroid_norms: tuple[float, float]
    gap_vector: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the gap vector's norm, not the vector itself)."""
        return {
            "centroid_distance": self.centroid_distance,
            "renormalized_distance": self.renormalized_distance,
            "centroid_cosine": self.centroid_cosine,
            "centroid_norms": list(self.centroid_norms),
        }


def centroid(x: ArrayLike, *, normalize: bool = True, name: str = "x",
             chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """Mean row of ``x`` (float64), after L2-normalising each row when ``normalize``.

    Examples:
        >>> centroid(np.array([[3.0, 4.0], [0.0, 2.0]])).tolist()
        [0.3, 0.9]
    """
    x = as_matrix(x, name)
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for _, chunk in iter_chunks(x, name, normalize=normalize, chunk_rows=chunk_rows):
        total += chunk.sum(dim=0).to(torch.float64)
    return (total / x.shape[0]).numpy()


def modality_gap(x: ArrayLike, y: ArrayLike, *, normalize: bool = True,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> GapResult:
    """Centroid distance (raw and renormalised), centroid cosine and gap vector of ``x`` vs ``y``.

    ``renormalized_distance`` and ``centroid_cosine`` are NaN when a centroid is the zero vector
    (its direction is undefined).

    Examples:
        >>> g = modality_gap(np.eye(2), np.eye(2)[::-1])
        >>> g.centroid_distance, round(g.centroid_cosine, 12)
        (0.0, 1.0)
    """
    xm, ym = as_matrices({"x": x, "y": y})
    return gap_from_centroids(centroid(xm, normalize=normalize, name="x", chunk_rows=chunk_rows),
                              centroid(ym, normalize=normalize, name="y", chunk_rows=chunk_rows))


def gap_from_centroids(mu_x: np.ndarray, mu_y: np.ndarray) -> GapResult:
    """The :class:`GapResult` of two centroids (float64 vectors of the same length)."""
    mu_x, mu_y = np.asarray(mu_x, dtype=np.float64), np.asarray(mu_y, dtype=np.float64)
    nx, ny = float(np.linalg.norm(mu_x)), float(np.linalg.norm(mu_y))
    if nx > 0 and ny > 0:
        ux, uy = mu_x / nx, mu_y / ny
        renorm = float(np.linalg.norm(ux - uy))
        cosine = float(np.clip(ux @ uy, -1.0, 1.0))
    else:
        renorm = cosine = math.nan
    return GapResult(
        centroid_distance=float(np.linalg.norm(mu_x - mu_y)),
        renormalized_distance=renorm,
        centroid_cosine=cosine,
        centroid_norms=(nx, ny),
        gap_vector=mu_x - mu_y,
    )
