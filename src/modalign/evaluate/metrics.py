"""Retrieval metrics over the full ranking, exact and memory-bounded.

Every metric here is a function of one thing: the 1-based *positions* of a query's relevant
gallery items in its ranking. Positions are found without sorting the gallery: for each relevant
item we count how many irrelevant items score at least as high, one block of queries at a time,
so the full ``queries x gallery`` score matrix is never held in memory.

Conventions:
    * Score = dot product (cosine when the inputs are L2-normalised); higher ranks first.
    * Relevance: gallery item ``j`` is relevant to query ``i`` when their group ids are equal.
    * ``exclude[i]`` (a gallery index, or ``-1``) is removed from query ``i``'s ranking altogether
      (a query that sits in its own gallery). ``R``, the number of relevant items, is counted after
      that removal.
    * Ties (``ties="pessimistic"``, the default): an irrelevant item that scores *exactly* the same
      as a relevant one is ranked before it, so the metrics are a lower bound over all tie-breaking
      orders. ``ties="optimistic"`` ranks it after. Relevant items tied with each other take
      consecutive positions; which one is first does not change any metric.
    * Queries without any relevant item are left out of every average and counted in
      ``RetrievalResult.num_skipped``.

Metric definitions, with ``p_1 < ... < p_R`` the positions of the relevant items:

    ============================  =====================================================
    ``recall@K``                  ``1[p_1 <= K]`` (CLIP-style: any relevant in the top K)
    ``true_recall@K``             ``#{k: p_k <= K} / R``
    ``precision@K``               ``#{k: p_k <= K} / K``
    ``ndcg@K``                    ``sum_{p_k <= K} 1/log2(1+p_k) / sum_{i<=min(R,K)} 1/log2(1+i)``
    ``map``                       ``(1/R) sum_k k / p_k`` (average precision, full ranking)
    ``map@r``                     ``(1/R) sum_{p_k <= R} k / p_k``
    ``r_precision``               ``#{k: p_k <= R} / R``
    ``mrr``                       ``1 / p_1`` (full ranking)
    ============================  =====================================================
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

Ties = Literal["pessimistic", "optimistic"]

DEFAULT_K_VALUES: tuple[int, ...] = (1, 5, 10)
DEFAULT_CHUNK_SIZE = 1 << 22
"""Default number of query-gallery scores held at once (4 Mi entries, 16 MiB in float32)."""

# Above this many relevant items per query, counting switches from one comparison pass per
# relevant item to a single binary-search pass.
_COMPARE_LIMIT = 8


@dataclass(frozen=True)
class RelevantPositions:
    """Ranks of the relevant items of a block of queries.

    Attributes:
        start: index of the block's first query.
        positions: ``(n, P)`` int64, row ``i`` holds the 1-based positions ``p_1 < ... < p_R`` of
            query ``start + i`` in its first ``R`` columns and 0 after.
        num_relevant: ``(n,)`` int64, ``R`` per query.
        num_ranked: ``(n,)`` int64, the length of each query's ranking (gallery minus exclusion).
    """

    start: int
    positions: Tensor
    num_relevant: Tensor
    num_ranked: Tensor


@dataclass
class RetrievalResult:
    """Averaged metrics and their per-query values.

    Attributes:
        metrics: metric name -> mean over the queries that have at least one relevant item.
        per_query: metric name -> ``(num_queries,)`` float64 tensor, NaN for skipped queries.
        num_queries: number of queries given.
        num_skipped: queries without any relevant item (left out of the means).
        num_relevant: ``(num_queries,)`` int64, relevant items per query.
    """

    metrics: dict[str, float]
    per_query: dict[str, Tensor] = field(repr=False)
    num_queries: int
    num_skipped: int
    num_relevant: Tensor = field(repr=False)


def metric_names(k_values: Sequence[int] = DEFAULT_K_VALUES) -> list[str]:
    """The metric names :func:`metrics_from_positions` returns, in order.

    Examples:
        >>> metric_names((1,))
        ['recall@1', 'true_recall@1', 'precision@1', 'ndcg@1', 'map', 'map@r', 'r_precision', 'mrr']
    """
    names: list[str] = []
    for k in k_values:
        names += [f"recall@{k}", f"true_recall@{k}", f"precision@{k}", f"ndcg@{k}"]
    return [*names, "map", "map@r", "r_precision", "mrr"]


def metrics_from_positions(
    positions: Tensor, num_relevant: Tensor, k_values: Sequence[int] = DEFAULT_K_VALUES
) -> dict[str, Tensor]:
    """Per-query metrics from the sorted 1-based positions of the relevant items.

    Args:
        positions: ``(n, P)`` integer tensor; row ``i`` holds ``p_1 < ... < p_R`` in its first
            ``R = num_relevant[i]`` columns; the rest is ignored.
        num_relevant: ``(n,)`` integer tensor, ``R`` per query (0 gives NaN for that query).
        k_values: cut-offs for the ``@K`` metrics.

    Returns:
        metric name -> ``(n,)`` float64 tensor (see the module docstring for the definitions).

    Examples:
        >>> m = metrics_from_positions(torch.tensor([[1, 3]]), torch.tensor([2]), k_values=(1,))
        >>> round(m["map"].item(), 4), m["recall@1"].item(), m["true_recall@1"].item()
        (0.8333, 1.0, 0.5)
    """
    k_values = _check_k_values(k_values)
    if positions.ndim != 2 or num_relevant.ndim != 1 or len(positions) != len(num_relevant):
        raise ValueError(
            f"positions {tuple(positions.shape)} and num_relevant {tuple(num_relevant.shape)}: "
            "expected (n, P) and (n,)"
        )
    positions, num_relevant = positions.cpu(), num_relevant.cpu()
    width = positions.shape[1]
    R = num_relevant.to(torch.float64)
    k_idx = torch.arange(1, width + 1, dtype=torch.float64)  # k, the rank among relevant items
    valid = k_idx[None, :] <= R[:, None]
    pos = torch.where(valid, positions.to(torch.float64), torch.inf)  # padding never counts
    empty = R == 0
    nan = torch.tensor(torch.nan, dtype=torch.float64)

    def finish(x: Tensor) -> Tensor:
        return torch.where(empty, nan, x)

    safe_R = R.clamp(min=1)
    out: dict[str, Tensor] = {}
    gains = torch.where(valid, 1.0 / torch.log2(1.0 + pos), 0.0)
    for k in k_values:
        hits = (pos <= k).sum(1).to(torch.float64)
        ideal_len = torch.minimum(R, torch.tensor(float(k)))
        ideal = torch.cumsum(1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64)), 0)
        ideal_dcg = ideal[(ideal_len.long() - 1).clamp(min=0)]
        out[f"recall@{k}"] = finish((pos[:, 0] <= k).to(torch.float64) if width else R * 0)
        out[f"true_recall@{k}"] = finish(hits / safe_R)
        out[f"precision@{k}"] = finish(hits / k)
        out[f"ndcg@{k}"] = finish(torch.where(pos <= k, gains, 0.0).sum(1) / ideal_dcg)
    precision_at_hit = torch.where(valid, k_idx[None, :] / pos, 0.0)
    out["map"] = finish(precision_at_hit.sum(1) / safe_R)
    within_R = pos <= R[:, None]
    out["map@r"] = finish(torch.where(within_R, precision_at_hit, 0.0).sum(1) / safe_R)
    out["r_precision"] = finish(within_R.sum(1).to(torch.float64) / safe_R)
    out["mrr"] = finish(1.0 / pos[:, 0] if width else R * 0)
    return out


def relevant_positions(
    queries: Tensor,
    gallery: Tensor,
    query_groups: Tensor,
    gallery_groups: Tensor,
    *,
    exclude: Tensor | None = None,
    ties: Ties = "pessimistic",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[RelevantPositions]:
    """Positions of every relevant gallery item in each query's full ranking, block by block.

    Scores are computed for a block of ``max(1, chunk_size // len(gallery))`` queries at a time;
    for each relevant item the block counts the irrelevant items scoring at least as high
    (strictly higher with ``ties="optimistic"``), so no sort of the gallery is needed.

    Args:
        queries: ``(Q, d)`` float tensor.
        gallery: ``(G, d)`` float tensor, same dtype as ``queries``.
        query_groups: ``(Q,)`` integer group ids.
        gallery_groups: ``(G,)`` integer group ids; equal ids are relevant.
        exclude: ``(Q,)`` gallery index to drop from each query's ranking, ``-1`` for none.
        ties: ``"pessimistic"`` or ``"optimistic"`` (see the module docstring).
        chunk_size: number of scores held at once (at least one full gallery row).

    Yields:
        :class:`RelevantPositions` for consecutive blocks of queries.

    Examples:
        >>> q = torch.tensor([[1.0, 0.0]]); g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
        >>> block = next(relevant_positions(q, g, torch.tensor([7]), torch.tensor([7, 1, 7])))
        >>> block.positions.tolist(), block.num_relevant.tolist()
        ([[2, 3]], [2])
    """
    query_groups, gallery_groups, exclude = _check_inputs(
        queries, gallery, query_groups, gallery_groups, exclude)
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties={ties!r}: expected 'pessimistic' or 'optimistic'")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int")
    Q, G = len(queries), len(gallery)
    members = _GroupMembers(gallery_groups)
    block = max(1, chunk_size // max(G, 1))
    for start in range(0, Q, block):
        stop = min(Q, start + block)
        yield _block_positions(
            queries[start:stop], gallery, members, query_groups[start:stop],
            exclude[start:stop], start, strict=ties == "optimistic",
        )


def retrieval_metrics(
    queries: Tensor,
    gallery: Tensor,
    query_groups: Tensor,
    gallery_groups: Tensor,
    *,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    exclude: Tensor | None = None,
    ties: Ties = "pessimistic",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> RetrievalResult:
    """Retrieval metrics of ``queries`` against ``gallery`` over the full ranking.

    Args:
        queries: ``(Q, d)`` float tensor (L2-normalise it for cosine scores).
        gallery: ``(G, d)`` float tensor.
        query_groups: ``(Q,)`` integer group ids.
        gallery_groups: ``(G,)`` integer group ids; a gallery item is relevant to a query when
            their ids are equal (several positives per query are fine).
        k_values: cut-offs for ``recall@K``, ``true_recall@K``, ``precision@K``, ``ndcg@K``.
        exclude: ``(Q,)`` gallery index removed from each query's ranking, ``-1`` for none; use
            :func:`self_exclusion` when the queries sit in the gallery.
        ties: how exact score ties between relevant and irrelevant items are broken.
        chunk_size: number of scores held in memory at once.
        progress: show a progress bar over the query blocks.

    Returns:
        :class:`RetrievalResult` with the means and the per-query values.

    Examples:
        >>> g = torch.eye(3)
        >>> r = retrieval_metrics(g, g, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
        >>> r.metrics["map"], r.metrics["recall@1"], r.num_skipped
        (1.0, 1.0, 0)
    """
    k_values = _check_k_values(k_values)
    Q = len(queries)
    if Q == 0:
        raise ValueError("queries: no query rows (0 x d); expected at least one query (is the "
                         "split or view you evaluate empty?)")
    per_query = {name: torch.full((Q,), torch.nan, dtype=torch.float64)
                 for name in metric_names(k_values)}
    num_relevant = torch.zeros(Q, dtype=torch.int64)
    bar = tqdm(total=Q, desc="ranking", unit="query", disable=(not progress) or None, leave=False)
    for block in relevant_positions(queries, gallery, query_groups, gallery_groups,
                                    exclude=exclude, ties=ties, chunk_size=chunk_size):
        bar.update(len(block.num_relevant))
        rows = slice(block.start, block.start + len(block.num_relevant))
        num_relevant[rows] = block.num_relevant
        for name, values in metrics_from_positions(
            block.positions, block.num_relevant, k_values
        ).items():
            per_query[name][rows] = values
    bar.close()
    has_relevant = num_relevant > 0
    num_skipped = int((~has_relevant).sum())
    if Q and num_skipped == Q:
        raise ValueError(
            "query_groups/gallery_groups: no query has a relevant gallery item; expected at least "
            "one query whose group id appears in gallery_groups"
        )
    metrics = {name: float(v[has_relevant].mean()) for name, v in per_query.items()}
    return RetrievalResult(metrics, per_query, Q, num_skipped, num_relevant)


def recall_from_topk(
    indices: Tensor, query_groups: Tensor, gallery_groups: Tensor,
    k_values: Sequence[int] = DEFAULT_K_VALUES, *, exclude: Tensor | None = None,
) -> dict[str, float]:
    """``recall@K`` (any relevant item among the first K) from top-k search results.

    For searches that return only the best ``k >= max(k_values)`` items (an approximate index);
    ``-1`` entries (fewer results) never count. Queries without any relevant gallery item (after
    removing ``exclude[i]``, which the search must have excluded too) are left out, as in
    :func:`retrieval_metrics`.

    Examples:
        >>> recall_from_topk(torch.tensor([[2, 0], [1, 2]]), torch.tensor([0, 1]),
        ...                  torch.tensor([0, 5, 1]), k_values=(1, 2))
        {'recall@1': 0.0, 'recall@2': 1.0}
    """
    k_values = _check_k_values(k_values)
    if indices.ndim != 2 or len(indices) != len(query_groups) or indices.shape[1] < max(k_values):
        raise ValueError(f"indices {tuple(indices.shape)}: expected ({len(query_groups)}, k) "
                         f"with k >= {max(k_values)}")
    found = indices >= 0
    hit = found & (gallery_groups[indices.clamp(min=0)] == query_groups[:, None])
    count = _GroupMembers(gallery_groups).lookup(query_groups)[1]
    if exclude is not None:
        own = gallery_groups[exclude.clamp(min=0)] == query_groups
        count = count - ((exclude >= 0) & own).long()
    has_relevant = count > 0
    if not bool(has_relevant.any()):
        raise ValueError("query_groups/gallery_groups: no query has a relevant gallery item")
    return {f"recall@{k}": float(hit[has_relevant, :k].any(1).double().mean()) for k in k_values}


def self_exclusion(query_ids: Sequence[str], gallery_ids: Sequence[str]) -> Tensor:
    """``exclude`` for queries that also sit in the gallery: the gallery index of the same id.

    Examples:
        >>> self_exclusion(["a", "b", "z"], ["b", "a", "c"]).tolist()
        [1, 0, -1]
    """
    index = {gid: j for j, gid in enumerate(gallery_ids)}
    if len(index) != len(gallery_ids):
        raise ValueError("gallery_ids: expected unique ids, found duplicates")
    return torch.tensor([index.get(qid, -1) for qid in query_ids], dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# internals


class _GroupMembers:
    """Gallery indices of each group id, as one sorted array plus offsets (CSR layout)."""

    def __init__(self, gallery_groups: Tensor) -> None:
        self.order = torch.argsort(gallery_groups, stable=True)
        self.unique, counts = torch.unique_consecutive(
            gallery_groups[self.order], return_counts=True
        )
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts

    def lookup(self, groups: Tensor) -> tuple[Tensor, Tensor]:
        """Offset into ``order`` and member count of each group (count 0 for unknown ids)."""
        if len(self.unique) == 0:
            zeros = torch.zeros_like(groups)
            return zeros, zeros
        slot = torch.searchsorted(self.unique, groups).clamp(max=len(self.unique) - 1)
        found = self.unique[slot] == groups
        return self.offsets[slot], torch.where(found, self.counts[slot], 0)


def _block_positions(
    queries: Tensor,
    gallery: Tensor,
    members: _GroupMembers,
    groups: Tensor,
    exclude: Tensor,
    start: int,
    *,
    strict: bool,
) -> RelevantPositions:
    n, device = len(queries), queries.device
    offsets, counts = members.lookup(groups)
    width = int(counts.max()) if n else 0
    slots = torch.arange(width, device=device)
    in_group = slots[None, :] < counts[:, None]
    flat = (offsets[:, None] + slots[None, :]).clamp(max=max(len(members.order) - 1, 0))
    rel_index = members.order[flat] if width else flat
    relevant = in_group & (rel_index != exclude[:, None])
    num_relevant = relevant.sum(1)
    num_ranked = len(gallery) - (exclude >= 0).long()

    scores = queries @ gallery.T  # (n, G): the only block-sized allocation besides the mask
    rel_scores = torch.where(relevant, scores.gather(1, rel_index), -torch.inf)
    rel_scores = torch.sort(rel_scores, dim=1, descending=True).values  # real ones first
    # Remove relevant items and the excluded item from the counts of "scores at least as high".
    rows, cols = relevant.nonzero(as_tuple=True)
    scores[rows, rel_index[rows, cols]] = -torch.inf
    has_exclusion = (exclude >= 0).nonzero(as_tuple=True)[0]
    scores[has_exclusion, exclude[has_exclusion]] = -torch.inf

    above = _count_above(scores, rel_scores, strict=strict)  # irrelevant items ranked before
    k = slots + 1
    positions = torch.where(slots[None, :] < num_relevant[:, None], above + k[None, :], 0)
    return RelevantPositions(start, positions, num_relevant, num_ranked)


def _count_above(scores: Tensor, thresholds: Tensor, *, strict: bool) -> Tensor:
    """``out[i, p] = #{j : scores[i, j] >= thresholds[i, p]}`` (``>`` when ``strict``).

    ``scores`` entries of ``-inf`` are never counted against finite thresholds; ``-inf``
    thresholds are padding and their counts are meaningless.

    One comparison pass over the block keeps the scores that clear the lowest real threshold of
    their row (only those can clear any); each threshold is then compared with those candidates
    only. When the candidates are a large share of the block (poor rankings), the counts come from
    full passes instead, so memory stays bounded by the block.
    """
    n, width = thresholds.shape
    if width == 0:
        return thresholds.new_zeros((n, 0), dtype=torch.int64)
    compare = torch.gt if strict else torch.ge
    lowest = torch.where(thresholds > -torch.inf, thresholds, torch.inf).amin(1, keepdim=True)
    clears = compare(scores, lowest)
    if int(clears.sum()) * width <= scores.numel() // 4:
        rows, cols = clears.nonzero(as_tuple=True)
        hits = compare(scores[rows, cols][:, None], thresholds[rows]).to(torch.int64)
        return thresholds.new_zeros((n, width), dtype=torch.int64).index_add_(0, rows, hits)
    return _count_above_full(scores, thresholds, strict=strict)


def _count_above_full(scores: Tensor, thresholds: Tensor, *, strict: bool) -> Tensor:
    """:func:`_count_above` by full passes over ``scores`` (one per threshold, or a search)."""
    n, width = thresholds.shape
    if width <= _COMPARE_LIMIT:
        compare = torch.gt if strict else torch.ge
        cols = [compare(scores, thresholds[:, p : p + 1]).sum(1, dtype=torch.int32)
                for p in range(width)]
        return torch.stack(cols, 1).to(torch.int64)
    # One binary-search pass: bucket[i, j] = number of thresholds each score clears.
    ascending = thresholds.flip(1)
    bucket = torch.searchsorted(ascending.contiguous(), scores, right=not strict)
    hist = torch.zeros(n, width + 1, dtype=torch.int64, device=scores.device)
    hist.scatter_add_(1, bucket, torch.ones_like(bucket[:1, :1]).expand_as(bucket))
    # A score clears ascending threshold a iff bucket > a: reverse cumulative sum of hist[:, 1:].
    clears = torch.flip(torch.cumsum(torch.flip(hist[:, 1:], [1]), 1), [1])
    return clears.flip(1)


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, in one reduction for low-precision inputs.

    A float64 sum of float32/16 values cannot overflow (each is below 3.5e38), so it is finite
    exactly when every value is; float64 inputs take the element-wise test.
    """
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return bool(torch.isfinite(x.sum(dtype=torch.float64)))
    return bool(torch.isfinite(x).all())


def _check_k_values(k_values: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(k_values)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"k_values={k_values!r}: expected a non-empty sequence of positive ints")
    return ks


def _check_inputs(
    queries: Tensor,
    gallery: Tensor,
    query_groups: Tensor,
    gallery_groups: Tensor,
    exclude: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    for name, x in (("queries", queries), ("gallery", gallery)):
        if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
            raise ValueError(f"{name}: expected a 2-D float tensor (n, d), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if not _all_finite(x):
            raise ValueError(f"{name}: expected finite values, found NaN or inf")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries dim {queries.shape[1]} != gallery dim {gallery.shape[1]}: "
                         "expected embeddings of the same joint space")
    if queries.dtype != gallery.dtype:
        raise ValueError(f"queries dtype {queries.dtype} != gallery dtype {gallery.dtype}: "
                         "expected the same dtype")
    for name, g, n in (("query_groups", query_groups, len(queries)),
                       ("gallery_groups", gallery_groups, len(gallery))):
        if not isinstance(g, Tensor) or g.ndim != 1 or g.is_floating_point() or len(g) != n:
            raise ValueError(f"{name}: expected a 1-D integer tensor of length {n}, got "
                             f"{getattr(g, 'shape', type(g).__name__)}")
    device = queries.device
    query_groups = query_groups.to(device=device, dtype=torch.int64)
    gallery_groups = gallery_groups.to(device=device, dtype=torch.int64)
    if exclude is None:
        return query_groups, gallery_groups, torch.full(
            (len(queries),), -1, dtype=torch.int64, device=device)
    if (not isinstance(exclude, Tensor) or exclude.shape != (len(queries),)
            or exclude.is_floating_point()):
        raise ValueError(f"exclude: expected a 1-D integer tensor of length {len(queries)}")
    if len(exclude) and (int(exclude.max()) >= len(gallery) or int(exclude.min()) < -1):
        raise ValueError(f"exclude: expected gallery indices in [0, {len(gallery)}) or -1")
    return query_groups, gallery_groups, exclude.to(device=device, dtype=torch.int64)
