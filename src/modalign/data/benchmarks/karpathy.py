"""COCO and Flickr30k with Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``).

Layout (Karpathy & Fei-Fei 2015 splits, the file every captioning/retrieval paper uses):

- COCO: ``<root>/coco/dataset_coco.json`` and the images at ``<root>/coco/<filepath>/<filename>``
  (``filepath`` is ``train2014`` or ``val2014`` in the split file).
- Flickr30k: ``<root>/flickr30k/dataset_flickr30k.json`` and the images at
  ``<root>/flickr30k/flickr30k-images/<filename>``.

The split file is ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}], ...}]}``;
``restval`` counts as ``train``. Each image is one group: the image item and its captions. The first
caption has view ``first-caption``, the others ``caption``.

Protocols: ``text-to-text`` (Cross the Gap: the first caption of each image queries the remaining
captions; relevant = same image; COCO on test, Flickr30k on val), ``image-to-text`` and
``text-to-image`` on the test split (CLIP_benchmark).

Examples:
    >>> sorted(KARPATHY_LAYOUTS)
    ['coco', 'flickr30k']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign.data.benchmarks.base import (
    Benchmark,
    RetrievalProtocol,
    Side,
    check_files,
    check_name,
    find_dataset_dir,
    require_file,
)
from modalign.data.dataset import Item, PairedDataset
from modalign.io import read_json

FIRST_CAPTION = "first-caption"
CAPTION = "caption"
IMAGE_VIEW = "image"
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class KarpathyLayout:
    """Folder, split file and image folder of one Karpathy-split dataset."""

    folder: str
    split_file: str
    image_dir: str
    text_split: str


KARPATHY_LAYOUTS: dict[str, KarpathyLayout] = {
    "coco": KarpathyLayout("coco", "dataset_coco.json", "", "test"),
    "flickr30k": KarpathyLayout("flickr30k", "dataset_flickr30k.json", "flickr30k-images", "val"),
}


def caption_protocols(text_split: str,
                      retrieval_split: str = "test") -> dict[str, RetrievalProtocol]:
    """The caption-dataset protocols: first caption -> other captions, and image <-> text."""
    return {
        "text-to-text": RetrievalProtocol(
            "text-to-text", query=Side("text", text_split, (FIRST_CAPTION,)),
            gallery=Side("text", text_split, (CAPTION,))),
        "image-to-text": RetrievalProtocol(
            "image-to-text", query=Side("image", retrieval_split),
            gallery=Side("text", retrieval_split)),
        "text-to-image": RetrievalProtocol(
            "text-to-image", query=Side("text", retrieval_split),
            gallery=Side("image", retrieval_split)),
    }


def caption_items(name: str, image_key: str, image_path: str, captions: Sequence[str],
                  split: str, with_image: bool = True) -> list[Item]:
    """The items of one captioned image: the image (optional) and its captions (first marked)."""
    labels = {"image": image_key}
    items = [Item(f"{name}:image:{image_key}", "image", IMAGE_VIEW, image_path, image_key, split,
                  labels)] if with_image else []
    items += [Item(f"{name}:text:{image_key}:{k}", "text", FIRST_CAPTION if k == 0 else CAPTION,
                   text, image_key, split, labels)
              for k, text in enumerate(captions)]
    return items


def load_karpathy(name: str, root: str | Path, with_images: bool = True,
                  check_files_exist: bool = True) -> Benchmark:
    """Load COCO or Flickr30k with the Karpathy splits from ``root``.

    Args:
        name: ``"coco"`` or ``"flickr30k"``.
        root: the data root holding ``coco/`` or ``flickr30k/``.
        with_images: include the image items (text-to-text retrieval needs only the captions).
        check_files_exist: check that every image file exists.

    Examples:
        >>> coco = load_karpathy("coco", "/data", with_images=False)  # doctest: +SKIP
        >>> coco.protocols["text-to-text"].query.describe()  # doctest: +SKIP
        'text[test; first-caption]'
    """
    layout = KARPATHY_LAYOUTS[check_name(name, KARPATHY_LAYOUTS)]
    folder = find_dataset_dir(root, (layout.folder,), f"{name} (Karpathy split layout)")
    path = require_file(folder / layout.split_file, "Karpathy split file")
    data: Any = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected a JSON object with an 'images' list")
    items: list[Item] = []
    for k, entry in enumerate(data["images"]):
        try:
            split = KARPATHY_SPLITS[entry["split"]]
            filename = entry["filename"]
            captions = [s["raw"].strip() for s in entry["sentences"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: images[{k}] lacks {e}; expected filename, split, "
                             "sentences[].raw") from None
        sub = entry.get("filepath") or layout.image_dir
        rel = f"{sub}/{filename}" if sub else filename
        key = str(entry.get("cocoid", entry.get("imgid", Path(filename).stem)))
        items += caption_items(name, key, rel, captions, split, with_image=with_images)
    if with_images and check_files_exist:
        check_files(folder, [it.value for it in items if it.modality == "image"], f"{name} images")
    ds = PairedDataset(name, items, root=folder, info={"benchmark": name})
    return Benchmark(name, ds, caption_protocols(layout.text_split))
