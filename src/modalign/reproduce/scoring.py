"""Score a protocol: retrieval over the full ranking, revisited mAP, zero-shot accuracy.

Retrieval runs through :func:`modalign.evaluate.metrics.retrieval_metrics` (exact, chunked: the
query x gallery matrix is never held whole), with group-id relevance and the query removed from
its own ranking when the protocol says so. Metrics are reported as fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.data.benchmarks.base import RetrievalProtocol, RevisitedGroundTruth
from modalign.distributed.runtime import autocast
from modalign.embed import Embeddings
from modalign.encoders.base import Encoder
from modalign.evaluate.metrics import retrieval_metrics, self_exclusion
from modalign.evaluate.zeroshot import encode_prototypes, zero_shot_classification
from modalign.reproduce.revisited_metrics import revisited_metrics

RETRIEVAL_KEYS = ("map", "map@r", "r_precision", "recall@1", "recall@5", "recall@10", "mrr")


def unit_rows(vectors: np.ndarray | Tensor, device: str | torch.device = "cpu") -> Tensor:
    """Float32 L2-normalised rows on ``device``: one copy of the input, normalised in place.

    Examples:
        >>> unit_rows(np.array([[3.0, 4.0]])).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    if isinstance(vectors, Tensor):
        t = vectors.to(device=device, dtype=torch.float32, copy=True)
    else:  # a writable float32 copy of a (possibly read-only, memory-mapped) array
        t = torch.from_numpy(np.array(vectors, dtype=np.float32)).to(device)
    return t.div_(t.norm(dim=-1, keepdim=True).clamp_min_(1e-12))


def score_retrieval(protocol: RetrievalProtocol, queries: Embeddings, gallery: Embeddings, *,
                    revisited: RevisitedGroundTruth | None = None,
                    qrels: Mapping[str, Sequence[str]] | None = None,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Metrics of ``queries`` against ``gallery`` under ``protocol``.

    ``queries`` may hold inverted features (OTI/OVI) as long as its rows keep the query items:
    relevance and self-removal follow the items, not the vectors.

    Examples:
        >>> from modalign.data.benchmarks import RetrievalProtocol, Side
        >>> rows = [{"id": i, "group": g} for i, g in (("a", "x"), ("b", "x"), ("c", "y"))]
        >>> emb = Embeddings(np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32), rows, {})
        >>> p = RetrievalProtocol("image-to-image", Side("image"), Side("image"), exclude_self=True)
        >>> score_retrieval(p, emb, emb)["map"]
        1.0
    """
    q = unit_rows(queries.vectors, device)
    g = unit_rows(gallery.vectors, device)
    if protocol.relevance == "qrels":
        if qrels is None:
            raise ValueError("qrels: the protocol needs the per-query relevant gallery ids")
        return qrels_metrics(q, g, [it["id"] for it in queries.items],
                             [it["id"] for it in gallery.items], qrels)
    if protocol.relevance == "revisited":
        if revisited is None:
            raise ValueError("revisited: the protocol needs the revisited ground truth")
        query_ids = [it["id"] for it in queries.items]
        order = {qid: i for i, qid in enumerate(query_ids)}
        keep = [order[qid] for qid in revisited.queries if qid in order]
        truth = _truth_subset(revisited, [query_ids[i] for i in keep])
        levels = revisited_metrics(q[keep], g, [it["id"] for it in gallery.items], truth)
        return {f"{level}/{name}": v for level, d in levels.items() for name, v in d.items()}
    groups: dict[str, int] = {}
    qg = torch.tensor([groups.setdefault(it["group"], len(groups)) for it in queries.items])
    gg = torch.tensor([groups.setdefault(it["group"], len(groups)) for it in gallery.items])
    exclude = (self_exclusion([it["id"] for it in queries.items],
                              [it["id"] for it in gallery.items])
               if protocol.exclude_self else None)
    result = retrieval_metrics(q, g, qg.to(q.device), gg.to(q.device),
                               exclude=None if exclude is None else exclude.to(q.device))
    out = {k: result.metrics[k] for k in RETRIEVAL_KEYS}
    out["queries_without_relevant"] = float(result.num_skipped)
    return out


def qrels_metrics(queries: Tensor, gallery: Tensor, query_ids: Sequence[str],
                  gallery_ids: Sequence[str], qrels: Mapping[str, Sequence[str]],
                  chunk_size: int = 256) -> dict[str, float]:
    """mAP and R-precision over the full ranking with per-query relevant ids (BEIR qrels).

    AP of a query is the mean, over its relevant items in rank order, of the precision at that
    item's rank (ties broken pessimistically: an irrelevant item scoring the same ranks first).
    Queries without a relevant gallery item are skipped and counted.

    Examples:
        >>> q = torch.tensor([[1.0, 0.0]])
        >>> g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
        >>> qrels_metrics(q, g, ["q"], ["a", "b", "c"], {"q": ["b", "a"]})["map"]
        0.8333333333333333
    """
    column = {gid: j for j, gid in enumerate(gallery_ids)}
    aps, rps, skipped = [], [], 0
    for start in range(0, len(query_ids), chunk_size):
        scores = (queries[start:start + chunk_size] @ gallery.T).double()
        for row, qid in zip(scores, query_ids[start:start + chunk_size]):
            rel = sorted({column[d] for d in qrels.get(qid, ()) if d in column})
            if not rel:
                skipped += 1
                continue
            relevant = torch.zeros(len(gallery_ids), dtype=torch.bool, device=row.device)
            relevant[rel] = True
            s_rel = row[relevant]
            # pessimistic rank of each relevant item: items above it, irrelevant ties first
            above = (row[None, :] > s_rel[:, None]).sum(1)
            ties = ((row[None, :] == s_rel[:, None]) & ~relevant[None, :]).sum(1)
            ranks = torch.sort(above + ties).values.double()
            # relevant items tied with each other take consecutive ranks
            step = torch.arange(len(rel), device=row.device).double()
            ranks = torch.cummax(ranks - step, 0).values + step
            hits = step + 1
            aps.append(float((hits / (ranks + 1)).mean()))
            rps.append(float((ranks < len(rel)).double().sum() / len(rel)))
    n = max(len(aps), 1)
    return {"map": sum(aps) / n, "r_precision": sum(rps) / n,
            "queries_without_relevant": float(skipped)}


def _truth_subset(truth: RevisitedGroundTruth, queries: Sequence[str]) -> RevisitedGroundTruth:
    index = {q: i for i, q in enumerate(truth.queries)}
    pick = [index[q] for q in queries]
    return RevisitedGroundTruth(tuple(queries), tuple(truth.easy[i] for i in pick),
                                tuple(truth.hard[i] for i in pick),
                                tuple(truth.junk[i] for i in pick))


@torch.no_grad()
def encode_texts(tower: Encoder, texts: Sequence[str], *, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> Tensor:
    """L2-normalised features of ``texts`` from a text tower, batched (autocast on CUDA)."""
    module = tower if isinstance(tower, torch.nn.Module) else getattr(tower, "model", None)
    if isinstance(module, torch.nn.Module):
        module.to(device)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tower.preprocess(list(texts[start:start + batch_size]))
        if isinstance(batch, dict):
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        elif isinstance(batch, Tensor):
            batch = batch.to(device)
        with autocast(device):
            out.append(F.normalize(tower.encode(batch).float(), dim=-1).cpu())
    return torch.cat(out)


def class_prototypes_for(tower: Encoder, classnames: Sequence[str], templates: Sequence[str], *,
                         batch_size: int = 256, device: str | torch.device = "cpu") -> Tensor:
    """Zero-shot prototypes: per class, the renormalised mean of its normalised prompt features.

    Underscores in class names become spaces before they enter the templates (as CoOp does).
    """
    names = [c.replace("_", " ") for c in classnames]
    return encode_prototypes(
        lambda prompts: encode_texts(tower, prompts, batch_size=batch_size, device=device),
        names, templates)


def zero_shot_scores(images: Embeddings, prototypes: Tensor, classnames: Sequence[str], *,
                     override: Tensor | None = None) -> dict[str, float]:
    """``acc1``, ``acc5``, ``mean_per_class_recall`` of ``images`` (their ``class`` label).

    ``override`` replaces the image features row for row (e.g. their OTI features).
    """
    return zero_shot_classification(images, prototypes, classnames, label="class",
                                    query_override=override).metrics
