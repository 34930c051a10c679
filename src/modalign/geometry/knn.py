"""Chunked exact k-nearest-neighbour search by inner product (cosine on normalised rows).

Queries are processed in blocks and the gallery is streamed in blocks, keeping a running top-k per
query, so memory is ``O(query_block * (k + gallery_block))`` whatever the gallery size.

Examples:
    >>> import torch
    >>> g = torch.eye(3, dtype=torch.float64)
    >>> topk_neighbours(g, g, k=1, exclude_diagonal=False).tolist()
    [[0], [1], [2]]
"""

from __future__ import annotations

import torch

__all__ = ["topk_neighbours"]


def topk_neighbours(queries: torch.Tensor, gallery: torch.Tensor, *, k: int,
                    exclude_diagonal: bool = False, query_block: int = 1024,
                    gallery_block: int = 16384) -> torch.Tensor:
    """Indices (n_queries, k) of the ``k`` gallery rows with the largest ``q . g``, best first.

    ``exclude_diagonal`` drops gallery row ``i`` from the candidates of query ``i`` (queries and
    gallery indexed alike, e.g. a set searched against itself). Ties are broken arbitrarily.
    """
    nq, ng = queries.shape[0], gallery.shape[0]
    available = ng - (1 if exclude_diagonal else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k: expected 1 <= k <= {available} (gallery rows available), got {k}")
    if exclude_diagonal and nq > ng:
        raise ValueError("exclude_diagonal: needs at most as many queries as gallery rows")
    out = torch.empty(nq, k, dtype=torch.long)
    for qs in range(0, nq, query_block):
        q = queries[qs:qs + query_block]
        best_v = torch.full((len(q), 0), -torch.inf, dtype=q.dtype)
        best_i = torch.empty((len(q), 0), dtype=torch.long)
        for gs in range(0, ng, gallery_block):
            scores = q @ gallery[gs:gs + gallery_block].T
            if exclude_diagonal:
                rows = torch.arange(len(q))
                cols = rows + qs - gs
                ok = (cols >= 0) & (cols < scores.shape[1])
                scores[rows[ok], cols[ok]] = -torch.inf
            kb = min(k, scores.shape[1])
            block_v, block_i = torch.topk(scores, kb, dim=1)
            cand_v = torch.cat([best_v, block_v], dim=1)
            cand_i = torch.cat([best_i, block_i + gs], dim=1)
            kk = min(k, cand_v.shape[1])
            top_v, top = torch.topk(cand_v, kk, dim=1)
            best_v, best_i = top_v, cand_i.gather(1, top)
        out[qs:qs + len(q)] = best_i
    return out
