"""Bootstrap intervals and paired differences == a plain Python loop over the same resamples."""

from __future__ import annotations

import numpy as np
import pytest

from modalign.errors import ModalignError
from modalign.evaluate.bootstrap import QueryValues, bootstrap_intervals, paired_bootstrap


def naive_resamples(n, samples, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(samples, n))


def naive_class_mean(values, classes, rows):
    per_class = {}
    for r in rows:
        per_class.setdefault(classes[r], []).append(values[r])
    return float(np.mean([np.mean(v) for v in per_class.values()]))


def percentile_pair(stats):
    return tuple(float(x) for x in np.percentile(stats, [2.5, 97.5]))


def test_intervals_match_a_naive_loop_for_means_and_class_means():
    gen = np.random.default_rng(3)
    values = gen.random(37)
    values[[4, 9]] = np.nan  # queries without positives: left out
    classes = gen.integers(0, 5, size=37)
    valid = ~np.isnan(values)
    v, c = values[valid], classes[valid]
    got = bootstrap_intervals({"m": QueryValues(values),
                               "pc": QueryValues(values, classes)}, samples=300, seed=11)
    idx = naive_resamples(len(v), 300, 11)
    want_mean = percentile_pair([v[row].mean() for row in idx])
    want_class = percentile_pair([naive_class_mean(v, c, row) for row in idx])
    assert got["m"] == pytest.approx(want_mean, abs=1e-12)
    assert got["pc"] == pytest.approx(want_class, abs=1e-12)
    assert QueryValues(values, classes).statistic() == pytest.approx(
        naive_class_mean(v, c, range(len(v))))


def test_paired_difference_matches_a_naive_loop_and_detects_a_real_change():
    gen = np.random.default_rng(0)
    base = (gen.random(200) < 0.5).astype(float)
    better = base.copy()
    better[gen.choice(np.flatnonzero(base == 0), size=30, replace=False)] = 1.0
    out = paired_bootstrap({"r": QueryValues(better)}, {"r": QueryValues(base)}, samples=400,
                           seed=5)["r"]
    idx = naive_resamples(200, 400, 5)
    want = percentile_pair([better[row].mean() - base[row].mean() for row in idx])
    assert out["difference"] == pytest.approx(0.15)
    assert tuple(out["interval"]) == pytest.approx(want, abs=1e-12)
    assert out["interval"][0] > 0  # 30 of 200 queries fixed, none broken: clearly positive
    same = paired_bootstrap({"r": QueryValues(base)}, {"r": QueryValues(base)}, samples=50)
    assert same["r"]["interval"] == [0.0, 0.0]


def test_intervals_are_seeded_and_cover_the_estimate():
    values = {"m": QueryValues(np.random.default_rng(1).random(50))}
    a = bootstrap_intervals(values, samples=200, seed=4)
    assert a == bootstrap_intervals(values, samples=200, seed=4)
    assert a != bootstrap_intervals(values, samples=200, seed=5)
    lo, hi = a["m"]
    assert lo < values["m"].statistic() < hi


def test_bad_arguments_are_user_errors():
    with pytest.raises(ModalignError, match="--bootstrap"):
        bootstrap_intervals({"m": QueryValues(np.ones(3))}, samples=0)
    with pytest.raises(ModalignError, match="same queries"):
        paired_bootstrap({"m": QueryValues(np.ones(3))}, {"m": QueryValues(np.ones(4))})
