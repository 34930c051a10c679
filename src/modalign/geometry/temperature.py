"""Temperature health of a trained model: logit scale, clamping, similarity margins.

* ``logit_scale``: the multiplier of cosine similarities (1/temperature).
* ``clamped_share``: the share of logged training steps whose logit scale sits at the upper
  clamp (``max_scale``, 100 by default, i.e. ``log_logit_scale = log 100``), within ``rtol``.
  A large share means the temperature wanted to go lower and was capped for most of training.
* Similarity margins of paired rows (cosine, normalised rows):
  ``mean_positive = mean_i cos(x_i, y_i)`` and ``mean_negative = mean_{i != j} cos(x_i, y_j)``
  (exact, streamed), ``margin`` their difference (and ``scaled_margin = logit_scale * margin``,
  the logit gap the softmax sees); on a seeded sample of pairs, ``hardest_margin`` is the mean
  over anchors of ``cos(x_i, y_i) - max_{j != i} cos(x_i, y_j)`` and ``positive_margin_share``
  the share of anchors whose positive beats every negative (the x -> y recall@1 on that sample).

Examples:
    >>> clamped_share([14.3, 60.0, 100.0, 100.0])
    0.5
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from modalign.geometry.cone import PairedSums, paired_sums
from modalign.geometry.inputs import (
    ArrayLike,
    as_matrix,
    check_paired,
    sample_indices,
    take_rows,
)
from modalign.io import read_jsonl

__all__ = ["clamped_share", "logit_scale_history", "similarity_margins", "temperature_health"]

DEFAULT_MAX_SCALE = 100.0
DEFAULT_MAX_ROWS = 10000


def clamped_share(scales: Sequence[float], *, max_scale: float = DEFAULT_MAX_SCALE,
                  rtol: float = 1e-4) -> float:
    """Share of ``scales`` at the clamp ``max_scale`` (relative tolerance ``rtol``)."""
    if len(scales) == 0:
        raise ValueError("scales: expected at least one logged logit scale")
    if max_scale <= 0:
        raise ValueError(f"max_scale: expected a positive scale, got {max_scale}")
    return sum(s >= max_scale * (1 - rtol) for s in scales) / len(scales)


def logit_scale_history(log_path: str | os.PathLike[str]) -> list[float]:
    """Logit scales per logged step from a training ``log.jsonl``.

    Reads ``logit_scale`` (a number) or the first value of ``logit_scales`` (a mapping) per row.
    """
    out: list[float] = []
    for row in read_jsonl(log_path):
        if isinstance(row.get("logit_scale"), (int, float)):
            out.append(float(row["logit_scale"]))
        elif isinstance(row.get("logit_scales"), dict) and row["logit_scales"]:
            out.append(float(next(iter(row["logit_scales"].values()))))
    return out


def similarity_margins(x: ArrayLike, y: ArrayLike, *, max_rows: int | None = DEFAULT_MAX_ROWS,
                       seed: int = 0, sums: PairedSums | None = None) -> dict[str, Any]:
    """Positive/negative cosine means (exact) and hardest-negative margins (on a seeded sample).

    ``sums``: the :func:`~modalign.geometry.cone.paired_sums` of ``x, y`` if already computed.
    """
    xm, ym = as_matrix(x, "x", min_rows=2), as_matrix(y, "y", min_rows=2)
    check_paired(xm, ym)
    sums = sums or paired_sums(xm, ym)
    pos, neg = sums.mean_positive, sums.mean_negative
    idx = sample_indices(xm.shape[0], max_rows, seed)
    xs = take_rows(xm, idx, "x", normalize=True)
    ys = take_rows(ym, idx, "y", normalize=True)
    hardest = torch.empty(len(idx), dtype=torch.float64)
    positive = (xs * ys).sum(1).double()
    for s in range(0, len(idx), 2048):
        sims = xs[s:s + 2048] @ ys.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + s] = -torch.inf
        hardest[s:s + 2048] = sims.max(dim=1).values.double()
    gap = positive - hardest
    return {"mean_positive": pos, "mean_negative": neg, "margin": pos - neg,
            "hardest_margin": float(gap.mean()),
            "positive_margin_share": float((gap > 0).double().mean()),
            "n_pairs_sampled": len(idx)}


def temperature_health(x: ArrayLike, y: ArrayLike, *, logit_scale: float | None = None,
                       history: Sequence[float] | None = None,
                       max_scale: float = DEFAULT_MAX_SCALE,
                       max_rows: int | None = DEFAULT_MAX_ROWS, seed: int = 0,
                       sums: PairedSums | None = None) -> dict[str, Any]:
    """Margins of paired ``x, y`` plus the logit scale and clamp share when they are known."""
    if logit_scale is not None and not (logit_scale > 0 and math.isfinite(logit_scale)):
        raise ValueError(f"logit_scale: expected a positive finite scale, got {logit_scale}")
    out = similarity_margins(x, y, max_rows=max_rows, seed=seed, sums=sums)
    out["logit_scale"] = logit_scale
    out["scaled_margin"] = None if logit_scale is None else logit_scale * out["margin"]
    out["clamped_share"] = None if not history else clamped_share(history, max_scale=max_scale)
    out["logged_steps"] = 0 if not history else len(history)
    return out
