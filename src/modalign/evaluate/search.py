"""Nearest-neighbour search behind one interface: exact chunked torch, or faiss (optional extra).

``build_index(kind)`` returns an object with ``add(vectors)`` and ``search(queries, k)``:

    ==============  ====================================================  =======
    kind            what                                                  exact
    ==============  ====================================================  =======
    ``"exact"``     inner product in torch, blocks of queries x gallery    yes
    ``"flat"``      faiss ``IndexFlatIP``                                  yes
    ``"ivf"``       faiss ``IndexIVFFlat`` (``nlist``, ``nprobe``)         no
    ``"hnsw"``      faiss ``IndexHNSWFlat`` (``m``, ``ef_search``)         no
    ==============  ====================================================  =======

faiss is imported only when a faiss kind is asked for (``pip install modalign[faiss]``). Report how
good an approximate index is with :func:`recall_against_exact`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from modalign.errors import ModalignError
from modalign.io import atomic_path

IndexKind = Literal["exact", "flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("exact", "flat", "ivf", "hnsw")
DEFAULT_CHUNK_SIZE = 1 << 22


@dataclass(frozen=True)
class SearchResult:
    """Top-k neighbours per query, best first.

    Attributes:
        scores: ``(Q, k)`` inner products, descending along each row.
        indices: ``(Q, k)`` int64 gallery indices (``-1`` where fewer than k items exist).
    """

    scores: Tensor
    indices: Tensor


@runtime_checkable
class SearchIndex(Protocol):
    """What every index offers: add gallery vectors, then search them."""

    kind: str
    exact: bool

    @property
    def size(self) -> int:
        """Number of gallery vectors added so far."""
        ...

    def add(self, vectors: Tensor) -> None:
        """Append ``(n, d)`` gallery vectors."""
        ...

    def search(self, queries: Tensor, k: int, *, exclude: Tensor | None = None) -> SearchResult:
        """Top ``k`` gallery items per query; ``exclude[i]`` (or ``-1``) is never returned."""
        ...


class ExactIndex:
    """Exact inner-product search in torch, never holding more than ``chunk_size`` scores.

    Queries are scored against the gallery in blocks; when the gallery alone exceeds
    ``chunk_size``, it is split too and the running top-k is merged block by block.

    Examples:
        >>> index = ExactIndex(chunk_size=4)
        >>> index.add(torch.eye(3))
        >>> index.search(torch.tensor([[0.2, 0.9, 0.1]]), k=2).indices.tolist()
        [[1, 0]]
    """

    kind = "exact"
    exact = True

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int")
        self.chunk_size = chunk_size
        self._parts: list[Tensor] = []
        self._gallery: Tensor | None = None

    @property
    def size(self) -> int:
        return sum(len(p) for p in self._parts)

    def add(self, vectors: Tensor) -> None:
        vectors = _check_vectors("vectors", vectors, self._dim())
        self._parts.append(vectors)
        self._gallery = None

    def search(self, queries: Tensor, k: int, *, exclude: Tensor | None = None) -> SearchResult:
        gallery = self._all()
        queries = _check_vectors("queries", queries, gallery.shape[1]).to(gallery.dtype)
        k, exclude = _check_search(k, exclude, len(queries))
        G = len(gallery)
        gallery_block = min(max(G, 1), self.chunk_size)
        query_block = max(1, self.chunk_size // gallery_block)
        keep = min(k, G)
        out_scores = torch.full((len(queries), k), -torch.inf, dtype=gallery.dtype)
        out_index = torch.full((len(queries), k), -1, dtype=torch.int64)
        for qs in range(0, len(queries), query_block):
            q = queries[qs : qs + query_block]
            ex = exclude[qs : qs + query_block]
            best_s = torch.full((len(q), 0), -torch.inf, dtype=gallery.dtype)
            best_i = torch.zeros((len(q), 0), dtype=torch.int64)
            for gs in range(0, G, gallery_block):
                s = q @ gallery[gs : gs + gallery_block].T
                local = ex - gs
                rows = ((local >= 0) & (local < s.shape[1])).nonzero(as_tuple=True)[0]
                s[rows, local[rows]] = -torch.inf
                top = torch.topk(s, min(keep, s.shape[1]), dim=1)
                best_s = torch.cat([best_s, top.values], 1)
                best_i = torch.cat([best_i, top.indices + gs], 1)
                if best_s.shape[1] > keep:
                    top = torch.topk(best_s, keep, dim=1)
                    best_s, best_i = top.values, best_i.gather(1, top.indices)
            best_i = torch.where(torch.isneginf(best_s), -1, best_i)
            out_scores[qs : qs + len(q), :keep] = best_s
            out_index[qs : qs + len(q), :keep] = best_i
        return SearchResult(out_scores, out_index)

    def _dim(self) -> int | None:
        return self._parts[0].shape[1] if self._parts else None

    def _all(self) -> Tensor:
        if not self._parts:
            raise ValueError("index is empty: call add(vectors) before search")
        if self._gallery is None:
            self._gallery = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._parts = [self._gallery]
        return self._gallery


class FaissIndex:
    """A faiss inner-product index (``flat``, ``ivf`` or ``hnsw``) with the same interface.

    Args:
        kind: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``.
        nlist: IVF cells (``ivf``); the index trains on the first vectors added.
        nprobe: IVF cells visited per query (``ivf``).
        m: graph degree (``hnsw``).
        ef_search: candidate list size at search time (``hnsw``).

    Examples:
        >>> import torch
        >>> index = FaissIndex("flat")
        >>> index.add(torch.eye(3))
        >>> index.search(torch.tensor([[0.0, 1.0, 0.0]]), k=1).indices.tolist()
        [[1]]
    """

    def __init__(self, kind: str = "flat", *, nlist: int = 1024, nprobe: int = 16, m: int = 32,
                 ef_search: int = 64) -> None:
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"kind={kind!r}: expected 'flat', 'ivf' or 'hnsw' for faiss")
        self.faiss = require_faiss()
        self.kind = kind
        self.exact = kind == "flat"
        self.params = {"nlist": nlist, "nprobe": nprobe, "m": m, "ef_search": ef_search}
        self._index: Any = None
        self._dtype: torch.dtype = torch.float32

    @property
    def size(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def add(self, vectors: Tensor) -> None:
        vectors = _check_vectors("vectors", vectors, None if self._index is None
                                 else int(self._index.d))
        x = np.ascontiguousarray(vectors.detach().cpu().numpy(), dtype=np.float32)
        if self._index is None:
            self._index = self._make(x)
            self._dtype = vectors.dtype
        self._index.add(x)

    def search(self, queries: Tensor, k: int, *, exclude: Tensor | None = None) -> SearchResult:
        if self._index is None:
            raise ValueError("index is empty: call add(vectors) before search")
        queries = _check_vectors("queries", queries, int(self._index.d))
        k, exclude = _check_search(k, exclude, len(queries))
        extra = int((exclude >= 0).any())
        x = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
        scores, index = self._index.search(x, k + extra)
        scores, index = torch.from_numpy(scores), torch.from_numpy(index).long()
        if extra:  # drop the excluded item, keep the best k of the rest
            drop = index == exclude[:, None]
            order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, :k]
            scores, index = scores.gather(1, order), index.gather(1, order)
            scores = torch.where(index == exclude[:, None], -torch.inf, scores)
        index = torch.where(index < 0, -1, index)
        scores = torch.where(index < 0, -torch.inf, scores)
        return SearchResult(scores.to(self._dtype), index)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the faiss index to ``path`` atomically (``faiss.write_index``)."""
        if self._index is None:
            raise ValueError("index is empty: call add(vectors) before write")
        with atomic_path(path) as tmp:
            self.faiss.write_index(self._index, str(tmp))
        return Path(path)

    @classmethod
    def read(cls, path: str | os.PathLike[str], kind: str) -> FaissIndex:
        """Read an index written by :meth:`write`; ``kind`` is the kind it was built as."""
        index = cls(kind)
        index._index = index.faiss.read_index(str(path))
        return index

    def _make(self, x: np.ndarray) -> Any:
        faiss, d = self.faiss, x.shape[1]
        if self.kind == "flat":
            return faiss.IndexFlatIP(d)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.params["m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.params["ef_search"]
            return index
        nlist = max(1, min(self.params["nlist"], len(x) // 39 or 1))
        self._quantizer = faiss.IndexFlatIP(d)  # kept alive: the IVF index refers to it
        index = faiss.IndexIVFFlat(self._quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(self.params["nprobe"], nlist)
        return index


def build_index(kind: str = "exact", **params: Any) -> SearchIndex:
    """An empty index of the given kind (see the module docstring for the kinds).

    Examples:
        >>> build_index("exact", chunk_size=1024).exact
        True
    """
    if kind == "exact":
        return ExactIndex(**params)
    if kind in ("flat", "ivf", "hnsw"):
        return FaissIndex(kind, **params)
    raise ValueError(f"kind={kind!r}: expected one of {', '.join(INDEX_KINDS)}")


def recall_against_exact(approximate: Tensor, exact: Tensor) -> float:
    """Fraction of the exact top-k neighbours that the approximate search also returned.

    Args:
        approximate: ``(Q, k)`` indices from an approximate index.
        exact: ``(Q, k)`` indices from an exact one (``-1`` entries are ignored).

    Examples:
        >>> recall_against_exact(torch.tensor([[1, 2], [3, 9]]), torch.tensor([[2, 1], [3, 4]]))
        0.75
    """
    if approximate.shape != exact.shape or approximate.ndim != 2:
        raise ValueError(f"approximate {tuple(approximate.shape)} and exact "
                         f"{tuple(exact.shape)}: expected the same (Q, k) shape")
    found = (approximate[:, :, None] == exact[:, None, :]).any(1) & (exact >= 0)
    total = int((exact >= 0).sum())
    return float(found.sum()) / total if total else 1.0


def faiss_available() -> bool:
    """Whether the optional faiss package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def require_faiss() -> Any:
    """The faiss module, or a one-line error naming the package to install."""
    try:
        return importlib.import_module("faiss")
    except ImportError as e:
        raise ModalignError(
            "faiss is not installed: `pip install faiss-cpu` (or the extra "
            "`pip install 'modalign[faiss]'`), or use exact search (--index exact)"
        ) from e


def _check_vectors(name: str, x: Tensor, dim: int | None) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D float tensor (n, d), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected dimension {dim}, got {x.shape[1]}")
    return x


def _check_search(k: int, exclude: Tensor | None, n: int) -> tuple[int, Tensor]:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r}: expected a positive int")
    if exclude is None:
        return k, torch.full((n,), -1, dtype=torch.int64)
    if not isinstance(exclude, Tensor) or exclude.shape != (n,) or exclude.is_floating_point():
        raise ValueError(f"exclude: expected a 1-D integer tensor of length {n}")
    return k, exclude.long()
