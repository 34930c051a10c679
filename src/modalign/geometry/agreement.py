"""Intra- vs inter-modal agreement: do both modalities of a pair see the same neighbours?

Rows are paired: ``x_i`` and ``y_i`` describe the same thing (an image and its caption). For an
anchor ``i`` and a modality, say x, compare two neighbour lists among the other x rows:

* intra-modal: the k rows ``x_j`` (j != i) most similar to ``x_i``  (image-to-image search);
* inter-modal: the k rows ``x_j`` (j != i) most similar to ``y_i``  (the caption searching images).

``agreement_x = mean_i |N_intra(i) ∩ N_inter(i)| / k``. 1 means the intra-modal neighbourhoods of
x are exactly what the other modality retrieves; chance level is ``k / (n - 1)``. A low value is the
"intra-modal misalignment" behind poor image-to-image retrieval with CLIP-like models: contrastive
training only shapes cross-modal similarities. ``agreement_y`` swaps the roles. Cosine similarity
on normalised rows, exact chunked search; above ``max_rows`` pairs a seeded sample of pairs (rows
kept together) is both the anchor set and the searched set.

Examples:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 8))
    >>> neighbour_agreement(x, x, k=5)["agreement_x"]
    1.0
"""

from __future__ import annotations

from typing import Any

import torch

from modalign.geometry.inputs import (
    ArrayLike,
    as_matrix,
    check_paired,
    sample_indices,
    take_rows,
)
from modalign.geometry.knn import topk_neighbours

__all__ = ["neighbour_agreement", "neighbour_overlap"]

DEFAULT_MAX_ROWS = 10000


def neighbour_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, the share of the k indices of ``a`` (n, k) that also appear in ``b`` (n, k)."""
    hits = (a[:, :, None] == b[:, None, :]).any(dim=2)
    return hits.double().mean(dim=1)


def neighbour_agreement(x: ArrayLike, y: ArrayLike, *, k: int = 10, normalize: bool = True,
                        max_rows: int | None = DEFAULT_MAX_ROWS, seed: int = 0
                        ) -> dict[str, Any]:
    """Overlap of intra-modal and inter-modal k-NN lists, for each modality of a paired set.

    Returns ``agreement_x``, ``agreement_y``, ``chance`` (= k / (n - 1)), ``k`` and ``n_pairs``.
    """
    if k < 1:
        raise ValueError(f"k: expected a positive number of neighbours, got {k}")
    xm, ym = as_matrix(x, "x", min_rows=k + 2), as_matrix(y, "y", min_rows=k + 2)
    check_paired(xm, ym)
    idx = sample_indices(xm.shape[0], max_rows, seed)
    xs = take_rows(xm, idx, "x", normalize=normalize)
    ys = take_rows(ym, idx, "y", normalize=normalize)
    n = xs.shape[0]
    out: dict[str, Any] = {}
    for name, own, other in (("agreement_x", xs, ys), ("agreement_y", ys, xs)):
        intra = topk_neighbours(own, own, k=k, exclude_diagonal=True)
        inter = topk_neighbours(other, own, k=k, exclude_diagonal=True)
        out[name] = float(neighbour_overlap(intra, inter).mean())
    out.update({"chance": k / (n - 1), "k": int(k), "n_pairs": int(n)})
    return out
