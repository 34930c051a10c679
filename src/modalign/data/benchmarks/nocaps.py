"""nocaps validation (Agrawal et al. 2019): ``nocaps_val_4500_captions.json``, COCO format.

Layout: ``<root>/nocaps/nocaps_val_4500_captions.json`` (``{"images": [{"id", "file_name"}],
"annotations": [{"image_id", "caption"}]}``) and the images at ``<root>/nocaps/val/<file_name>``.
All 4,500 images form the ``test`` split; each has 10 captions, kept in the order of the
annotation list (as the official Cross the Gap loader keeps them: the first one listed for an
image is its query), not sorted by annotation id.

Protocols: ``text-to-text`` (first caption -> the other captions, relevant = same image) and
image <-> text retrieval.

Examples:
    >>> NOCAPS_FILE
    'nocaps_val_4500_captions.json'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modalign.data.benchmarks.base import Benchmark, check_files, find_dataset_dir, require_file
from modalign.data.benchmarks.karpathy import caption_items, caption_protocols
from modalign.data.dataset import Item, PairedDataset
from modalign.io import read_json

NOCAPS_FOLDER = "nocaps"
NOCAPS_FILE = "nocaps_val_4500_captions.json"
NOCAPS_IMAGE_DIR = "val"


def load_nocaps(root: str | Path, with_images: bool = True,
                check_files_exist: bool = True) -> Benchmark:
    """Load nocaps validation from ``root`` (the folder holding ``nocaps/``).

    A missing folder or caption file raises ``FileNotFoundError`` naming where it was expected.

    Examples:
        >>> nocaps = load_nocaps("/data", with_images=False)  # doctest: +SKIP
        >>> sorted(nocaps.protocols)  # doctest: +SKIP
        ['image-to-text', 'text-to-image', 'text-to-text']
    """
    folder = find_dataset_dir(root, (NOCAPS_FOLDER,), "nocaps")
    path = require_file(folder / NOCAPS_FILE, "nocaps caption file")
    data: Any = read_json(path)
    try:
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        captions: dict[int, list[str]] = {i: [] for i in images}
        for ann in data["annotations"]:  # file order: the first listed is the query
            captions[int(ann["image_id"])].append(str(ann["caption"]).strip())
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: missing {e}; expected images[].id/file_name and "
                         "annotations[].image_id/caption") from None
    items: list[Item] = []
    for image_id, file_name in images.items():
        items += caption_items("nocaps", str(image_id), f"{NOCAPS_IMAGE_DIR}/{file_name}",
                               captions[image_id], "test", with_image=with_images)
    if with_images and check_files_exist:
        check_files(folder, [it.value for it in items if it.modality == "image"], "nocaps images")
    ds = PairedDataset("nocaps", items, root=folder, info={"benchmark": "nocaps"})
    return Benchmark("nocaps", ds, caption_protocols("test"))
