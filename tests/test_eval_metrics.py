"""Retrieval metrics: the chunked rank-counting path against Python loops over full rankings."""

from __future__ import annotations

import math

import pytest
import torch

from modalign.evaluate.metrics import (
    metric_names,
    metrics_from_positions,
    recall_from_topk,
    relevant_positions,
    retrieval_metrics,
    self_exclusion,
)

K_VALUES = (1, 2, 5)


# ---------------------------------------------------------------- naive references (loops)


def naive_positions(scores, relevant, excluded, ties):
    """Positions of the relevant items after a full sort with the documented tie rule."""
    entries = [(s, r) for j, (s, r) in enumerate(zip(scores, relevant)) if j != excluded]
    if ties == "pessimistic":  # irrelevant first among equal scores
        entries.sort(key=lambda e: (-e[0], e[1]))
    else:
        entries.sort(key=lambda e: (-e[0], not e[1]))
    return [i + 1 for i, (_, r) in enumerate(entries) if r]


def naive_metrics(pos, k_values):
    R = len(pos)
    if R == 0:
        return None
    out = {}
    for k in k_values:
        hits = sum(1 for p in pos if p <= k)
        out[f"recall@{k}"] = 1.0 if pos[0] <= k else 0.0
        out[f"true_recall@{k}"] = hits / R
        out[f"precision@{k}"] = hits / k
        dcg = sum(1 / math.log2(1 + p) for p in pos if p <= k)
        idcg = sum(1 / math.log2(1 + i) for i in range(1, min(R, k) + 1))
        out[f"ndcg@{k}"] = dcg / idcg
    out["map"] = sum((i + 1) / p for i, p in enumerate(pos)) / R
    out["map@r"] = sum((i + 1) / p for i, p in enumerate(pos) if p <= R) / R
    out["r_precision"] = sum(1 for p in pos if p <= R) / R
    out["mrr"] = 1 / pos[0]
    return out


def naive_all(queries, gallery, qg, gg, exclude, ties, k_values):
    rows = []
    for i in range(len(queries)):
        scores = [sum(float(a) * float(b) for a, b in zip(queries[i], g)) for g in gallery]
        relevant = [int(qg[i]) == int(x) for x in gg]
        ex = int(exclude[i]) if exclude is not None else -1
        rows.append(naive_metrics(naive_positions(scores, relevant, ex, ties), k_values))
    return rows


def random_case(seed, Q=23, G=41, d=6, groups=9, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(Q, d, generator=gen, dtype=dtype), dim=1)
    g = torch.nn.functional.normalize(torch.randn(G, d, generator=gen, dtype=dtype), dim=1)
    qg = torch.randint(0, groups, (Q,), generator=gen)
    gg = torch.randint(0, groups, (G,), generator=gen)
    return q, g, qg, gg


def tied_case(seed, Q=15, G=30, groups=4):
    """Small integer embeddings: many exact score ties, all exactly representable."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (Q, 3), generator=gen).double()
    g = torch.randint(-1, 2, (G, 3), generator=gen).double()
    return q, g, torch.randint(0, groups, (Q,), generator=gen), torch.randint(
        0, groups, (G,), generator=gen)


def assert_matches(result, reference):
    for i, ref in enumerate(reference):
        for name in metric_names(K_VALUES):
            got = result.per_query[name][i].item()
            if ref is None:
                assert math.isnan(got)
            else:
                assert got == pytest.approx(ref[name], abs=1e-12), (i, name)
    kept = [r for r in reference if r is not None]
    assert result.num_skipped == len(reference) - len(kept)
    for name in metric_names(K_VALUES):
        assert result.metrics[name] == pytest.approx(
            sum(r[name] for r in kept) / len(kept), abs=1e-12)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 41 * 4, 10**6])
def test_random_scores_match_naive_reference(seed, chunk_size):
    q, g, qg, gg = random_case(seed)
    result = retrieval_metrics(q, g, qg, gg, k_values=K_VALUES, chunk_size=chunk_size)
    assert_matches(result, naive_all(q, g, qg, gg, None, "pessimistic", K_VALUES))


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exact_ties_follow_the_documented_rule(seed, ties):
    q, g, qg, gg = tied_case(seed)
    result = retrieval_metrics(q, g, qg, gg, k_values=K_VALUES, ties=ties, chunk_size=64)
    assert_matches(result, naive_all(q, g, qg, gg, None, ties, K_VALUES))


def test_pessimistic_is_a_lower_bound_and_differs_under_ties():
    q, g, qg, gg = tied_case(5)
    low = retrieval_metrics(q, g, qg, gg, ties="pessimistic").per_query["map"]
    high = retrieval_metrics(q, g, qg, gg, ties="optimistic").per_query["map"]
    ok = ~torch.isnan(low)
    assert bool((low[ok] <= high[ok] + 1e-15).all())
    assert bool((low[ok] < high[ok]).any())


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_many_positives_use_the_binary_search_path(ties):
    # 2 groups over 60 gallery items: ~30 relevant per query, above the comparison-loop limit.
    for q, g, qg, gg in (random_case(7, Q=12, G=60, groups=2), tied_case(8, Q=12, G=60, groups=2)):
        result = retrieval_metrics(q, g, qg, gg, k_values=K_VALUES, ties=ties, chunk_size=100)
        assert int(result.num_relevant.max()) > 8
        assert_matches(result, naive_all(q, g, qg, gg, None, ties, K_VALUES))


def test_self_exclusion_intra_modal():
    q, _, qg, _ = random_case(3, Q=30, groups=6)
    ids = [f"item{i}" for i in range(30)]
    exclude = self_exclusion(ids, ids)
    assert exclude.tolist() == list(range(30))
    result = retrieval_metrics(q, q, qg, qg, k_values=K_VALUES, exclude=exclude, chunk_size=90)
    assert_matches(result, naive_all(q, q, qg, qg, exclude, "pessimistic", K_VALUES))
    # Without removal every query finds itself first.
    assert retrieval_metrics(q, q, qg, qg).metrics["recall@1"] == 1.0
    # A query whose group has no other member is skipped, R counts after removal.
    assert int(result.num_relevant.sum()) == sum(int((qg == x).sum()) - 1 for x in qg)


def test_queries_without_relevant_items_are_skipped():
    q, g, _, _ = random_case(4, Q=5, G=8)
    qg = torch.tensor([0, 1, 2, 99, 98])
    gg = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    result = retrieval_metrics(q, g, qg, gg, k_values=K_VALUES)
    assert result.num_skipped == 2
    assert math.isnan(result.per_query["map"][3].item())
    assert_matches(result, naive_all(q, g, qg, gg, None, "pessimistic", K_VALUES))
    with pytest.raises(ValueError, match="no query has a relevant"):
        retrieval_metrics(q, g, torch.full((5,), 50), gg)


@pytest.mark.slow  # importing torchmetrics takes a few seconds
def test_map_agrees_with_torchmetrics():
    # torchmetrics treats a relevant item with a score <= 0 as irrelevant; keep every score
    # positive (embeddings in a cone, as real contrastive embeddings are) to compare like for like.
    tm = pytest.importorskip("torchmetrics.functional.retrieval")
    q, g, qg, gg = random_case(11, Q=20, G=200, groups=30)
    q = torch.nn.functional.normalize(q + 1.5, dim=1)
    g = torch.nn.functional.normalize(g + 1.5, dim=1)
    result = retrieval_metrics(q, g, qg, gg, k_values=(1, 5))
    scores = q @ g.T
    assert bool((scores > 0).all())
    for i in range(20):
        target = gg == qg[i]
        if target.any():
            ap = tm.retrieval_average_precision(scores[i], target).item()
            assert result.per_query["map"][i].item() == pytest.approx(ap, abs=1e-6)
            rr = tm.retrieval_reciprocal_rank(scores[i], target).item()
            assert result.per_query["mrr"][i].item() == pytest.approx(rr, abs=1e-6)


def test_blocks_cover_every_query_once_and_respect_chunk_size():
    q, g, qg, gg = random_case(2, Q=17, G=10)
    blocks = list(relevant_positions(q, g, qg, gg, chunk_size=35))
    assert [b.start for b in blocks] == list(range(0, 17, 3))
    assert sum(len(b.num_relevant) for b in blocks) == 17
    assert all(int(b.num_ranked.min()) == 10 for b in blocks)


def test_metrics_from_positions_hand_example():
    # Relevant at positions 2 and 5 out of a long ranking.
    m = metrics_from_positions(torch.tensor([[2, 5]]), torch.tensor([2]), k_values=(1, 2, 5))
    assert m["recall@1"].item() == 0.0 and m["recall@2"].item() == 1.0
    assert m["true_recall@2"].item() == 0.5 and m["precision@5"].item() == pytest.approx(0.4)
    assert m["map"].item() == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert m["map@r"].item() == pytest.approx((1 / 2) / 2)
    assert m["r_precision"].item() == pytest.approx(0.5)
    assert m["mrr"].item() == pytest.approx(0.5)
    ideal = 1 + 1 / math.log2(3)
    assert m["ndcg@5"].item() == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / ideal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_float32_agree(dtype):
    q, g, qg, gg = random_case(6, dtype=torch.float64)
    ref = retrieval_metrics(q, g, qg, gg).metrics
    got = retrieval_metrics(q.to(dtype), g.to(dtype), qg, gg).metrics
    for name, v in ref.items():
        assert got[name] == pytest.approx(v, abs=1e-6)


def test_bad_input_names_the_argument():
    q, g, qg, gg = random_case(0)
    with pytest.raises(ValueError, match="queries"):
        retrieval_metrics(q[0], g, qg, gg)
    with pytest.raises(ValueError, match="gallery dim"):
        retrieval_metrics(q, g[:, :3], qg, gg)
    with pytest.raises(ValueError, match="gallery_groups"):
        retrieval_metrics(q, g, qg, gg[:-1])
    with pytest.raises(ValueError, match="exclude"):
        retrieval_metrics(q, g, qg, gg, exclude=torch.full((len(q),), len(g)))
    with pytest.raises(ValueError, match="k_values"):
        retrieval_metrics(q, g, qg, gg, k_values=(0,))
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(q, g, qg, gg, ties="average")
    bad = q.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        retrieval_metrics(bad, g, qg, gg)
    with pytest.raises(ValueError, match="duplicates"):
        self_exclusion(["a"], ["b", "b"])


def test_recall_from_topk_equals_full_ranking_recall():
    q, g, qg, gg = random_case(9, Q=30, G=50, groups=12)
    exclude = torch.full((30,), -1)
    exclude[::3] = torch.arange(0, 30, 3)  # some queries drop one gallery item
    full = retrieval_metrics(q, g, qg, gg, k_values=(1, 3), exclude=exclude)
    scores = q @ g.T
    scores[torch.arange(30)[exclude >= 0], exclude[exclude >= 0]] = -torch.inf
    top = scores.topk(3, dim=1).indices
    got = recall_from_topk(top, qg, gg, (1, 3), exclude=exclude)
    assert got["recall@1"] == pytest.approx(full.metrics["recall@1"])
    assert got["recall@3"] == pytest.approx(full.metrics["recall@3"])
    with pytest.raises(ValueError, match="k >= 5"):
        recall_from_topk(top, qg, gg, (5,))


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("spread", ["few-candidates", "many-candidates", "wide"])
def test_count_above_paths_match_a_loop(strict, spread):
    # float64 scores with exact ties; thresholds drawn from the scores, -inf padding at the end.
    from modalign.evaluate.metrics import _count_above, _count_above_full

    gen = torch.Generator().manual_seed(3)
    n, G = 7, 400
    scores = torch.randint(0, 60, (n, G), generator=gen).to(torch.float64) / 7
    scores[:, :5] = -torch.inf  # removed items
    width = 12 if spread == "wide" else 4
    pick = torch.randint(5, G, (n, width), generator=gen)
    thresholds = scores.gather(1, pick)
    if spread == "few-candidates":  # thresholds among the best scores: the candidate path
        thresholds = thresholds.clamp(min=58 / 7)  # ~3% of scores clear them
    thresholds = thresholds.sort(1, descending=True).values
    thresholds[2, 1:] = -torch.inf  # padding
    thresholds[4, :] = -torch.inf  # a query without relevant items
    real = thresholds > -torch.inf
    naive = torch.zeros(n, width, dtype=torch.int64)
    for i in range(n):
        for p in range(width):
            for j in range(G):
                s, t = scores[i, j].item(), thresholds[i, p].item()
                naive[i, p] += (s > t) if strict else (s >= t)
    for counts in (_count_above(scores, thresholds, strict=strict),
                   _count_above_full(scores, thresholds, strict=strict)):
        assert torch.equal(counts[real], naive[real])


def test_finite_check_covers_every_float_dtype():
    from modalign.evaluate.metrics import _all_finite

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.ones(5, 3, dtype=dtype) * torch.finfo(dtype).max  # a sum in dtype overflows
        assert _all_finite(x)
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[4, 2] = bad
            assert not _all_finite(y)
