"""The field's standard benchmarks, read from local folders in their published layouts.

Nothing is downloaded: each loader reads the files a user already has and fails with a message
naming the file it expected where. Every loader returns a :class:`Benchmark`: a
:class:`~modalign.data.PairedDataset` plus the protocol metadata (query and gallery sides, whether
the query leaves its own gallery, class names, prompt templates, the revisited ground truth).

Examples:
    >>> "coco" in BENCHMARKS and "imagenet" in BENCHMARKS
    True
    >>> load_benchmark("pets", "/data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    modalign.errors.ModalignError: name='pets': expected one of 20newsgroups, caltech101, coco, ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path

from modalign.data.benchmarks.base import (
    Benchmark,
    RetrievalProtocol,
    RevisitedGroundTruth,
    Side,
    check_name,
)
from modalign.data.benchmarks.coop import COOP_LAYOUTS, load_coop
from modalign.data.benchmarks.cub import CUB_FOLDER, load_cub
from modalign.data.benchmarks.karpathy import KARPATHY_LAYOUTS, load_karpathy
from modalign.data.benchmarks.nocaps import NOCAPS_FOLDER, load_nocaps
from modalign.data.benchmarks.revisited import (
    REVISITED,
    convert_ground_truth,
    load_revisited,
    read_ground_truth,
)
from modalign.data.benchmarks.sop import SOP_FOLDER, load_sop
from modalign.data.benchmarks.summaries import (
    PlainUnpickler,
    convert_summaries,
    read_summaries,
)
from modalign.data.benchmarks.templates import (
    COOP_TEMPLATES,
    INVERSION_TEMPLATE,
    OPENAI_IMAGENET_TEMPLATES,
)
from modalign.data.benchmarks.textual import (
    NANOBEIR,
    TEXTUAL_BENCHMARKS,
    TEXTUAL_FOLDERS,
    load_imdb,
    load_nanobeir,
    load_newsgroups,
)

Loader = Callable[[Path], Benchmark]


def _registry() -> dict[str, Loader]:
    reg: dict[str, Loader] = {}
    for name in KARPATHY_LAYOUTS:
        reg[name] = functools.partial(load_karpathy, name)
    reg["nocaps"] = load_nocaps
    reg["cub2011"] = load_cub
    reg["sop"] = load_sop
    for name in REVISITED:
        reg[name] = functools.partial(load_revisited, name)
    for name in COOP_LAYOUTS:
        reg[name] = functools.partial(load_coop, name)
    reg["imdb"] = load_imdb
    reg["20newsgroups"] = load_newsgroups
    for name in NANOBEIR:
        reg[name] = functools.partial(load_nanobeir, name)
    return dict(sorted(reg.items()))


BENCHMARKS: dict[str, Loader] = _registry()
CAPTION_BENCHMARKS: tuple[str, ...] = ("coco", "flickr30k", "nocaps")
CLASSIFICATION_BENCHMARKS: tuple[str, ...] = tuple(sorted(COOP_LAYOUTS))


def benchmark_folder(name: str) -> str:
    """The folder name benchmark ``name`` lives in under the data root.

    Examples:
        >>> benchmark_folder("caltech101"), benchmark_folder("cub2011")
        ('caltech-101', 'CUB_200_2011')
    """
    check_name(name, BENCHMARKS)
    if name in COOP_LAYOUTS:
        return COOP_LAYOUTS[name].folder
    if name in KARPATHY_LAYOUTS:
        return KARPATHY_LAYOUTS[name].folder
    folders = {"nocaps": NOCAPS_FOLDER, "cub2011": CUB_FOLDER, "sop": SOP_FOLDER,
               **{n: n for n in REVISITED}, **TEXTUAL_FOLDERS}
    return folders[name]


def available_benchmarks(root: str | Path, names: Iterable[str] | None = None) -> list[str]:
    """The benchmarks (of ``names``, default all) whose folder exists under ``root``.

    A folder may sit directly under ``root`` or under ``root/CoOp``.
    """
    root = Path(root).expanduser()
    return [n for n in (names if names is not None else BENCHMARKS)
            if any((base / benchmark_folder(n)).is_dir() for base in (root, root / "CoOp"))]


def load_benchmark(name: str, root: str | Path) -> Benchmark:
    """Load benchmark ``name`` (a key of :data:`BENCHMARKS`) from the data root ``root``."""
    return BENCHMARKS[check_name(name, BENCHMARKS)](Path(root))


__all__ = [
    "BENCHMARKS",
    "CAPTION_BENCHMARKS",
    "CLASSIFICATION_BENCHMARKS",
    "COOP_TEMPLATES",
    "INVERSION_TEMPLATE",
    "NANOBEIR",
    "OPENAI_IMAGENET_TEMPLATES",
    "TEXTUAL_BENCHMARKS",
    "Benchmark",
    "PlainUnpickler",
    "RetrievalProtocol",
    "RevisitedGroundTruth",
    "Side",
    "available_benchmarks",
    "benchmark_folder",
    "convert_ground_truth",
    "convert_summaries",
    "load_benchmark",
    "load_coop",
    "load_cub",
    "load_imdb",
    "load_karpathy",
    "load_nanobeir",
    "load_newsgroups",
    "load_nocaps",
    "load_revisited",
    "load_sop",
    "read_ground_truth",
    "read_summaries",
]
