"""Readable names for datasets and models, taken from where they live.

A manifest called ``manifest.csv`` (or ``pairs.csv``, ``data.jsonl``, ...) says nothing; its folder
does. A trained model is the folder ``RUN/model``; the run's name is ``RUN``. Records, tables,
store folders and reports use these names.
"""

from __future__ import annotations

from pathlib import Path

GENERIC_STEMS = frozenset({"manifest", "pairs", "data", "dataset", "metadata", "index", "train",
                           "test", "val", "all", "items", "captions", "annotations"})


def dataset_name(data: str | Path) -> str:
    """A readable dataset name: the file stem, or its folder when the stem is generic.

    Examples:
        >>> dataset_name("shop/photos/manifest.csv"), dataset_name("birds.jsonl")
        ('photos', 'birds')
        >>> dataset_name("emoji:limit=50")
        'emoji:limit=50'
    """
    p = Path(data)
    if p.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        return p.name or str(data)
    if p.stem.lower() in GENERIC_STEMS:
        return p.parent.name or p.resolve().parent.name or p.stem
    return p.stem


def model_name(model: str | Path) -> str:
    """A readable model name: the run folder for ``RUN/model``, else the folder name.

    Examples:
        >>> model_name("runs/cua/model"), model_name("hf-clip:/models/clip-vit-b32")
        ('cua', 'clip-vit-b32')
    """
    p = Path(str(model).rstrip("/"))
    if p.name == "model" and p.parent.name:
        return p.parent.name
    return p.name or str(model)
