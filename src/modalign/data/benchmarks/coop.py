"""The eleven few-shot classification datasets in the CoOp layout (``split_zhou_<Name>.json``).

Each dataset sits in its own folder under the data root (or under ``<root>/CoOp/``), laid out as
CoOp's ``DATASETS.md`` describes. Nine use a split file ``{"train"|"val"|"test": [[path, label,
classname], ...]}`` with paths relative to the image folder; FGVC-Aircraft uses its own
``variants.txt`` and ``images_variant_<split>.txt``; ImageNet uses ``classnames.txt`` (``wnid name``
lines) and class folders under ``images/train`` and ``images/val`` (val images form the ``test``
split, as in CoOp).

Protocols: image -> image retrieval with CoOp test queries against the CoOp train gallery
(relevant = same class), and zero-shot classification on the test split.

Examples:
    >>> sorted(COOP_LAYOUTS)[:3]
    ['caltech101', 'dtd', 'eurosat']
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign.data.benchmarks.base import (
    Benchmark,
    RetrievalProtocol,
    Side,
    check_name,
    find_dataset_dir,
    labelled_benchmark,
    read_text_lines,
    require_file,
)
from modalign.data.benchmarks.templates import COOP_TEMPLATES
from modalign.io import read_json

IMAGE_VIEW = "image"
SPLIT_NAMES = {"train": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class CoopLayout:
    """Where one CoOp dataset keeps its images and split file."""

    folder: str
    image_dir: str
    split_file: str | None


COOP_LAYOUTS: dict[str, CoopLayout] = {
    "caltech101": CoopLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "dtd": CoopLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": CoopLayout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "fgvc_aircraft": CoopLayout("fgvc_aircraft", "images", None),
    "food101": CoopLayout("food-101", "images", "split_zhou_Food101.json"),
    "imagenet": CoopLayout("imagenet", "images", None),
    "oxford_flowers": CoopLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "oxford_pets": CoopLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": CoopLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": CoopLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "ucf101": CoopLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}

COOP_RETRIEVAL = RetrievalProtocol(
    "image-to-image", query=Side("image", "test"), gallery=Side("image", "train"),
    exclude_self=False)

Row = tuple[str, int, str, str]


def load_coop(name: str, root: str | Path, check_files: bool = True) -> Benchmark:
    """Load CoOp dataset ``name`` from ``root`` (the folder holding ``caltech-101/``, ...).

    Args:
        name: a key of :data:`COOP_LAYOUTS`.
        root: the data root.
        check_files: check that every listed image exists (one ``stat`` per image).

    Examples:
        >>> pets = load_coop("oxford_pets", "/data")  # doctest: +SKIP
        >>> pets.prompts()[0][0]  # doctest: +SKIP
        'a photo of a abyssinian, a type of pet.'
    """
    layout = COOP_LAYOUTS[check_name(name, COOP_LAYOUTS)]
    folder = find_dataset_dir(root, (layout.folder,), f"{name} (CoOp layout)")
    if name == "fgvc_aircraft":
        rows, classnames = _aircraft_rows(folder, layout)
    elif name == "imagenet":
        rows, classnames = _imagenet_rows(folder, layout)
        check_files = False  # rows were listed from the folders themselves
    else:
        assert layout.split_file is not None
        rows, classnames = _split_file_rows(folder, layout, layout.split_file)
    return labelled_benchmark(
        name, folder, rows, classnames, {"image-to-image": COOP_RETRIEVAL},
        templates=(COOP_TEMPLATES[name],), classification_split="test", check=check_files)


def _split_file_rows(folder: Path, layout: CoopLayout,
                     split_file: str) -> tuple[list[Row], list[str]]:
    path = require_file(folder / split_file, "CoOp split file")
    data: Any = read_json(path)
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise ValueError(f"{path}: expected a JSON object with 'train', 'val' and 'test' lists")
    names: dict[int, str] = {}
    rows: list[Row] = []
    for split, entries in data.items():
        if split not in SPLIT_NAMES:
            continue
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ValueError(
                    f"{path}: {split} entry {entry!r}: expected [path, label, classname]")
            rel, label, cname = str(entry[0]), int(entry[1]), str(entry[2])
            if names.setdefault(label, cname) != cname:
                raise ValueError(
                    f"{path}: label {label} is named both {names[label]!r} and {cname!r}")
            rows.append((os.path.join(layout.image_dir, rel) if layout.image_dir else rel,
                         label, SPLIT_NAMES[split], IMAGE_VIEW))
    return rows, _ordered_names(names, path)


def _ordered_names(names: dict[int, str], path: Path) -> list[str]:
    if sorted(names) != list(range(len(names))):
        raise ValueError(
            f"{path}: labels must be 0..C-1 without gaps, found {sorted(names)[:10]}...")
    return [names[i] for i in range(len(names))]


def _aircraft_rows(folder: Path, layout: CoopLayout) -> tuple[list[Row], list[str]]:
    classnames = read_text_lines(folder / "variants.txt", "FGVC-Aircraft class list")
    index = {c: i for i, c in enumerate(classnames)}
    rows: list[Row] = []
    for split in ("train", "val", "test"):
        path = folder / f"images_variant_{split}.txt"
        for line in read_text_lines(path, f"FGVC-Aircraft {split} list"):
            image, _, variant = line.partition(" ")
            if variant not in index:
                raise ValueError(f"{path}: variant {variant!r} is not in variants.txt")
            rows.append((f"{layout.image_dir}/{image}.jpg", index[variant], split, IMAGE_VIEW))
    return rows, classnames


def _imagenet_rows(folder: Path, layout: CoopLayout) -> tuple[list[Row], list[str]]:
    names: dict[str, str] = {}
    for line in read_text_lines(folder / "classnames.txt", "ImageNet class names"):
        wnid, _, cname = line.partition(" ")
        names[wnid] = cname.strip()
    rows: list[Row] = []
    wnids = sorted(names)
    label_of = {w: i for i, w in enumerate(wnids)}
    for sub, split in (("train", "train"), ("val", "test")):
        split_dir = require_file(folder / layout.image_dir / sub, f"ImageNet {sub} folder")
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            if entry.name not in label_of:
                raise ValueError(
                    f"{entry.path}: class folder {entry.name!r} is not in classnames.txt")
            for f in sorted(os.listdir(entry.path)):
                rows.append((f"{layout.image_dir}/{sub}/{entry.name}/{f}", label_of[entry.name],
                             split, IMAGE_VIEW))
    return rows, [names[w] for w in wnids]
