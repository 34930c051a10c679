"""CUB-200-2011 (Wah et al. 2011) in its published layout.

Layout: ``<root>/CUB_200_2011/`` with ``images.txt`` (``id relpath``), ``image_class_labels.txt``
(``id class``), ``classes.txt`` (``class 001.Black_footed_Albatross``),
``train_test_split.txt`` (``id 1|0``, 1 = train) and ``images/<relpath>``.

Protocol (Cross the Gap): image -> image over all 11,788 images, the query removed from its own
gallery; relevant = same species. Items keep the official train/test split in ``Item.split``.

Examples:
    >>> CUB_RETRIEVAL.exclude_self
    True
"""

from __future__ import annotations

from pathlib import Path

from modalign.data.benchmarks.base import (
    Benchmark,
    RetrievalProtocol,
    Side,
    find_dataset_dir,
    labelled_benchmark,
    read_text_lines,
)

CUB_FOLDER = "CUB_200_2011"
CUB_RETRIEVAL = RetrievalProtocol("image-to-image", query=Side("image"), gallery=Side("image"),
                                  exclude_self=True)


def _id_table(path: Path, what: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for line in read_text_lines(path, what):
        key, _, value = line.partition(" ")
        if not value:
            raise ValueError(f"{path}: line {line!r}: expected 'id value'")
        table[key] = value.strip()
    return table


def load_cub(root: str | Path, check_files: bool = True) -> Benchmark:
    """Load CUB-200-2011 from ``root`` (the folder holding ``CUB_200_2011/``).

    A missing folder or list file raises ``FileNotFoundError`` naming where it was expected.

    Examples:
        >>> cub = load_cub("/data")  # doctest: +SKIP
        >>> len(cub.classnames), cub.classnames[0]  # doctest: +SKIP
        (200, 'Black footed Albatross')
    """
    folder = find_dataset_dir(root, (CUB_FOLDER,), "cub2011")
    images = _id_table(folder / "images.txt", "CUB image list")
    labels = _id_table(folder / "image_class_labels.txt", "CUB class labels")
    classes = _id_table(folder / "classes.txt", "CUB class list")
    is_train = _id_table(folder / "train_test_split.txt", "CUB train/test split")
    class_ids = sorted(classes, key=int)
    index = {c: i for i, c in enumerate(class_ids)}
    # "001.Black_footed_Albatross" -> "Black footed Albatross"
    classnames = [classes[c].split(".", 1)[-1].replace("_", " ") for c in class_ids]
    rows = []
    for image_id, rel in sorted(images.items(), key=lambda kv: int(kv[0])):
        if image_id not in labels or labels[image_id] not in index:
            raise ValueError(f"{folder / 'image_class_labels.txt'}: no valid class for image "
                             f"{image_id}")
        split = "train" if is_train.get(image_id) == "1" else "test"
        rows.append((f"images/{rel}", index[labels[image_id]], split, "image"))
    return labelled_benchmark("cub2011", folder, rows, classnames,
                              {"image-to-image": CUB_RETRIEVAL}, check=check_files)
