"""MaxSim (late-interaction) scoring: exact, blocked and memory-bounded, plus a prefilter.

The score of query ``q`` (tokens ``q_1..q_n``) and document ``d`` (tokens ``d_1..d_m``, of any
modalities) is ``sum_i max_j <q_i, d_j>``. Scores are computed a block of queries against a block
of documents at a time, both zero-padded, so memory is bounded by ``max_elements`` floats however
large the gallery: no ``(queries, documents, tokens)`` tensor is ever built for the whole gallery.

Token sets are :class:`Ragged` (values plus offsets, the layout of the store's token arrays);
a document's tokens may carry a modality tag (``Ragged.tags``) for per-modality statistics and
ablations (:meth:`Ragged.drop_tags`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from modalign.errors import ModalignError

__all__ = ["Ragged", "maxsim_pairs", "maxsim_scores", "maxsim_search", "modality_wins",
           "prefilter_search", "topk_recall"]


@dataclass
class Ragged:
    """Ragged token sets: set ``i`` is ``values[offsets[i]:offsets[i+1]]``.

    Attributes:
        values: ``(tokens, dim)`` float tensor.
        offsets: ``(sets + 1,)`` int64 tensor from 0 to ``tokens``.
        tags: optional ``(tokens,)`` int64 tensor, e.g. the modality index of each token.

    Examples:
        >>> import torch
        >>> r = Ragged.from_list([torch.ones(2, 3), torch.zeros(1, 3)])
        >>> len(r), r.offsets.tolist()
        (2, [0, 2, 3])
    """

    values: torch.Tensor
    offsets: torch.Tensor
    tags: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values)
        self.offsets = torch.as_tensor(np.asarray(self.offsets), dtype=torch.int64)
        off = self.offsets
        if (self.values.ndim != 2 or off.ndim != 1 or len(off) < 1 or int(off[0]) != 0
                or int(off[-1]) != len(self.values) or bool((off[1:] < off[:-1]).any())):
            raise ModalignError(f"token sets: expected (tokens, dim) values and offsets rising "
                                f"from 0 to the token count, got values {tuple(self.values.shape)}"
                                f" and offsets of length {len(off)}")
        if self.tags is not None:
            self.tags = torch.as_tensor(np.asarray(self.tags), dtype=torch.int64)
            if self.tags.shape != (len(self.values),):
                raise ModalignError(f"tags: expected one per token ({len(self.values)}), got "
                                    f"{tuple(self.tags.shape)}")

    @classmethod
    def from_list(cls, sets: Sequence[torch.Tensor], tags: Sequence[torch.Tensor] | None = None
                  ) -> Ragged:
        """From a list of ``(n_i, dim)`` tensors (and optionally ``(n_i,)`` tag tensors)."""
        if not sets:
            raise ModalignError("token sets: expected at least one set")
        counts = torch.tensor([len(s) for s in sets], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return cls(torch.cat(list(sets)), offsets,
                   torch.cat([torch.as_tensor(t) for t in tags]) if tags is not None else None)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def padded(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sets ``start..stop`` as zero-padded ``(B, T, dim)`` values and a ``(B, T)`` mask."""
        counts = self.counts()[start:stop]
        t = max(int(counts.max()) if len(counts) else 0, 1)
        idx = self.offsets[start:stop, None] + torch.arange(t)[None, :]
        mask = torch.arange(t)[None, :] < counts[:, None]
        idx = torch.where(mask, idx, torch.zeros_like(idx))
        vals = self.values[idx.reshape(-1)].reshape(len(counts), t, self.dim)
        return vals * mask[..., None].to(vals.dtype), mask

    def select(self, idx: Sequence[int] | torch.Tensor) -> Ragged:
        """The sets ``idx``, in that order."""
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
        parts = [torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in idx]
        take = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        counts = self.counts()[idx]
        return Ragged(self.values[take], torch.cat([torch.zeros(1, dtype=torch.int64),
                                                    counts.cumsum(0)]),
                      self.tags[take] if self.tags is not None else None)

    def drop_tags(self, drop: Sequence[int]) -> Ragged:
        """Remove every token whose tag is in ``drop`` (a modality ablation); sets keep their
        place, possibly empty (an empty document scores 0)."""
        if self.tags is None:
            raise ModalignError("drop_tags: these token sets carry no tags")
        keep = ~torch.isin(self.tags, torch.as_tensor(list(drop), dtype=torch.int64))
        owner = torch.repeat_interleave(torch.arange(len(self)), self.counts())
        counts = torch.bincount(owner[keep], minlength=len(self))
        return Ragged(self.values[keep], torch.cat([torch.zeros(1, dtype=torch.int64),
                                                    counts.cumsum(0)]), self.tags[keep])

    def centroids(self) -> torch.Tensor:
        """Mean token of each set ``(sets, dim)``, L2-normalised (zeros for an empty set)."""
        owner = torch.repeat_interleave(torch.arange(len(self)), self.counts())
        sums = torch.zeros(len(self), self.dim, dtype=self.values.dtype).index_add_(
            0, owner, self.values)
        return torch.nn.functional.normalize(sums, dim=-1)


def _block(qv: torch.Tensor, qm: torch.Tensor, dv: torch.Tensor, dm: torch.Tensor
           ) -> torch.Tensor:
    """MaxSim of padded query block ``(Bq, Tq, D)`` against padded doc block ``(Bd, Td, D)``."""
    sim = torch.einsum("qtd,gsd->qgts", qv, dv)
    sim = sim.masked_fill(~dm[None, :, None, :], float("-inf")).amax(-1)
    sim = torch.where(torch.isfinite(sim), sim, torch.zeros_like(sim))  # empty docs: 0
    return (sim * qm[:, None, :].to(sim.dtype)).sum(-1)


def _blocks(queries: Ragged, docs: Ragged, max_elements: int) -> tuple[int, int]:
    tq = max(int(queries.counts().max()), 1)
    td = max(int(docs.counts().max()), 1)
    per = tq * td
    bd = max(1, min(len(docs), max_elements // per))
    bq = max(1, min(len(queries), max_elements // (per * bd)))
    return bq, bd


def maxsim_scores(queries: Ragged, docs: Ragged, max_elements: int = 1 << 24) -> torch.Tensor:
    """Exact MaxSim scores ``(queries, documents)``, differentiable.

    ``max_elements`` bounds the similarity block held at once (float count; default 2**24,
    64 MB in float32).

    Examples:
        >>> import torch
        >>> q = Ragged.from_list([torch.eye(2)])
        >>> d = Ragged.from_list([torch.eye(2), torch.tensor([[1.0, 0.0]])])
        >>> maxsim_scores(q, d).tolist()
        [[2.0, 1.0]]
    """
    if queries.dim != docs.dim:
        raise ModalignError(f"queries have dim {queries.dim}, documents {docs.dim}: expected "
                            "the same token space")
    bq, bd = _blocks(queries, docs, max_elements)
    rows = []
    for qs in range(0, len(queries), bq):
        qv, qm = queries.padded(qs, min(qs + bq, len(queries)))
        cols = []
        for ds in range(0, len(docs), bd):
            dv, dm = docs.padded(ds, min(ds + bd, len(docs)))
            cols.append(_block(qv, qm, dv.to(qv.dtype), dm))
        rows.append(torch.cat(cols, 1))
    return torch.cat(rows, 0)


def maxsim_pairs(queries: Ragged, docs: Ragged) -> torch.Tensor:
    """MaxSim of query ``i`` with document ``i`` only ``(n,)``."""
    if len(queries) != len(docs):
        raise ModalignError(f"maxsim_pairs: {len(queries)} queries, {len(docs)} documents")
    qv, qm = queries.padded(0, len(queries))
    dv, dm = docs.padded(0, len(docs))
    sim = torch.einsum("ntd,nsd->nts", qv, dv.to(qv.dtype))
    sim = sim.masked_fill(~dm[:, None, :], float("-inf")).amax(-1)
    sim = torch.where(torch.isfinite(sim), sim, torch.zeros_like(sim))
    return (sim * qm.to(sim.dtype)).sum(-1)


@torch.no_grad()
def maxsim_search(queries: Ragged, docs: Ragged, k: int = 10, max_elements: int = 1 << 24
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` documents per query by exact MaxSim: ``(scores, indices)``, each ``(Q, k)``.

    Keeps only a running top-``k`` per query while walking the gallery in blocks, so memory is
    ``O(Q * k)`` plus one bounded block.
    """
    if not 1 <= k <= len(docs):
        raise ModalignError(f"k={k}: expected 1 <= k <= {len(docs)} (the documents)")
    bq, bd = _blocks(queries, docs, max_elements)
    out_s, out_i = [], []
    for qs in range(0, len(queries), bq):
        qv, qm = queries.padded(qs, min(qs + bq, len(queries)))
        best_s = torch.full((len(qv), 0), float("-inf"), dtype=qv.dtype)
        best_i = torch.zeros((len(qv), 0), dtype=torch.int64)
        for ds in range(0, len(docs), bd):
            de = min(ds + bd, len(docs))
            dv, dm = docs.padded(ds, de)
            s = _block(qv, qm, dv.to(qv.dtype), dm)
            cand_s = torch.cat([best_s, s], 1)
            cand_i = torch.cat([best_i, torch.arange(ds, de).expand(len(qv), -1)], 1)
            top = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_s, best_i = top.values, cand_i.gather(1, top.indices)
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)


@torch.no_grad()
def prefilter_search(queries: Ragged, docs: Ragged, k: int = 10, candidates: int = 100,
                     max_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate generation by centroid (single-vector) cosine, then exact MaxSim re-ranking of
    the ``candidates`` best documents per query: ``(scores, indices)``, each ``(Q, k)``.

    Recall against :func:`maxsim_search` is what :func:`topk_recall` measures.
    """
    if not 1 <= k <= candidates:
        raise ModalignError(f"k={k}, candidates={candidates}: expected 1 <= k <= candidates")
    candidates = min(candidates, len(docs))
    cand = (queries.centroids() @ docs.centroids().T).topk(candidates, dim=1).indices
    out_s, out_i = [], []
    for qi in range(len(queries)):
        q = queries.select([qi])
        s = maxsim_scores(q, docs.select(cand[qi]), max_elements)[0]
        top = s.topk(min(k, len(s)))
        out_s.append(top.values)
        out_i.append(cand[qi][top.indices])
    return torch.stack(out_s), torch.stack(out_i)


def topk_recall(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean fraction of each query's exact top-k indices that the approximate top-k found."""
    hits = [len(set(e.tolist()) & set(a.tolist())) / len(e) for e, a in zip(exact, approx)]
    return float(np.mean(hits)) if hits else float("nan")


@torch.no_grad()
def modality_wins(queries: Ragged, docs: Ragged, n_tags: int) -> torch.Tensor:
    """For query ``i`` against document ``i``: how many of its tokens took their max from a
    document token of each tag; ``(queries, n_tags)`` counts (CLaMR's modality selection)."""
    if docs.tags is None:
        raise ModalignError("modality_wins: the documents carry no modality tags")
    out = torch.zeros(len(queries), n_tags, dtype=torch.int64)
    for i in range(len(queries)):
        q = queries.values[queries.offsets[i]:queries.offsets[i + 1]]
        lo, hi = int(docs.offsets[i]), int(docs.offsets[i + 1])
        if hi == lo or len(q) == 0:
            continue
        win = (q @ docs.values[lo:hi].T.to(q.dtype)).argmax(1)
        out[i] = torch.bincount(docs.tags[lo:hi][win], minlength=n_tags)
    return out
