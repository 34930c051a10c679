"""mAP and mP@k of the revisited Oxford/Paris protocol, memory-bounded.

For each query the ignored items (junk, and the other difficulty's positives) leave the ranking;
the 1-based positions ``p_1 < ... < p_R`` of the relevant items in what remains give

    AP = (1/R) sum_j [ (prec_before_j + prec_at_j) / 2 ],  prec_before_j = (j-1)/(p_j-1) (1 if
    p_j = 1), prec_at_j = j/p_j   (the trapezoidal AP of the revisitop code)

    mP@k = #{j: p_j <= k'} / k',  k' = min(k, p_R)   (as revisitop computes it)

Queries without a relevant item are left out of the means. Scores are dot products (cosine for
normalised inputs) computed for a few queries at a time, so the query x gallery matrix is never
held in memory; the per-query counting runs in numpy on the CPU. Ties: an irrelevant item
scoring exactly like a relevant one ranks before it (the pessimistic convention of
:mod:`modalign.evaluate.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from modalign.data.benchmarks.base import RevisitedGroundTruth

LEVELS: tuple[str, ...] = ("easy", "medium", "hard")
KAPPAS: tuple[int, ...] = (1, 5, 10)
DEFAULT_CHUNK_SIZE = 1 << 22


def revisited_average_precision(positions: Tensor) -> float:
    """The revisitop trapezoidal AP from sorted 1-based positions of all ``R`` relevant items.

    Examples:
        >>> revisited_average_precision(torch.tensor([1, 2]))
        1.0
        >>> revisited_average_precision(torch.tensor([2]))  # (0/1 + 1/2) / 2
        0.25
    """
    if positions.numel() == 0:
        return math.nan
    r = positions.to(torch.float64) - 1.0  # 0-based rank
    j = torch.arange(len(r), dtype=torch.float64)
    before = torch.where(r == 0, torch.ones_like(r), j / r.clamp(min=1.0))
    at = (j + 1.0) / (r + 1.0)
    return float(((before + at) / 2.0).sum() / len(r))


def revisited_precision_at(positions: Tensor, k: int) -> float:
    """mP@k as revisitop computes it: cut-off ``min(k, last relevant position)``.

    Examples:
        >>> revisited_precision_at(torch.tensor([1, 3]), 5)
        0.6666666666666666
    """
    if positions.numel() == 0:
        return math.nan
    kq = min(int(positions.max()), k)
    return float((positions <= kq).sum()) / kq


def revisited_positions(scores: Tensor | np.ndarray, relevant: Tensor | np.ndarray,
                        ignored: Tensor | np.ndarray, *,
                        ascending: np.ndarray | None = None) -> Tensor:
    """Sorted 1-based positions of ``relevant`` gallery indices once ``ignored`` leave the ranking.

    The ``k``-th relevant item (by descending score ``s_k``) sits at
    ``k + #{all >= s_k} - #{ignored >= s_k} - #{relevant >= s_k}``: itself and the relevant items
    above it, plus every kept irrelevant item scoring at least as high.

    Args:
        scores: ``(G,)`` scores of one query against the gallery.
        relevant: indices of the relevant items.
        ignored: indices removed from the ranking (disjoint from ``relevant``).
        ascending: ``np.sort(scores)``, when the caller already has it (one sort serves the
            three difficulty levels).

    Examples:
        >>> revisited_positions(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([2]), torch.tensor([0]))
        tensor([2])
    """
    s = _numpy(scores)
    ascending = np.sort(s) if ascending is None else ascending
    rel = np.sort(s[_numpy(relevant)])[::-1]
    ign = np.sort(s[_numpy(ignored)])

    def at_least(sorted_values: np.ndarray) -> np.ndarray:
        return len(sorted_values) - np.searchsorted(sorted_values, rel, side="left")

    k = np.arange(1, len(rel) + 1)
    return torch.from_numpy(k + at_least(ascending) - at_least(ign) - at_least(rel[::-1]))


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def revisited_metrics(queries: Tensor, gallery: Tensor, gallery_ids: Sequence[str],
                      truth: RevisitedGroundTruth, *, kappas: Sequence[int] = KAPPAS,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, dict[str, float]]:
    """mAP and mP@k per difficulty level (``easy``, ``medium``, ``hard``).

    Args:
        queries: ``(Q, d)``, row ``i`` is query ``truth.queries[i]``.
        gallery: ``(G, d)``; its row ids are ``gallery_ids`` (database and distractor items).
        gallery_ids: the item id of each gallery row.
        truth: the per-query easy/hard/junk gallery ids.
        kappas: the cut-offs of mP@k.
        chunk_size: scores held in memory at once.

    Returns:
        ``{level: {"map": ..., "mp@1": ..., ...}}`` with values in [0, 1].

    Examples:
        >>> gt = RevisitedGroundTruth(("q",), (("a",),), (("b",),), ((),))
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        >>> m = revisited_metrics(torch.tensor([[1.0, 0.0]]), g, ["a", "b", "c"], gt)
        >>> m["easy"]["map"], m["hard"]["map"]
        (1.0, 0.25)
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)}: "
                         "expected (Q, d) and (G, d)")
    if len(queries) != len(truth.queries):
        raise ValueError(f"queries: {len(queries)} rows for {len(truth.queries)} ground-truth "
                         "queries")
    if len(gallery_ids) != len(gallery):
        raise ValueError(f"gallery_ids: {len(gallery_ids)} ids for {len(gallery)} gallery rows")
    index = {gid: j for j, gid in enumerate(gallery_ids)}

    def idx(ids: set[str]) -> Tensor:
        missing = [i for i in ids if i not in index]
        if missing:
            raise ValueError(f"gallery_ids: ground-truth item {missing[0]!r} is not in the gallery")
        return torch.tensor(sorted(index[i] for i in ids), dtype=torch.long)

    per_level = {lv: [(idx(r), idx(ign)) for r, ign in truth.relevant_and_ignored(lv)]
                 for lv in LEVELS}
    names = ["map", *(f"mp@{k}" for k in kappas)]
    sums: dict[str, dict[str, list[float]]] = {lv: {n: [] for n in names} for lv in LEVELS}
    block = max(1, chunk_size // max(len(gallery), 1))
    for start in range(0, len(queries), block):
        scores = (queries[start:start + block] @ gallery.T).cpu().numpy()
        for i, row in enumerate(scores):
            q = start + i
            ascending = np.sort(row)
            for lv in LEVELS:
                relevant, ignored = per_level[lv][q]
                if len(relevant) == 0:
                    continue
                pos = revisited_positions(row, relevant, ignored, ascending=ascending)
                sums[lv]["map"].append(revisited_average_precision(pos))
                for k in kappas:
                    sums[lv][f"mp@{k}"].append(revisited_precision_at(pos, k))
    return {lv: {name: (sum(v) / len(v) if v else math.nan) for name, v in d.items()}
            for lv, d in sums.items()}
