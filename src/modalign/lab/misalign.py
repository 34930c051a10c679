"""Intra-modal misalignment, measured directly, and how far an inversion got.

Cross the Gap's mechanism: in a space shaped only by the inter-modal objective, an image may be
placed well relative to the texts but badly relative to other images. Measured here, for the same
intra-modal queries and gallery:

* **native**: the query ranks the gallery by cosine within its own modality;
* **through the other modality**: every gallery item is stood in for by its paired items of the
  other modality (the L2-normalised mean of the joint embeddings of its group's items there), so
  a query image ranks the gallery images by how close it is to their texts;
* the **misalignment** of a query is its average precision through the other modality minus its
  native one (positive: the other modality organises the gallery better for this query), and the
  share of queries whose positives rank better through the other modality.

:func:`bridged_queries` crosses the gap with a learned map instead of an inversion: a
:class:`~modalign.bridge.learned.LearnedBridge` fitted on the bank's pairs (each row of the
query modality with the normalised mean of its group's rows of the other) carries each query
into the other modality, where it ranks the same gallery as the OTI/OVI query would.

:func:`plateau_step` reads an inversion's loss curve: the first step whose mean cosine to the
targets comes within ``tol`` of the best it reached.

Examples:
    >>> import torch
    >>> q = torch.tensor([[1.0, 0.0]])
    >>> reps = through_other(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]),
    ...                      torch.tensor([1, 0]))
    >>> reps.tolist()
    [[0.0, 1.0], [1.0, 0.0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.evaluate.metrics import retrieval_metrics


def through_other(other: Tensor, other_groups: Tensor, gallery_groups: Tensor) -> Tensor:
    """Stand-ins for gallery items: per gallery row, the normalised mean of ``other``'s rows of
    its group (a zero row where the group has none there, so it matches nothing)."""
    if other.ndim != 2 or len(other) != len(other_groups):
        raise ValueError(f"other: expected (n, d) rows with one group id each, got "
                         f"{tuple(other.shape)} and {len(other_groups)} ids")
    ids, inverse = torch.unique(other_groups, return_inverse=True)
    sums = torch.zeros(len(ids), other.shape[1], dtype=other.dtype)
    sums.index_add_(0, inverse, other)
    means = F.normalize(sums, dim=-1)
    pos = torch.searchsorted(ids, gallery_groups).clamp_max(len(ids) - 1)
    found = ids[pos] == gallery_groups
    return torch.where(found[:, None], means[pos], torch.zeros_like(means[pos]))


@dataclass
class Misalignment:
    """Native vs through-the-other-modality ranking of the same intra-modal queries.

    Attributes:
        native_ap, through_ap: ``(Q,)`` per-query average precision.
        native_map, through_map: their means.
        misalignment: ``through_map - native_map``.
        better_through: share of queries whose AP is higher through the other modality (ties
            count one half).
    """

    native_ap: np.ndarray
    through_ap: np.ndarray

    @property
    def native_map(self) -> float:
        return float(np.mean(self.native_ap))

    @property
    def through_map(self) -> float:
        return float(np.mean(self.through_ap))

    @property
    def misalignment(self) -> float:
        return self.through_map - self.native_map

    @property
    def better_through(self) -> float:
        d = self.through_ap - self.native_ap
        return float(np.mean((d > 1e-12) + 0.5 * (np.abs(d) <= 1e-12)))


def measure_misalignment(queries: Tensor, query_groups: Tensor, gallery: Tensor,
                         gallery_groups: Tensor, other: Tensor, other_groups: Tensor, *,
                         exclude: Tensor | None = None) -> Misalignment:
    """Per-query AP of ``queries`` ranking ``gallery`` natively and through ``other``.

    All embeddings are unit rows of one joint space; ``other`` (with ``other_groups``) is the
    other modality's items whose groups stand in for the gallery rows; ``exclude`` removes each
    query's own gallery row (as in :func:`~modalign.evaluate.metrics.self_exclusion`).

    Examples:
        >>> import torch
        >>> g = torch.tensor([0, 1])
        >>> m = measure_misalignment(torch.eye(2), g, torch.eye(2), g, torch.eye(2), g)
        >>> m.native_map, m.through_map, m.better_through
        (1.0, 1.0, 0.5)
    """
    reps = through_other(other, other_groups, gallery_groups)
    native = retrieval_metrics(queries, gallery, query_groups, gallery_groups, k_values=(1,),
                               exclude=exclude)
    through = retrieval_metrics(queries, reps, query_groups, gallery_groups, k_values=(1,),
                                exclude=exclude)
    return Misalignment(native.per_query["map"].numpy().astype(np.float64),
                        through.per_query["map"].numpy().astype(np.float64))


def intra_map(vectors: Tensor, query_rows: np.ndarray, gallery_rows: np.ndarray,
              groups: Tensor, *, exclude: Tensor | None = None) -> float:
    """mAP of ``vectors[query_rows]`` ranking ``vectors[gallery_rows]`` by cosine (any space:
    tower features before a head, or joint embeddings)."""
    unit = F.normalize(vectors.float(), dim=-1)
    res = retrieval_metrics(unit[query_rows], unit[gallery_rows], groups[query_rows],
                            groups[gallery_rows], k_values=(1,), exclude=exclude)
    return float(res.metrics["map"])


def bridged_queries(queries: Tensor, bank_source: Any, bank_target: Any, *,
                    kind: str = "lstsq", seed: int = 0) -> Tensor:
    """``queries`` (unit rows of the source modality) carried into the target modality by a
    learned bridge fitted on the bank: ``bank_source`` and ``bank_target`` are
    :class:`~modalign.embed.store.Embeddings` of one split in the same joint space, paired by
    group (:func:`~modalign.bridge.learned.group_pairs`); returns unit rows.

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> emb = toy_embeddings()
        >>> q = torch.from_numpy(emb["image"].vectors[:3])
        >>> bridged_queries(q, emb["image"], emb["text"]).shape == q.shape
        True
    """
    from modalign.bridge.learned import LearnedBridge, group_pairs

    x, y = group_pairs(bank_source, bank_target)
    bridge = LearnedBridge(kind, "source", "target", seed=seed).fit_pairs(x, y)
    return bridge.map(queries.float())


def plateau_step(loss_curve: Tensor | np.ndarray, tol: float = 0.01) -> int | None:
    """First step (1-based) whose mean cosine ``1 - loss`` is within ``tol`` of the best one.

    Examples:
        >>> plateau_step(np.array([0.9, 0.5, 0.2, 0.15, 0.149]), tol=0.01)
        4
        >>> plateau_step(np.array([]))
    """
    cos = 1.0 - np.asarray(loss_curve, dtype=np.float64)
    if cos.size == 0:
        return None
    return int(np.argmax(cos >= cos.max() - tol)) + 1
