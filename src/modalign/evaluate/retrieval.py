"""Retrieval tasks on embedding sets: cross-modal both ways, and intra-modal across views.

Inputs are :class:`modalign.embed.Embeddings` (vectors plus row metadata: id, view, group,
labels), as ``load_joint`` returns them. Vectors are L2-normalised, so scores are cosines.
Relevance is the group (``relevance="group"``: one concept, one image and its captions) or any
label (``relevance="subgroup"``: every item of the same class). A query that also sits in the
gallery (same id) is removed from its own ranking.

Metric keys name the *gallery*, as CLIP_benchmark does: ``image_retrieval_recall@5`` ranks images
for text queries, ``text_retrieval_recall@5`` ranks texts for image queries; intra-modal
directions use the gallery view, e.g. ``image:openmoji_retrieval_map``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.bridge.posthoc import BridgeChain, build_chain, lookup_key
from modalign.embed.store import Embeddings
from modalign.errors import ModalignError
from modalign.evaluate.bootstrap import QueryValues
from modalign.evaluate.metrics import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_K_VALUES,
    Ties,
    recall_from_topk,
    retrieval_metrics,
    self_exclusion,
)
from modalign.evaluate.search import ExactIndex, build_index, recall_against_exact

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+
    from typing_extensions import Unpack


@dataclass
class TaskResult:
    """What one task measured, ready for :func:`modalign.evaluate.records.make_record`.

    Attributes:
        task: ``"retrieval"``, ``"intra"`` or ``"zeroshot"``.
        metrics: flat metric name -> value.
        protocol: how it was measured (directions, K values, query removal, positives, ...).
        bridges: identity of each bridge applied, in order.
        inversion: description of inverted query features, or ``None``.
        per_query: metric name -> its per-query values (for bootstrap intervals); metrics
            without per-query values (index diagnostics) are absent.
    """

    task: str
    metrics: dict[str, float]
    protocol: dict[str, Any]
    bridges: list[dict[str, Any]] = field(default_factory=list)
    inversion: dict[str, Any] | None = None
    per_query: dict[str, QueryValues] = field(default_factory=dict, repr=False)


class RankingOptions(TypedDict, total=False):
    """The keywords both retrieval tasks take; each may be left out (default in brackets).

    Attributes:
        relevance: ``"group"`` or a label name shared by both sides [``"group"``].
        k_values: cut-offs for the ``@K`` metrics [:data:`DEFAULT_K_VALUES`].
        bridges: bridge specs (``modalign.bridge.posthoc.build_bridge``), fitted on the task's
            ``bank`` [none].
        queries_override: query key (``modality`` or ``"modality:view"``) -> ``(n, d)`` vectors
            replacing those *queries* (e.g. inverted features), same rows and order; bridges do
            not touch them [None].
        inversion: how the override was made, stored in the record [None].
        ties: tie rule (see :mod:`modalign.evaluate.metrics`) [``"pessimistic"``].
        chunk_size: scores held in memory at once [:data:`DEFAULT_CHUNK_SIZE`].
        progress: show a progress bar while ranking [False].
        index: ``"exact"`` (only the exact metrics), or a search index kind of
            :mod:`modalign.evaluate.search` (``"flat"``, ``"ivf"``, ``"hnsw"``): then
            ``..._index_recall@K`` (recall@K from that index's top-K) and
            ``..._index_agreement@K`` (share of the exact top-K it found) are added
            [``"exact"``].
    """

    relevance: str
    k_values: Sequence[int]
    bridges: Sequence[str]
    queries_override: Mapping[str, Tensor] | None
    inversion: Mapping[str, Any] | None
    ties: Ties
    chunk_size: int
    progress: bool
    index: str


def _check_options(options: Mapping[str, Any], where: str) -> None:
    """ModalignError naming any keyword that is not a :class:`RankingOptions` key."""
    known = RankingOptions.__required_keys__ | RankingOptions.__optional_keys__
    unknown = sorted(set(options) - known)
    if unknown:
        raise ModalignError(f"{where}: unknown keywords {unknown}; expected some of "
                            f"{sorted(known)} (RankingOptions)")


def cross_modal_retrieval(
    embeddings: Mapping[str, Embeddings],
    modalities: tuple[str, str] = ("image", "text"),
    *,
    bank: Mapping[str, Embeddings] | None = None,
    **options: Unpack[RankingOptions],
) -> TaskResult:
    """Retrieve ``b`` items with ``a`` queries and ``a`` items with ``b`` queries.

    Args:
        embeddings: modality -> test embeddings.
        modalities: the two modalities ``(a, b)``.
        bank: modality -> training embeddings for the bridges.
        options: the :class:`RankingOptions` (relevance, K values, bridges, query override,
            ties, chunk size, progress, index).

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> emb = toy_embeddings()
        >>> r = cross_modal_retrieval(emb, k_values=(1,))
        >>> sorted(k for k in r.metrics if "recall@1" in k and "true" not in k)
        ['image_retrieval_recall@1', 'text_retrieval_recall@1']
    """
    a, b = modalities
    for m in (a, b):
        if m not in embeddings:
            raise ValueError(f"modalities: {m!r} is not among the embeddings {sorted(embeddings)}")
    if a == b:
        raise ValueError("modalities: expected two different modalities; use intra_modal_retrieval")
    _check_options(options, "cross_modal_retrieval")
    directions = [(a, embeddings[a], b, embeddings[b]), (b, embeddings[b], a, embeddings[a])]
    return _run("retrieval", directions, bank, **options)


def intra_modal_retrieval(
    embeddings: Embeddings,
    modality: str,
    *,
    query_view: str | None = None,
    gallery_view: str | None = None,
    bank: Embeddings | None = None,
    **options: Unpack[RankingOptions],
) -> TaskResult:
    """Retrieval inside one modality: across two views (both ways), or one view against all.

    * ``query_view`` and ``gallery_view`` given and different: ``query -> gallery`` and the
      reverse (e.g. Noto images retrieving OpenMoji images of the same emoji).
    * only ``query_view``: those rows query every row of the modality, themselves removed
      (e.g. ``"name"`` texts against all texts).
    * neither: every row queries every other row.

    Keys of ``queries_override`` are ``"modality:view"`` (or ``modality`` when no view is given).
    ``bank``: training rows of the modality for the bridges (split by view like the test rows);
    ``options``: the :class:`RankingOptions`.

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> emb = toy_embeddings()["image"]
        >>> r = intra_modal_retrieval(emb, "image", query_view="noto", gallery_view="openmoji")
        >>> r.protocol["directions"][0]["query"], r.protocol["directions"][0]["gallery"]
        ('image:noto', 'image:openmoji')
    """
    _check_options(options, "intra_modal_retrieval")

    def rows(source: Embeddings, view: str | None) -> Embeddings:
        return source if view is None else source.filter(view=view)

    def key(view: str | None) -> str:
        return modality if view is None else f"{modality}:{view}"

    views: list[tuple[str | None, str | None]]
    if query_view is not None and gallery_view is not None and query_view != gallery_view:
        views = [(query_view, gallery_view), (gallery_view, query_view)]
    else:
        views = [(query_view, gallery_view)]
    present = sorted({it["view"] for it in embeddings.items})
    directions = []
    bank_parts: dict[str, Embeddings] = {}
    for qv, gv in views:
        q, g = rows(embeddings, qv), rows(embeddings, gv)
        for name, e, v in (("query_view", q, qv), ("gallery_view", g, gv)):
            if len(e) == 0:
                raise ValueError(f"{name}={v!r}: no {modality} rows with that view "
                                 f"(views present: {present})")
        directions.append((key(qv), q, key(gv), g))
        if bank is not None:
            bank_parts[key(qv)] = rows(bank, qv)
            bank_parts[key(gv)] = rows(bank, gv)
    return _run("intra", directions, bank_parts if bank is not None else None, **options)


def relevance_ids(
    query: Embeddings, gallery: Embeddings, relevance: str = "group"
) -> tuple[Tensor, Tensor]:
    """Integer relevance ids of the query and gallery rows (equal ids are relevant).

    ``"group"`` uses the store's group ids; any other name uses that label, where rows lacking
    the label are never relevant.

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> e = toy_embeddings()
        >>> qg, gg = relevance_ids(e["text"], e["image"], "subgroup")
        >>> qg.dtype, len(gg) == len(e["image"])
        (torch.int64, True)
    """
    if relevance == "group":
        return torch.from_numpy(query.group_ids()), torch.from_numpy(gallery.group_ids())
    q_labels, g_labels = query.labels(relevance), gallery.labels(relevance)
    if not any(q_labels) or not any(g_labels):
        raise ValueError(f"relevance={relevance!r}: no such label on the query or gallery rows; "
                         "expected 'group' or a label name the items carry")
    index = {v: i for i, v in enumerate(sorted(set(q_labels) | set(g_labels)))}
    qg = [index[v] if v else -1 for v in q_labels]
    gg = [index[v] if v else -2 for v in g_labels]
    return torch.tensor(qg, dtype=torch.int64), torch.tensor(gg, dtype=torch.int64)


def as_unit_tensor(embeddings: Embeddings) -> Tensor:
    """The vectors as an L2-normalised float32 tensor."""
    x = torch.from_numpy(np.asarray(embeddings.vectors, dtype=np.float32).copy())
    return F.normalize(x, dim=1)


def toy_embeddings(groups: int = 12, dim: int = 8, seed: int = 0) -> dict[str, Embeddings]:
    """A small synthetic image/text set (two image views, two texts per group) for examples.

    Examples:
        >>> sorted(toy_embeddings())
        ['image', 'text']
    """
    gen = np.random.default_rng(seed)
    centers = gen.normal(size=(groups, dim))
    group_index = {f"g{i}": i for i in range(groups)}
    out = {}
    for modality, views, offset in (("image", ("noto", "openmoji"), 1.0),
                                    ("text", ("name", "alias"), -1.0)):
        rows, vecs = [], []
        for g in range(groups):
            for v in views:
                vecs.append(centers[g] + offset + 0.7 * gen.normal(size=dim))
                rows.append({"id": f"{modality}-{v}-{g}", "modality": modality, "view": v,
                             "group": f"g{g}", "split": "test",
                             "labels": {"subgroup": f"s{g % 4}"}})
        out[modality] = Embeddings(np.asarray(vecs, dtype=np.float32), rows, group_index)
    return out


# --------------------------------------------------------------------------------------------


def _run(
    task: str,
    directions: list[tuple[str, Embeddings, str, Embeddings]],
    bank: Mapping[str, Embeddings] | None,
    *,
    relevance: str = "group",
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    bridges: Sequence[str] = (),
    queries_override: Mapping[str, Tensor] | None = None,
    inversion: Mapping[str, Any] | None = None,
    ties: Ties = "pessimistic",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    index: str = "exact",
) -> TaskResult:
    """One retrieval task over ``directions`` (query key, queries, gallery key, gallery); the
    keywords are the :class:`RankingOptions` with their defaults."""
    if bridges and bank is None:
        raise ValueError("bank: bridges need a bank of training embeddings to fit on")
    overrides = dict(queries_override or {})
    unknown = set(overrides) - {q for q, _, _, _ in directions}
    if unknown:
        raise ValueError(f"queries_override: keys {sorted(unknown)} are not query sets of this "
                         f"task; expected some of {[q for q, _, _, _ in directions]}")
    metrics: dict[str, float] = {}
    per_query: dict[str, QueryValues] = {}
    protocol_dirs = []
    applied: list[dict[str, Any]] = []
    for q_key, q_emb, g_key, g_emb in directions:
        q_vec, g_vec = as_unit_tensor(q_emb), as_unit_tensor(g_emb)
        if bridges:
            assert bank is not None  # checked above
            chain: BridgeChain = build_chain(bridges, query=q_key, gallery=g_key)
            chain.fit({q_key: as_unit_tensor(lookup_key(bank, q_key, "bank")),
                       g_key: as_unit_tensor(lookup_key(bank, g_key, "bank"))})
            if q_key == g_key:  # one set is both queries and gallery: transformed once
                q_vec = g_vec = chain.transform({g_key: g_vec})[g_key]
            else:
                moved = chain.transform({q_key: q_vec, g_key: g_vec})
                q_vec, g_vec = moved[q_key], moved[g_key]
            if not applied:
                applied = chain.identity()
        if q_key in overrides:
            override = overrides[q_key]
            if override.shape != q_vec.shape:
                raise ValueError(f"queries_override[{q_key!r}]: expected shape "
                                 f"{tuple(q_vec.shape)} (same rows as the queries), got "
                                 f"{tuple(override.shape)}")
            q_vec = F.normalize(override.to(torch.float32), dim=1)
        q_groups, g_groups = relevance_ids(q_emb, g_emb, relevance)
        exclude = self_exclusion([it["id"] for it in q_emb.items],
                                 [it["id"] for it in g_emb.items])
        result = retrieval_metrics(q_vec, g_vec, q_groups, g_groups, k_values=k_values,
                                   exclude=exclude, ties=ties, chunk_size=chunk_size,
                                   progress=progress)
        gallery_name = g_key if task == "intra" else g_key.split(":", 1)[0]
        for name, value in result.metrics.items():
            metrics[f"{gallery_name}_retrieval_{name}"] = value
            per_query[f"{gallery_name}_retrieval_{name}"] = QueryValues(
                result.per_query[name].numpy())
        if index != "exact":
            metrics.update({f"{gallery_name}_retrieval_{k}": v for k, v in _index_metrics(
                index, q_vec, g_vec, q_groups, g_groups, exclude, k_values, chunk_size).items()})
        counts = result.num_relevant[result.num_relevant > 0].double()
        protocol_dirs.append({
            "query": q_key, "gallery": g_key,
            "num_queries": result.num_queries, "num_gallery": len(g_vec),
            "queries_removed_from_own_ranking": int((exclude >= 0).sum()),
            "queries_without_positives": result.num_skipped,
            "positives_per_query": {"min": int(counts.min()), "mean": float(counts.mean()),
                                    "max": int(counts.max())},
            "inverted_queries": q_key in overrides,
            "bridges": chain.identity() if bridges else [],
        })
    protocol = {"directions": protocol_dirs, "relevance": relevance,
                "k_values": list(k_values), "ties": ties, "score": "cosine",
                "ranking": "full gallery", "index": index}
    return TaskResult(task, metrics, protocol, applied, dict(inversion) if inversion else None,
                      per_query)


def _index_metrics(kind: str, q: Tensor, g: Tensor, q_groups: Tensor, g_groups: Tensor,
                   exclude: Tensor, k_values: Sequence[int], chunk_size: int) -> dict[str, float]:
    k = max(k_values)
    approximate = build_index(kind)
    approximate.add(g)
    found = approximate.search(q, k, exclude=exclude).indices
    exact = ExactIndex(chunk_size=chunk_size)
    exact.add(g)
    reference = exact.search(q, k, exclude=exclude).indices
    out = {f"index_{name}": v for name, v in recall_from_topk(
        found, q_groups, g_groups, k_values, exclude=exclude).items()}
    out[f"index_agreement@{k}"] = recall_against_exact(found, reference)
    return out

