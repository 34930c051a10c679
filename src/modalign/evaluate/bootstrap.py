"""Bootstrap confidence intervals over queries, and paired bootstrap for differences.

Every metric of a record is a mean over queries (or, for ``mean_per_class_recall``, a mean over
classes of per-class means). Resampling the queries with replacement ``samples`` times and taking
the 2.5 and 97.5 percentiles of the resampled statistic gives a 95% percentile interval: how much
the number would move on another draw of queries of the same kind. The paired version resamples the
*same* queries for two settings (native vs inverted queries, native vs a bridge) and reports the
interval of the difference, so ``+0.003`` can be told apart from noise: an interval that contains
0 means the data cannot tell the two apart.

Queries without a value (NaN: no relevant item) are left out, as in the means. Resamples are drawn
from ``numpy.random.default_rng(seed)``, so intervals are reproducible.

Examples:
    >>> import numpy as np
    >>> values = {"recall@1": QueryValues(np.array([1.0, 0.0, 1.0, 1.0]))}
    >>> lo, hi = bootstrap_intervals(values, samples=200, seed=0)["recall@1"]
    >>> 0.0 <= lo <= 0.75 <= hi <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from modalign.errors import ModalignError

DEFAULT_SAMPLES = 1000
DEFAULT_LEVEL = 0.95
_BLOCK_ENTRIES = 1 << 22  # resampled indices held at once


@dataclass(frozen=True)
class QueryValues:
    """One metric's per-query values, and how they are averaged.

    Attributes:
        values: ``(n,)`` float values, NaN where the query does not count.
        classes: ``(n,)`` int class of each query when the metric is the mean over classes of
            per-class means (``mean_per_class_recall``); ``None`` for a plain mean.
    """

    values: np.ndarray
    classes: np.ndarray | None = None

    def statistic(self) -> float:
        """The metric itself, from the values (NaN entries left out)."""
        valid = _valid(self, None)
        idx = np.arange(len(valid.values))[None, :]
        return float(_resampled(valid, idx)[0])


def bootstrap_intervals(per_query: Mapping[str, QueryValues], *, samples: int = DEFAULT_SAMPLES,
                        seed: int = 0, level: float = DEFAULT_LEVEL
                        ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric, resampling its queries.

    Metrics over the same queries share their resamples (the same seed and count).

    Examples:
        >>> import numpy as np
        >>> iv = bootstrap_intervals({"m": QueryValues(np.ones(5))}, samples=50)
        >>> iv["m"]
        (1.0, 1.0)
    """
    _check(samples, level)
    out = {}
    for name, qv in per_query.items():
        qv = _valid(qv, None)
        if len(qv.values) == 0:
            continue
        stats = np.concatenate([_resampled(qv, idx) for idx in _indices(len(qv.values),
                                                                          samples, seed)])
        out[name] = _percentiles(stats, level)
    return out


def paired_bootstrap(treated: Mapping[str, QueryValues], baseline: Mapping[str, QueryValues],
                     *, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                     level: float = DEFAULT_LEVEL) -> dict[str, dict[str, Any]]:
    """Difference ``treated - baseline`` of each shared metric, with its paired interval.

    Both settings must hold the same queries in the same order; each resample draws one set of
    queries and evaluates both settings on it.

    Returns:
        metric -> ``{"difference": d, "interval": [lo, hi], "queries": n}``.

    Examples:
        >>> import numpy as np
        >>> a = {"m": QueryValues(np.array([1.0, 1.0, 0.0, 1.0]))}
        >>> b = {"m": QueryValues(np.array([1.0, 0.0, 0.0, 1.0]))}
        >>> paired_bootstrap(a, b, samples=100)["m"]["difference"]
        0.25
    """
    _check(samples, level)
    out: dict[str, dict[str, Any]] = {}
    for name in treated:
        if name not in baseline:
            continue
        t, b = treated[name], baseline[name]
        if len(t.values) != len(b.values):
            raise ModalignError(f"paired bootstrap of {name!r}: the two settings have "
                                f"{len(t.values)} and {len(b.values)} queries; expected the "
                                "same queries")
        both = ~(np.isnan(t.values) | np.isnan(b.values))
        t, b = _valid(t, both), _valid(b, both)
        if len(t.values) == 0:
            continue
        diffs = np.concatenate([_resampled(t, idx) - _resampled(b, idx)
                                for idx in _indices(len(t.values), samples, seed)])
        lo, hi = _percentiles(diffs, level)
        out[name] = {"difference": t.statistic() - b.statistic(), "interval": [lo, hi],
                     "queries": len(t.values)}
    return out


def _check(samples: int, level: float) -> None:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ModalignError(f"--bootstrap {samples!r}: expected a positive number of resamples "
                            "(0 turns intervals off)")
    if not 0.0 < level < 1.0:
        raise ModalignError(f"level={level!r}: expected a confidence level in (0, 1)")


def _valid(qv: QueryValues, keep: np.ndarray | None) -> QueryValues:
    values = np.asarray(qv.values, dtype=np.float64)
    keep = ~np.isnan(values) if keep is None else keep
    classes = None if qv.classes is None else np.asarray(qv.classes)[keep]
    return QueryValues(values[keep], classes)


def _indices(n: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ENTRIES // max(n, 1))
    for start in range(0, samples, block):
        yield rng.integers(0, n, size=(min(block, samples - start), n))


def _resampled(qv: QueryValues, idx: np.ndarray) -> np.ndarray:
    """The statistic on each row of resampled query indices ``idx`` (``(B, n)``)."""
    values = qv.values[idx]
    if qv.classes is None:
        return values.mean(axis=1)
    _, cls = np.unique(qv.classes, return_inverse=True)
    c = int(cls.max()) + 1
    flat = (cls[idx] + c * np.arange(len(idx))[:, None]).ravel()
    sums = np.bincount(flat, weights=values.ravel(), minlength=c * len(idx)).reshape(-1, c)
    counts = np.bincount(flat, minlength=c * len(idx)).reshape(-1, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = sums / counts
    return np.nanmean(per_class, axis=1)


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return float(lo), float(hi)
