"""Contrastive-gap metrics on COCO (Fahim, Murphy & Fyshe 2024, "It's Not a Modality Gap").

The pairs are the images of a Karpathy split of COCO (``val``: 5,000 images, as in the paper's
evaluation) with their first caption. Measured on L2-normalised embeddings:

- ``mean_positive_cosine``: mean cosine of the image-caption pairs;
- ``centroid_distance``: ``||mean(X) - mean(Y)||`` (centroids not renormalised), and
  ``centroid_cosine``;
- ``linear_separability``: held-out accuracy of a logistic regression telling images from
  captions (80 % train, seeded);
- ``uniformity``: ``0.5 U(X) + 0.5 U(Y)``, ``U = log mean_{i<j} exp(-2 ||a_i - a_j||^2)``;
  ``alignment``: ``mean ||x_i - y_i||^2``; ``cross_uniformity`` over non-paired image-caption
  pairs;
- ``image_to_text_r@1`` and ``text_to_image_r@1`` over the one-to-one pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modalign.data.benchmarks import load_karpathy
from modalign.data.benchmarks.karpathy import FIRST_CAPTION
from modalign.data.dataset import PairedDataset
from modalign.distributed.runtime import process_rank
from modalign.encoders.base import Encoder
from modalign.evaluate.metrics import retrieval_metrics
from modalign.geometry.gap import modality_gap
from modalign.geometry.separability import linear_separability
from modalign.geometry.uniformity import alignment, cross_uniformity, uniformity
from modalign.reproduce.extract import extract_embeddings
from modalign.reproduce.models import ResolvedModel
from modalign.reproduce.records import protocol_record
from modalign.reproduce.scoring import unit_rows

SUITE = "contrastive-gap"


def gap_metrics(images: torch.Tensor, texts: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """The contrastive-gap metrics of paired rows ``images[i]`` <-> ``texts[i]``.

    Examples:
        >>> x = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
        >>> m = gap_metrics(x, x)
        >>> round(m["mean_positive_cosine"], 6), m["centroid_distance"], m["image_to_text_r@1"]
        (1.0, 0.0, 1.0)
    """
    if images.shape != texts.shape:
        raise ValueError(f"images {tuple(images.shape)} and texts {tuple(texts.shape)}: expected "
                         "paired rows of the same shape")
    x, y = unit_rows(images), unit_rows(texts)
    xn, yn = x.double().numpy(), y.double().numpy()
    gap = modality_gap(xn, yn)
    ids = torch.arange(len(x))
    i2t = retrieval_metrics(x, y, ids, ids, k_values=(1,)).metrics["recall@1"]
    t2i = retrieval_metrics(y, x, ids, ids, k_values=(1,)).metrics["recall@1"]
    return {
        "mean_positive_cosine": float((x * y).sum(-1).mean()),
        "centroid_distance": gap.centroid_distance,
        "centroid_cosine": gap.centroid_cosine,
        "linear_separability": float(linear_separability(xn, yn, seed=seed)["accuracy"]),
        "uniformity": 0.5 * uniformity(xn, seed=seed) + 0.5 * uniformity(yn, seed=seed),
        "alignment": alignment(xn, yn),
        "cross_uniformity": cross_uniformity(xn, yn, seed=seed),
        "image_to_text_r@1": i2t,
        "text_to_image_r@1": t2i,
    }


def run_contrastive_gap(model: ResolvedModel, towers: dict[str, Encoder],
                        data_root: str | Path, out_dir: str | Path, *, split: str = "val",
                        max_pairs: int | None = None, batch_size: int = 256,
                        device: str = "cpu", seed: int = 0,
                        progress: bool = True) -> list[dict[str, Any]]:
    """Embed the COCO ``split`` pairs (image, first caption) and measure the gap metrics."""
    bench = load_karpathy("coco", data_root)
    ds = bench.dataset
    images = ds.select(modality="image", split=split)
    if not images:
        raise ValueError(f"split={split!r}: COCO has no images in that Karpathy split")
    images = images[:max_pairs] if max_pairs else images
    keep = {it.group for it in images}
    texts = [it for it in ds.select(modality="text", view=FIRST_CAPTION, split=split)
             if it.group in keep]
    sub = PairedDataset("coco", images + texts, root=ds.root, info=ds.info)
    store = extract_embeddings(sub, {"image": towers["image"], "text": towers["text"]},
                               Path(out_dir) / "embeddings" / "coco-gap", batch_size=batch_size,
                               device=device, progress=progress)
    if process_rank()[0] != 0:
        return []
    img, txt = store.load("image"), store.load("text")
    order = {g: i for i, g in enumerate(it["group"] for it in img.items)}
    txt_rows = sorted(range(len(txt)), key=lambda j: order[txt.items[j]["group"]])
    metrics = gap_metrics(unit_rows(img.vectors), unit_rows(txt.vectors[txt_rows]), seed=seed)
    return [protocol_record(suite=SUITE, dataset="coco", task="gap-metrics", method="native",
                            model=model, split=split, metrics=metrics, seed=seed,
                            counts={"pairs": len(img)},
                            protocol={"pairs": "image + first caption", "normalized": True,
                                      "separability_train_fraction": 0.8})]
