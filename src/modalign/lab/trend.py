"""Testing "the benefit of inversion grows with the gap" across the settings of a sweep.

Per setting, the gap and the inversion benefit (``delta_map``: inverted minus native mAP) are
averaged over seeds. Across settings the statistic is Spearman's rank correlation ``rho`` between
the two; the one-sided p-value is the share of random pairings (permutations of the benefits) whose
``rho`` is at least the observed one (with the observed pairing counted, so ``p >= 1/(P+1)``); the
95% interval resamples settings with replacement (percentile bootstrap). The slope of an ordinary
least-squares line gives the size: the change in ``delta_map`` per unit of gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks ``1..n`` with ties given their average rank.

    Examples:
        >>> rank(np.array([3.0, 1.0, 3.0])).tolist()
        [2.5, 1.0, 2.5]
    """
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each tie block
    return ((last - counts + 1 + last) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (NaN when one side is constant).

    Examples:
        >>> spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0]))
        0.5
    """
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


@dataclass(frozen=True)
class TrendTest:
    """The outcome of the trend test (see the module docstring).

    Attributes:
        n: settings compared.
        rho: Spearman's rank correlation of gap and benefit.
        p_value: one-sided permutation p-value of ``rho > 0``.
        ci_low, ci_high: 95% percentile-bootstrap interval of ``rho``.
        slope: least-squares change of the benefit per unit of gap.
        gap_range, benefit_at_ends: the smallest and largest mean gap, and the benefit there.
    """

    n: int
    rho: float
    p_value: float
    ci_low: float
    ci_high: float
    slope: float
    gap_range: tuple[float, float]
    benefit_at_ends: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def held(self) -> bool:
        """Whether the claim held: a positive rank correlation with ``p < 0.05``."""
        return bool(self.rho > 0 and self.p_value < 0.05)


def trend_test(gaps: Sequence[float], benefits: Sequence[float], *, permutations: int = 10000,
               bootstrap: int = 2000, seed: int = 0) -> TrendTest:
    """Test whether ``benefits`` increase with ``gaps`` (one value per setting).

    Examples:
        >>> t = trend_test([0.1, 0.3, 0.5, 0.7, 0.9], [-0.2, -0.1, 0.0, 0.05, 0.1],
        ...                permutations=2000, bootstrap=200)
        >>> t.rho, t.p_value < 0.05
        (1.0, True)
    """
    x = np.asarray(gaps, dtype=np.float64)
    y = np.asarray(benefits, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"gaps and benefits: expected two 1-d sequences of one length, got "
                         f"{x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"gaps: expected at least 3 settings to test a trend, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("gaps and benefits: expected finite values")
    if permutations < 1 or bootstrap < 1:
        raise ValueError(f"permutations and bootstrap must be >= 1, got {permutations}, "
                         f"{bootstrap}")
    rng = np.random.default_rng(seed)
    rho = spearman(x, y)
    # a permutation of the benefits permutes their ranks: rho of each pairing in one product
    rx, ry = rank(x) - (len(x) + 1) / 2, rank(y) - (len(y) + 1) / 2
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    shuffled = rng.permuted(np.tile(ry, (permutations, 1)), axis=1)
    perm = shuffled @ rx / denom if denom > 0 else np.full(permutations, np.nan)
    p = (1 + np.sum(np.nan_to_num(perm, nan=-np.inf) >= rho - 1e-12)) / (permutations + 1)
    boot = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(x), len(x))
        r = spearman(x[idx], y[idx])
        if np.isfinite(r):
            boot.append(r)
    lo, hi = (np.percentile(boot, [2.5, 97.5]) if boot else (np.nan, np.nan))
    slope = float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else float("nan")
    lo_i, hi_i = int(np.argmin(x)), int(np.argmax(x))
    return TrendTest(len(x), rho, float(p), float(lo), float(hi), slope,
                     (float(x[lo_i]), float(x[hi_i])), (float(y[lo_i]), float(y[hi_i])))


def verdict(test: TrendTest | None, n_settings: int) -> str:
    """The report's sentence on the claim, written from the numbers of ``test``.

    Examples:
        >>> verdict(None, 2)
        'Not tested: 2 setting(s); the trend needs at least 3.'
    """
    if test is None:
        return f"Not tested: {n_settings} setting(s); the trend needs at least 3."
    size = (f"mean delta mAP goes from {test.benefit_at_ends[0]:+.3f} at the smallest gap "
            f"({test.gap_range[0]:.2f}) to {test.benefit_at_ends[1]:+.3f} at the largest "
            f"({test.gap_range[1]:.2f}), a least-squares slope of {test.slope:+.3f} per unit of "
            "gap")
    stats = (f"Spearman rho = {test.rho:+.2f} over {test.n} settings (95% bootstrap interval "
             f"[{test.ci_low:+.2f}, {test.ci_high:+.2f}], one-sided permutation p = "
             f"{test.p_value:.3g})")
    if test.held:
        head = "The claim held here: the benefit of inversion grows with the gap"
    elif test.rho > 0:
        head = ("The claim is not supported here: the benefit of inversion rises with the gap "
                "but not significantly")
    else:
        head = "The claim did not hold here: the benefit of inversion does not grow with the gap"
    return f"{head}; {stats}; {size}."
