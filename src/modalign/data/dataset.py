"""Paired datasets: a flat list of items of any modality, matched by group."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modalign.io import read_json, read_jsonl, write_json_atomic, write_jsonl_atomic

SPLITS: tuple[str, ...] = ("train", "val", "test")
DATASET_FILE = "dataset.json"
ITEMS_FILE = "items.jsonl"


@dataclass(frozen=True)
class Item:
    """One input of one modality.

    Attributes:
        id: unique within the dataset.
        modality: ``"image"``, ``"text"``, ``"audio"`` or a user's own name.
        view: the kind or style within a modality (``"noto"``, ``"openmoji"``, ``"name"``, ...).
        value: a file path (images, audio) or the text itself.
        group: items sharing a group are positives of each other (one concept, one image and
            its captions).
        split: ``"train"``, ``"val"`` or ``"test"``.
        labels: label name -> value (``"subgroup"``, ``"group"``, a user's ``"label"``).
    """

    id: str
    modality: str
    view: str
    value: str
    group: str
    split: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "modality": self.modality, "view": self.view, "value": self.value,
                "group": self.group, "split": self.split, "labels": dict(self.labels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Item:
        return cls(id=str(d["id"]), modality=str(d["modality"]), view=str(d.get("view", "")),
                   value=str(d["value"]), group=str(d["group"]), split=str(d["split"]),
                   labels=dict(d.get("labels") or {}))


def split_of(key: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic split of a group key: the same key lands in the same split everywhere.

    Uses SHA-256 of the key, so it is stable across machines, Python versions and builds.

    Examples:
        >>> split_of("grinning face") in SPLITS
        True
        >>> split_of("grinning face") == split_of("grinning face")
        True
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions={fractions!r}: expected three non-negative numbers "
                         "summing to 1")
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


class PairedDataset:
    """Items of any modalities, paired through their ``group``.

    Examples:
        >>> ds = PairedDataset("toy", [
        ...     Item("a.img", "image", "photo", "a.png", "a", "train"),
        ...     Item("a.txt", "text", "caption", "a red apple", "a", "train")])
        >>> ds.modalities, [i.value for i in ds.select(modality="text")]
        (['image', 'text'], ['a red apple'])
    """

    def __init__(self, name: str, items: Sequence[Item], root: Path | None = None,
                 info: Mapping[str, Any] | None = None) -> None:
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"items: id {dup!r} appears more than once; item ids must be unique")
        for it in items:
            if it.split not in SPLITS:
                raise ValueError(f"item {it.id!r}: split={it.split!r}, expected one of {SPLITS}")
        self.name = name
        self.items: list[Item] = list(items)
        self.root = root
        self.info: dict[str, Any] = dict(info or {})

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        counts = ", ".join(f"{m}={len(self.select(modality=m))}" for m in self.modalities)
        return f"PairedDataset({self.name!r}, groups={len(self.groups())}, {counts})"

    @property
    def modalities(self) -> list[str]:
        return sorted({it.modality for it in self.items})

    def views(self, modality: str) -> list[str]:
        """The views present for ``modality``, sorted."""
        return sorted({it.view for it in self.items if it.modality == modality})

    def groups(self, split: str | None = None) -> list[str]:
        """Distinct group keys (optionally of one split), in first-seen order."""
        seen: dict[str, None] = {}
        for it in self.items:
            if split is None or it.split == split:
                seen.setdefault(it.group, None)
        return list(seen)

    def select(self, modality: str | None = None, view: str | Iterable[str] | None = None,
               split: str | Iterable[str] | None = None) -> list[Item]:
        """Items matching every given filter (a filter may be one value or several)."""
        views = {view} if isinstance(view, str) else (set(view) if view is not None else None)
        splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
        return [it for it in self.items
                if (modality is None or it.modality == modality)
                and (views is None or it.view in views)
                and (splits is None or it.split in splits)]

    def counts(self) -> dict[str, Any]:
        """Counts per modality, per view and per split (for manifests and logs)."""
        out: dict[str, Any] = {"groups": len(self.groups()),
                               "groups_per_split": {s: len(self.groups(s)) for s in SPLITS}}
        for m in self.modalities:
            out[m] = {v: len(self.select(modality=m, view=v)) for v in self.views(m)}
        return out

    def resolve(self, item: Item) -> Path:
        """The file behind an image/audio item (relative values resolve against ``root``)."""
        p = Path(item.value)
        if not p.is_absolute() and self.root is not None:
            p = self.root / p
        return p

    def save(self, folder: str | Path, info: Mapping[str, Any] | None = None) -> Path:
        """Write ``items.jsonl`` and then ``dataset.json`` (the completion marker), atomically."""
        folder = Path(folder)
        write_jsonl_atomic(folder / ITEMS_FILE, (it.to_dict() for it in self.items))
        meta = {"name": self.name, **self.info, **(info or {}), "counts": self.counts()}
        write_json_atomic(folder / DATASET_FILE, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> PairedDataset:
        """Read a dataset folder written by :meth:`save`."""
        folder = Path(folder)
        meta_path = folder / DATASET_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: {folder} is not a built dataset "
                                    "folder "
                                    "(expected dataset.json and items.jsonl)")
        meta = read_json(meta_path)
        items = [Item.from_dict(d) for d in read_jsonl(folder / ITEMS_FILE)]
        return cls(meta.get("name", folder.name), items, root=folder, info=meta)
