"""The on-disk embedding store: one float32 array per modality plus row metadata and a manifest.

Layout of a store folder::

    manifest.json              format_version, arrays, their encoders, the dataset and content
                               hashes
    dataset.json               the dataset encoded: name, root, counts and, when given with
                               ``modalign embed --name``, a readable ``display_name``
    <array>.npy                float32 (rows, dim), memory-mapped on read
    <array>.items.jsonl        one JSON object per row: id, modality, view, value (the text, or
                               the file path), group, split, labels

An array is usually named after its modality (``image``, ``text``, ``audio``); other stages add
arrays of their own (for example inverted features) with :meth:`EmbeddingStore.add_array`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalign.embed.arrays import array_facts, array_lock, check_array_file, verify_array_file
from modalign.errors import ModalignError
from modalign.io import (
    atomic_path,
    check_format_version,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
"""The store layout's version, recorded in ``manifest.json`` (absent: written before versions
were recorded, the same layout; the key is added on the next write)."""
DATASET_INFO = "dataset.json"


class RowTable:
    """Row metadata shared by pooled arrays (:class:`Embeddings`) and token arrays
    (:class:`~modalign.embed.tokens.TokenFeatures`): ``items`` and ``group_index``."""

    items: list[dict[str, Any]]
    group_index: Mapping[str, int]

    def __len__(self) -> int:
        return len(self.items)

    def group_ids(self) -> np.ndarray:
        """Integer group id of each row (equal ids are positives of each other)."""
        return np.array([self.group_index[it["group"]] for it in self.items], dtype=np.int64)

    def row_mask(self, view: str | Iterable[str] | None = None,
                 split: str | Iterable[str] | None = None) -> np.ndarray:
        """Boolean mask of the rows of the given view(s) and split(s) (None: any)."""
        views = {view} if isinstance(view, str) else (set(view) if view is not None else None)
        splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
        mask = [(views is None or it["view"] in views) and (splits is None or it["split"] in splits)
                for it in self.items]
        return np.array(mask, dtype=bool)


@dataclass
class Embeddings(RowTable):
    """Vectors of one array with their row metadata.

    Attributes:
        vectors: ``(n, dim)`` float32 array (memory-mapped when read from a store).
        items: one dict per row: ``id``, ``modality``, ``view``, ``group``, ``split``, ``labels``.
        group_index: group key -> integer id, shared by every array of one store.
    """

    vectors: np.ndarray
    items: list[dict[str, Any]]
    group_index: Mapping[str, int]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def labels(self, name: str) -> list[str]:
        """The label ``name`` of each row (``""`` where a row has none)."""
        return [it.get("labels", {}).get(name, "") for it in self.items]

    def subset(self, mask: np.ndarray | Sequence[bool] | Sequence[int]) -> Embeddings:
        """Rows selected by a boolean mask or integer indices (vectors are copied into memory)."""
        idx = np.asarray(mask)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Embeddings(np.asarray(self.vectors[idx]), [self.items[i] for i in idx],
                          self.group_index)

    def filter(self, view: str | Iterable[str] | None = None,
               split: str | Iterable[str] | None = None) -> Embeddings:
        """Rows of the given view(s) and split(s)."""
        return self.subset(self.row_mask(view, split))

    def torch(self, dtype=None):
        """The vectors as a torch tensor (a copy)."""
        import torch

        return torch.from_numpy(np.array(self.vectors, dtype=np.float32)).to(
            dtype or torch.float32)


class EmbeddingStore:
    """A folder of embedding arrays; see the module docstring for the layout.

    Examples:
        >>> import tempfile, numpy as np
        >>> store = EmbeddingStore(tempfile.mkdtemp())
        >>> rows = [{"id": "a", "modality": "text", "view": "name", "group": "g1", "split": "test"}]
        >>> store.add_array("text", np.ones((1, 3), np.float32), rows)
        >>> store.load("text").vectors.shape
        (1, 3)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    # -- manifest ---------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` (checked: a store written by a newer modalign is refused)."""
        p = self.path / MANIFEST
        if not p.exists():
            return {"format_version": FORMAT_VERSION, "arrays": {}, "groups": []}
        m = read_json(p)
        check_format_version(m, FORMAT_VERSION, f"embedding store {self.path}")
        return m

    def _update_manifest(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Read-modify-write the manifest under an exclusive lock (several writers may share
        one store, e.g. inversion runs adding arrays)."""
        with open(self.path / ".manifest.lock", "a+") as lock:
            _lock(lock)
            try:
                m = self.manifest
                fn(m)
                m["format_version"] = FORMAT_VERSION  # a store from before versions gains it
                write_json_atomic(self.path / MANIFEST, m)
            finally:
                _unlock(lock)

    @property
    def dataset_info(self) -> dict[str, Any]:
        """``dataset.json``: the dataset encoded into this store ({} when not recorded)."""
        p = self.path / DATASET_INFO
        data = read_json(p) if p.exists() else {}
        return data if isinstance(data, dict) else {}

    @property
    def display_name(self) -> str | None:
        """The readable dataset name given with ``modalign embed --name`` (None if none)."""
        name = self.dataset_info.get("display_name")
        return str(name) if name else None

    @property
    def arrays(self) -> list[str]:
        return sorted(self.manifest["arrays"])

    @property
    def modalities(self) -> list[str]:
        """Modalities with a native array (named after the modality)."""
        arrays = self.manifest["arrays"]
        return sorted(n for n, a in arrays.items() if a.get("modality") == n)

    def info(self, name: str) -> dict[str, Any]:
        arrays = self.manifest["arrays"]
        if name not in arrays:
            raise ModalignError(f"array {name!r} is not in the store {self.path}; "
                             f"it has {sorted(arrays)}")
        return arrays[name]

    def views(self, modality: str) -> list[str]:
        return sorted({it["view"] for it in self._items(modality)})

    def group_index(self) -> dict[str, int]:
        return {g: i for i, g in enumerate(self.manifest.get("groups", []))}

    def _items(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self.path / f"{name}.items.jsonl")

    # -- read -------------------------------------------------------------------------------
    def load(self, name: str, view: str | Iterable[str] | None = None,
             split: str | Iterable[str] | None = None) -> Embeddings:
        """Read array ``name`` (memory-mapped), optionally restricted to views and splits."""
        info = self.info(name)
        problem = self.check(name, info)
        if problem:
            raise ModalignError(f"array {name!r} of the store {self.path}: "
                                f"{self.path / info['file']} is damaged ({problem}); run "
                                "`modalign embed` with the same data and towers to re-encode it")
        vectors = np.load(self.path / info["file"], mmap_mode="r")
        emb = Embeddings(vectors, self._items(name), self.group_index())
        if view is None and split is None:
            return emb
        return emb.filter(view=view, split=split)

    def check(self, name: str, info: Mapping[str, Any] | None = None) -> str | None:
        """Cheap integrity check of array ``name`` (header, shape, rows, file size; no hashing):
        None when whole, else what is wrong."""
        info = info if info is not None else self.info(name)
        return check_array_file(self.path / info["file"], info)

    def is_current(self, name: str, key: str) -> bool:
        """True when array ``name`` exists with content key ``key`` and passes :meth:`check`."""
        info = self.manifest["arrays"].get(name)
        return bool(info) and info.get("hash") == key and self.check(name, info) is None

    def verify(self) -> dict[str, str | None]:
        """Every array checked against its recorded checksum: name -> None (whole) or the
        problem. Reads every byte; see :meth:`check` for the cheap test."""
        from modalign.embed.tokens import verify_tokens

        out: dict[str, str | None] = {
            name: verify_array_file(self.path / info["file"], info)
            for name, info in sorted(self.manifest["arrays"].items())}
        return {**out, **verify_tokens(self)}

    def register(self, name: str, items: Sequence[Mapping[str, Any]], entry: Mapping[str, Any]
                 ) -> None:
        """Record a finished ``<name>.npy`` (written by an ``ArrayWriter``): rows, then the
        manifest entry (``entry`` holds the writer's facts and the caller's info)."""
        write_jsonl_atomic(self.path / f"{name}.items.jsonl", [dict(it) for it in items])
        self._register_groups(it["group"] for it in items)
        full = {"modality": items[0]["modality"] if items else name, **dict(entry),
                "file": f"{name}.npy"}
        self._update_manifest(lambda m: m["arrays"].__setitem__(name, full))

    # -- write ------------------------------------------------------------------------------
    def _register_groups(self, groups: Iterable[str]) -> None:
        def fn(m: dict[str, Any]) -> None:
            known = m.setdefault("groups", [])
            have = set(known)
            for g in groups:
                if g not in have:
                    known.append(g)
                    have.add(g)
        self._update_manifest(fn)

    def add_array(self, name: str, vectors: np.ndarray, items: Sequence[Mapping[str, Any]],
                  info: Mapping[str, Any] | None = None) -> None:
        """Write a complete array atomically (vectors, then rows, then the manifest entry)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(items):
            raise ValueError(f"vectors: expected shape ({len(items)}, dim) to match items, "
                             f"got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError(f"vectors of array {name!r} contain NaN or inf")
        _check_name(name)
        with array_lock(self.path, name):
            with atomic_path(self.path / f"{name}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, vectors)
                facts = array_facts(tmp)
            self.register(name, items, {**(info or {}), **facts, "dim": int(vectors.shape[1])})

    def remove_array(self, name: str) -> None:
        """Forget an array and delete its files."""
        self._update_manifest(lambda m: m["arrays"].pop(name, None))
        for suffix in (".npy", ".items.jsonl", ".partial.npy", ".progress.json", ".lock"):
            (self.path / f"{name}{suffix}").unlink(missing_ok=True)


def evenly_spaced(n: int, k: int | None) -> np.ndarray:
    """``k`` evenly spaced row indices of ``range(n)`` (all of them when ``k`` is None or >= n),
    for a quick look at a subset that still spans the whole array.

    Examples:
        >>> evenly_spaced(10, 3).tolist()
        [0, 4, 9]
    """
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def _lock(f: Any) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: single-writer semantics
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


def _unlock(f: Any) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise ModalignError(f"array name {name!r}: expected a plain file-name-safe string")
