"""Revisited Oxford/Paris mAP and mP@k against a plain port of the revisitop evaluation loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modalign.data.benchmarks import RevisitedGroundTruth
from modalign.reproduce.revisited_metrics import (
    revisited_average_precision,
    revisited_metrics,
    revisited_positions,
)


def reference_map(scores: np.ndarray, positives: list[list[int]], junk: list[list[int]],
                  kappas=(1, 5, 10)) -> tuple[float, list[float]]:
    """revisitop's compute_map, written out: full argsort, junk shifts, trapezoidal AP."""
    ranks = np.argsort(-scores, axis=1, kind="stable")  # (Q, G)
    aps, prs = [], []
    for i in range(len(scores)):
        qgnd = np.array(positives[i])
        if len(qgnd) == 0:
            continue
        qjunk = np.array(junk[i], dtype=np.int64)
        pos = np.flatnonzero(np.isin(ranks[i], qgnd))
        jpos = np.flatnonzero(np.isin(ranks[i], qjunk))
        shifted = pos.copy()
        for k, p in enumerate(pos):
            shifted[k] = p - (jpos < p).sum()
        ap = 0.0
        for j, rank in enumerate(shifted):
            p0 = 1.0 if rank == 0 else j / rank
            p1 = (j + 1) / (rank + 1)
            ap += (p0 + p1) / 2 / len(qgnd)
        aps.append(ap)
        one_based = shifted + 1
        prs.append([(one_based <= min(one_based.max(), k)).sum() / min(one_based.max(), k)
                    for k in kappas])
    return float(np.mean(aps)), list(np.mean(prs, axis=0))


def _random_truth(rng, n_queries: int, ids: list[str], empty_hard: bool = False):
    easy, hard, junk = [], [], []
    for _ in range(n_queries):
        perm = rng.permutation(len(ids))
        ne, nj = rng.integers(1, 5), rng.integers(0, 4)
        nh = 0 if empty_hard else rng.integers(0, 4)
        easy.append(tuple(ids[i] for i in perm[:ne]))
        hard.append(tuple(ids[i] for i in perm[ne:ne + nh]))
        junk.append(tuple(ids[i] for i in perm[ne + nh:ne + nh + nj]))
    return RevisitedGroundTruth(tuple(f"q{i}" for i in range(n_queries)), tuple(easy),
                                tuple(hard), tuple(junk))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 22])
def test_matches_revisitop_loop(seed: int, chunk_size: int) -> None:
    rng = np.random.default_rng(seed)
    n_queries, n_gallery, d = 6, 40, 8
    ids = [f"g{j}" for j in range(n_gallery)]
    q = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n_queries, d))), dim=-1)
    g = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n_gallery, d))), dim=-1)
    truth = _random_truth(rng, n_queries, ids)
    got = revisited_metrics(q, g, ids, truth, chunk_size=chunk_size)
    scores = (q @ g.T).numpy()
    index = {s: j for j, s in enumerate(ids)}
    for level in ("easy", "medium", "hard"):
        pos, ign = zip(*truth.relevant_and_ignored(level))
        ref_map, ref_pr = reference_map(scores, [[index[s] for s in p] for p in pos],
                                        [[index[s] for s in x] for x in ign])
        assert got[level]["map"] == pytest.approx(ref_map, abs=1e-12)
        for k, ref in zip((1, 5, 10), ref_pr):
            assert got[level][f"mp@{k}"] == pytest.approx(ref, abs=1e-12)


def test_queries_without_positives_are_left_out() -> None:
    rng = np.random.default_rng(3)
    ids = [f"g{j}" for j in range(10)]
    truth = _random_truth(rng, 3, ids, empty_hard=True)  # no hard positives anywhere
    q = torch.randn(3, 4, dtype=torch.float64)
    got = revisited_metrics(q, torch.randn(10, 4, dtype=torch.float64), ids, truth)
    assert math.isnan(got["hard"]["map"]) and not math.isnan(got["easy"]["map"])


def test_ignored_items_leave_the_ranking() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # the relevant item (3) sits below three others; ignoring two of them lifts it to position 2
    assert revisited_positions(scores, torch.tensor([3]), torch.tensor([0, 2])).tolist() == [2]
    assert revisited_positions(scores, torch.tensor([3, 1]), torch.tensor([], dtype=torch.long)
                               ).tolist() == [2, 4]


def test_ties_rank_the_irrelevant_item_first() -> None:
    scores = torch.tensor([0.5, 0.5, 0.1])
    for relevant in (0, 1):
        assert revisited_positions(scores, torch.tensor([relevant]),
                                   torch.tensor([], dtype=torch.long)).tolist() == [2]
    # tied relevant items take consecutive positions
    assert revisited_positions(scores, torch.tensor([0, 1]), torch.tensor([2])).tolist() == [1, 2]


def test_ap_extremes() -> None:
    assert revisited_average_precision(torch.arange(1, 6)) == 1.0
    # one relevant item at position p: (0 + 1/p) / 2 for p > 1
    assert revisited_average_precision(torch.tensor([4])) == pytest.approx(0.125)


def test_bad_inputs() -> None:
    truth = RevisitedGroundTruth(("q",), (("a",),), ((),), ((),))
    with pytest.raises(ValueError, match="queries"):
        revisited_metrics(torch.zeros(2, 3), torch.zeros(1, 3), ["a"], truth)
    with pytest.raises(ValueError, match="not in the gallery"):
        revisited_metrics(torch.zeros(1, 3), torch.zeros(1, 3), ["b"], truth)
