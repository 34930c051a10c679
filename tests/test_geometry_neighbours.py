"""k-NN search, hubness, intra/inter agreement and similarity margins against obvious loops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modalign.geometry.agreement import neighbour_agreement
from modalign.geometry.hubness import hubness, skewness
from modalign.geometry.knn import topk_neighbours
from modalign.geometry.temperature import (
    clamped_share,
    logit_scale_history,
    similarity_margins,
    temperature_health,
)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _rand(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def naive_knn(q: np.ndarray, g: np.ndarray, k: int, exclude_diagonal: bool) -> list[list[int]]:
    out = []
    for i in range(len(q)):
        scores = [(float(q[i] @ g[j]), j) for j in range(len(g))
                  if not (exclude_diagonal and i == j)]
        scores.sort(key=lambda s: -s[0])
        out.append([j for _, j in scores[:k]])
    return out


@pytest.mark.parametrize("query_block,gallery_block", [(1, 1), (3, 5), (64, 7), (1024, 16384)])
@pytest.mark.parametrize("exclude", [False, True])
def test_topk_equals_loop(query_block, gallery_block, exclude):
    q, g = _rand(19, 4, 0), _rand(23, 4, 1)
    if exclude:
        q = g[:19]
    got = topk_neighbours(torch.as_tensor(q), torch.as_tensor(g), k=4, exclude_diagonal=exclude,
                          query_block=query_block, gallery_block=gallery_block)
    assert got.tolist() == naive_knn(q, g, 4, exclude)


def naive_hubness(q: np.ndarray, g: np.ndarray, k: int) -> tuple[float, float]:
    nn = naive_knn(_unit(q), _unit(g), k, False)
    counts = np.zeros(len(g))
    for row in nn:
        for j in row:
            counts[j] += 1
    c = counts - counts.mean()
    return float((c**3).mean() / (c**2).mean() ** 1.5), float((counts == 0).mean())


def test_hubness_equals_loop_and_mean_occurrence():
    q, g = _rand(40, 5, 2), _rand(30, 5, 3)
    h = hubness(q, g, k=3)
    skew, anti = naive_hubness(q, g, 3)
    assert h["skewness"] == pytest.approx(skew, rel=1e-9)
    assert h["antihub_share"] == pytest.approx(anti)
    assert h["n_queries"] == 40 and h["n_gallery"] == 30


def test_hubness_detects_a_hub():
    g = _rand(50, 8, 5)
    g[0] = 1.0  # a point at the centre of the query cloud: the nearest item for most queries
    q = _rand(200, 8, 6) * 0.3 + 1.0
    h = hubness(q, g, k=1)
    assert h["max_occurrence"] > 50 and h["antihub_share"] > 0.5 and h["skewness"] > 2


def test_skewness_closed_form_and_sampling():
    assert skewness(torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(0.7071067811865476)
    h = hubness(_rand(300, 4, 7), _rand(300, 4, 8), k=5, max_rows=100, seed=1)
    assert h["n_queries"] == 100 and h["n_gallery"] == 100


def naive_agreement(x: np.ndarray, y: np.ndarray, k: int) -> float:
    ux, uy = _unit(x), _unit(y)
    total = 0.0
    for i in range(len(ux)):
        others = [j for j in range(len(ux)) if j != i]
        intra = sorted(others, key=lambda j: -float(ux[i] @ ux[j]))[:k]
        inter = sorted(others, key=lambda j: -float(uy[i] @ ux[j]))[:k]
        total += len(set(intra) & set(inter)) / k
    return total / len(ux)


def test_agreement_equals_loop():
    x = _rand(30, 6, 9)
    y = x + 0.8 * _rand(30, 6, 10)
    r = neighbour_agreement(x, y, k=4)
    assert r["agreement_x"] == pytest.approx(naive_agreement(x, y, 4), abs=1e-12)
    assert r["agreement_y"] == pytest.approx(naive_agreement(y, x, 4), abs=1e-12)
    assert r["chance"] == pytest.approx(4 / 29)


def test_agreement_closed_forms_and_invariance():
    x = _rand(60, 8, 11)
    assert neighbour_agreement(x, x, k=5)["agreement_x"] == 1.0
    q, _ = np.linalg.qr(_rand(8, 8, 12))
    y = _rand(60, 8, 13)
    base = neighbour_agreement(x, y, k=5)
    perm = np.random.default_rng(14).permutation(60)
    moved = neighbour_agreement(x[perm] @ q, y[perm] @ q, k=5)
    assert moved["agreement_x"] == pytest.approx(base["agreement_x"], abs=1e-12)
    # unrelated pairs: close to chance
    far = [neighbour_agreement(_rand(200, 8, s), _rand(200, 8, s + 50), k=10)["agreement_x"]
           for s in range(3)]
    assert np.mean(far) < 3 * 10 / 199


def test_margins_equal_loop():
    x, y = _rand(25, 4, 15), _rand(25, 4, 16)
    y[:10] = x[:10] + 0.01
    ux, uy = _unit(x), _unit(y)
    s = ux @ uy.T
    off = ~np.eye(25, dtype=bool)
    hardest = np.where(off, s, -np.inf).max(1)
    r = similarity_margins(x, y)
    assert r["mean_positive"] == pytest.approx(np.diag(s).mean(), rel=1e-12)
    assert r["mean_negative"] == pytest.approx(s[off].mean(), rel=1e-12)
    assert r["hardest_margin"] == pytest.approx((np.diag(s) - hardest).mean(), rel=1e-6)
    assert r["positive_margin_share"] == pytest.approx((np.diag(s) > hardest).mean())


def test_temperature_health_and_clamp_share(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "logit_scales": {"clip": 14.3}}, {"step": 2, "logit_scales": {"clip": 100.0}},
        {"step": 3, "logit_scale": 99.99999}, {"step": 4}]) + "\n")
    hist = logit_scale_history(log)
    assert hist == [14.3, 100.0, 99.99999]
    assert clamped_share(hist) == pytest.approx(2 / 3)
    x = _rand(10, 3, 17)
    r = temperature_health(x, x, logit_scale=50.0, history=hist)
    assert r["scaled_margin"] == pytest.approx(50.0 * r["margin"])
    assert r["clamped_share"] == pytest.approx(2 / 3) and r["logged_steps"] == 3
    with pytest.raises(ValueError, match="logit_scale"):
        temperature_health(x, x, logit_scale=-1.0)
    with pytest.raises(ValueError, match="scales"):
        clamped_share([])


def test_neighbour_metrics_bad_input():
    with pytest.raises(ValueError, match="k: expected 1 <= k"):
        topk_neighbours(torch.ones(2, 2), torch.ones(3, 2), k=3, exclude_diagonal=True)
    with pytest.raises(ValueError, match="at least 12 rows"):
        neighbour_agreement(np.ones((5, 3)), np.ones((5, 3)), k=10)
    with pytest.raises(ValueError, match="gallery: needs at least 11 rows"):
        hubness(np.ones((5, 3)), np.ones((5, 3)), k=10)
    bad = _rand(20, 3, 18)
    bad[2, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        hubness(bad, _rand(20, 3, 19), k=3)
