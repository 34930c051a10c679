"""Stanford Online Products (Oh Song et al. 2016) in its published layout.

Layout: ``<root>/Stanford_Online_Products/`` with ``Ebay_train.txt`` and ``Ebay_test.txt`` (a header
line ``image_id class_id super_class_id path``, then one image per line) and the images at the
listed relative paths (``bicycle_final/111085122871_0.JPG``).

Protocol (Cross the Gap): image -> image within ``Ebay_test`` (60,502 images, 11,316 products), the
query removed from its own gallery; relevant = same product (``class_id``).

Examples:
    >>> SOP_RETRIEVAL.query.split, SOP_RETRIEVAL.exclude_self
    ('test', True)
"""

from __future__ import annotations

from pathlib import Path

from modalign.data.benchmarks.base import (
    Benchmark,
    RetrievalProtocol,
    Side,
    check_files,
    find_dataset_dir,
    read_text_lines,
)
from modalign.data.dataset import Item, PairedDataset

SOP_RETRIEVAL = RetrievalProtocol("image-to-image", query=Side("image", "test"),
                                  gallery=Side("image", "test"), exclude_self=True)
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]
SOP_FOLDER = "Stanford_Online_Products"


def load_sop(root: str | Path, check_files_exist: bool = True) -> Benchmark:
    """Load Stanford Online Products from ``root`` (holding ``Stanford_Online_Products/``).

    A missing folder or list file raises ``FileNotFoundError`` naming where it was expected.

    Examples:
        >>> sop = load_sop("/data")  # doctest: +SKIP
        >>> sop.dataset.items[0].labels["category"]  # doctest: +SKIP
        'bicycle'
    """
    folder = find_dataset_dir(root, (SOP_FOLDER,), "sop")
    items: list[Item] = []
    for split, fname in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = folder / fname
        lines = read_text_lines(path, f"SOP {split} list")
        if not lines or lines[0].split() != SOP_HEADER:
            raise ValueError(f"{path}: expected the header line {' '.join(SOP_HEADER)!r}")
        for line in lines[1:]:
            parts = line.split()
            if len(parts) != 4:
                raise ValueError(
                    f"{path}: line {line!r}: expected 4 fields ({' '.join(SOP_HEADER)})")
            image_id, class_id, super_id, rel = parts
            category = rel.split("/", 1)[0].removesuffix("_final")
            items.append(Item(f"sop:{image_id}", "image", "image", rel, f"product:{class_id}",
                              split, {"class": class_id, "super_class": super_id,
                                      "category": category}))
    if check_files_exist:
        check_files(folder, [it.value for it in items], "SOP images")
    ds = PairedDataset("sop", items, root=folder, info={"benchmark": "sop"})
    return Benchmark("sop", ds, {"image-to-image": SOP_RETRIEVAL})
