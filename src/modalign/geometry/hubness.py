"""Hubness of cross-modal retrieval: how unevenly gallery items appear in the queries' k-NN lists.

For queries ``q_1..q_m`` (one modality) and a gallery ``g_1..g_G`` (another modality), the
k-occurrence ``N_k(j)`` counts the queries whose k nearest gallery items (by cosine) include
``g_j``; its mean is ``k m / G``. Reported per direction (queries of x against a gallery of y, and
the reverse):

* ``skewness``: the sample skewness ``E[(N_k - mean)^3] / std^3`` of ``N_k`` over the gallery
  (Radovanovic et al. 2010). 0 for a symmetric spread; large positive values mean a few "hubs" are
  retrieved for very many queries (common in high-dimensional spaces with a modality gap).
  Defined as 0 when every gallery item has the same count.
* ``antihub_share``: the share of gallery items that never appear in any k-NN list (``N_k = 0``).
* ``max_occurrence``: the largest ``N_k``.

Above ``max_rows`` rows, queries and gallery are each a seeded uniform sample of ``max_rows`` rows
(recorded by the caller); the k-NN search itself is exact and chunked.

Examples:
    >>> import numpy as np
    >>> h = hubness(np.eye(4), np.eye(4), k=1)
    >>> h["skewness"], h["antihub_share"]
    (0.0, 0.0)
"""

from __future__ import annotations

from typing import Any

import torch

from modalign.geometry.inputs import (
    ArrayLike,
    as_matrix,
    check_same_dim,
    sample_rows,
)
from modalign.geometry.knn import topk_neighbours

__all__ = ["hubness", "k_occurrence", "skewness"]

DEFAULT_MAX_ROWS = 10000


def k_occurrence(neighbours: torch.Tensor, n_gallery: int) -> torch.Tensor:
    """Counts ``N_k(j)`` of each gallery index ``j`` in a (queries, k) neighbour index table."""
    return torch.bincount(neighbours.reshape(-1), minlength=n_gallery)


def skewness(values: torch.Tensor) -> float:
    """Population skewness ``E[(v - mean)^3] / std^3`` (0 when all values are equal).

    Examples:
        >>> skewness(torch.tensor([1.0, 1.0, 1.0]))
        0.0
    """
    v = values.to(torch.float64)
    centred = v - v.mean()
    std = centred.pow(2).mean().sqrt()
    if float(std) == 0.0:
        return 0.0
    return float(centred.pow(3).mean() / std**3)


def hubness(queries: ArrayLike, gallery: ArrayLike, *, k: int = 10, normalize: bool = True,
            max_rows: int | None = DEFAULT_MAX_ROWS, seed: int = 0) -> dict[str, Any]:
    """k-occurrence skewness, anti-hub share and largest k-occurrence of ``gallery`` items.

    Args:
        queries: (m, d) query embeddings (one modality).
        gallery: (G, d) gallery embeddings (the other modality), G > k.
        k: neighbours per query.
        normalize: L2-normalise rows (cosine similarity).
        max_rows: sample this many rows of each side above it (None: all).
        seed: seed of the samples.
    """
    if k < 1:
        raise ValueError(f"k: expected a positive number of neighbours, got {k}")
    qm = as_matrix(queries, "queries", min_rows=1)
    gm = as_matrix(gallery, "gallery", min_rows=k + 1)
    check_same_dim(qm, gm, ("queries", "gallery"))
    q = sample_rows(qm, max_rows, seed, "queries", normalize=normalize)
    g = sample_rows(gm, max_rows, seed + 1, "gallery", normalize=normalize)
    counts = k_occurrence(topk_neighbours(q, g, k=k), g.shape[0])
    return {
        "skewness": skewness(counts),
        "antihub_share": float((counts == 0).double().mean()),
        "max_occurrence": int(counts.max()),
        "k": int(k),
        "n_queries": int(q.shape[0]),
        "n_gallery": int(g.shape[0]),
    }
