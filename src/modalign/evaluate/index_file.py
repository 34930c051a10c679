"""A search index on disk: a faiss index file plus its id map (``FILE.json``).

``write_index(path, gallery, kind)`` adds a gallery's unit vectors to a faiss index of ``kind``
(``flat``, ``ivf``, ``hnsw``) and writes it to ``path``; ``path + ".json"`` holds what a search
needs to name its hits (one row per vector: id, value, group, view, split) and where the vectors
came from (model, data, modality, split). ``read_index(path)`` checks that both agree.

Examples:
    >>> from modalign.evaluate.retrieval import toy_embeddings
    >>> path = write_index("gallery.faiss", toy_embeddings()["image"], "flat")
    >>> index, gallery, meta = read_index(path)
    >>> index.size, len(gallery.items), meta["kind"]
    (24, 24, 'flat')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modalign.embed.store import Embeddings
from modalign.errors import ModalignError
from modalign.evaluate.search import FaissIndex
from modalign.io import read_json, write_json_atomic

INDEX_FORMAT = "modalign.SearchIndexFile"
FILE_KINDS = ("flat", "ivf", "hnsw")
_ROW_FIELDS = ("id", "value", "group", "view", "split")


def id_map_path(path: str | os.PathLike[str]) -> Path:
    """The id map next to an index file: ``FILE.json``.

    Examples:
        >>> id_map_path("runs/gallery.faiss").name
        'gallery.faiss.json'
    """
    p = Path(path)
    return p.with_name(p.name + ".json")


def write_index(path: str | os.PathLike[str], gallery: Embeddings, kind: str = "flat",
                meta: Mapping[str, Any] | None = None, **params: Any) -> Path:
    """Build a faiss index of ``kind`` over ``gallery`` and write it with its id map.

    Both files are written atomically, the index first; ``meta`` (model, data, modality, ...) is
    stored in the id map. ``params`` go to :class:`modalign.evaluate.search.FaissIndex`.
    """
    if kind not in FILE_KINDS:
        raise ModalignError(f"--kind {kind!r}: expected one of {', '.join(FILE_KINDS)}")
    if len(gallery) == 0:
        raise ModalignError("gallery: expected at least one item to index")
    index = FaissIndex(kind, **params)
    index.add(F.normalize(torch.from_numpy(np.array(gallery.vectors, dtype=np.float32)), dim=1))
    out = index.write(path)
    rows = [{k: str(it.get(k, "")) for k in _ROW_FIELDS} for it in gallery.items]
    write_json_atomic(id_map_path(out), {
        "format": INDEX_FORMAT, "kind": kind, "params": index.params, "count": len(rows),
        "dim": gallery.dim, **dict(meta or {}), "rows": rows,
    })
    return out


def read_index(path: str | os.PathLike[str]) -> tuple[FaissIndex, Embeddings, dict[str, Any]]:
    """Read an index written by :func:`write_index`: the index, its rows, and its metadata.

    The returned :class:`Embeddings` has the rows (for naming hits) and an empty ``(n, 0)``
    vector array: the vectors live in the index.
    """
    p = Path(path)
    ids = id_map_path(p)
    if not p.is_file():
        raise ModalignError(f"--index {p}: no such file (write one with 'modalign index build')")
    if not ids.is_file():
        raise ModalignError(f"--index {p}: its id map {ids.name} is missing; rebuild the index "
                            "with 'modalign index build'")
    meta = read_json(ids)
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise ModalignError(f"{ids}: not a modalign index id map")
    index = FaissIndex.read(p, meta["kind"])
    rows = meta.pop("rows")
    if index.size != len(rows):
        raise ModalignError(f"--index {p}: holds {index.size} vectors but its id map lists "
                            f"{len(rows)} rows; rebuild it")
    groups = {g: i for i, g in enumerate(sorted({r["group"] for r in rows}))}
    return index, Embeddings(np.zeros((len(rows), 0), np.float32), rows, groups), meta
