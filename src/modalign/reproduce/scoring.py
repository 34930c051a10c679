"""Score a protocol: retrieval over the full ranking, revisited mAP, zero-shot accuracy.

Retrieval runs through :func:`modalign.evaluate.metrics.retrieval_metrics` (exact, chunked: the
query x gallery matrix is never held whole), with group-id relevance and the query removed from
its own ranking when the protocol says so. Metrics are reported as fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.data.benchmarks.base import RetrievalProtocol, RevisitedGroundTruth
from modalign.embed import Embeddings
from modalign.encoders.base import Encoder
from modalign.evaluate.metrics import retrieval_metrics, self_exclusion
from modalign.reproduce.extract import mixed_precision
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
        with mixed_precision(device):
            out.append(F.normalize(tower.encode(batch).float(), dim=-1).cpu())
    return torch.cat(out)


def class_weights(tower: Encoder, prompts: Sequence[Sequence[str]], *, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> Tensor:
    """Zero-shot classifier: per class, the normalised mean of its normalised prompt features."""
    flat = [p for ps in prompts for p in ps]
    feats = encode_texts(tower, flat, batch_size=batch_size, device=device)
    sizes = [len(ps) for ps in prompts]
    return torch.stack([F.normalize(chunk.mean(0), dim=-1)
                        for chunk in torch.split(feats, sizes)])


def zero_shot_scores(features: Tensor, weights: Tensor, labels: Tensor, *,
                     chunk: int = 8192) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean per-class recall of ``argmax features @ weights.T``.

    Args:
        features: ``(n, d)`` normalised features to classify.
        weights: ``(C, d)`` normalised class weights.
        labels: ``(n,)`` true class indices.

    Examples:
        >>> w = torch.eye(3)
        >>> zero_shot_scores(torch.eye(3)[[0, 1, 1]], w, torch.tensor([0, 1, 2]))["acc1"]
        0.6666666666666666
    """
    if features.shape[1] != weights.shape[1] or len(features) != len(labels):
        raise ValueError(f"features {tuple(features.shape)}, weights {tuple(weights.shape)}, "
                         f"labels {tuple(labels.shape)}: expected (n, d), (C, d), (n,)")
    k = min(5, weights.shape[0])
    top1, top5 = [], []
    for start in range(0, len(features), chunk):
        logits = features[start:start + chunk] @ weights.T.to(features)
        top = logits.topk(k, dim=1).indices.cpu()
        y = labels[start:start + chunk].cpu()
        top1.append(top[:, 0] == y)
        top5.append((top == y[:, None]).any(1))
    hit1, hit5 = torch.cat(top1), torch.cat(top5)
    labels = labels.cpu()
    recalls = [hit1[labels == c].double().mean() for c in labels.unique()]
    return {"acc1": float(hit1.double().mean()), "acc5": float(hit5.double().mean()),
            "mean_per_class_recall": float(torch.stack(recalls).mean())}
