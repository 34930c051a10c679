"""The CLIP_benchmark task set, with its metric keys, on the datasets users already have.

- ``zeroshot_classification`` on the CoOp datasets (test split; ImageNet: val):
  ``acc1``, ``acc5``, ``mean_per_class_recall``. Prompts: the 80 OpenAI templates for ImageNet,
  the dataset's CoOp template elsewhere (recorded in each record; CLIP_benchmark ships its own
  per-dataset lists, so expect small differences there).
- ``zeroshot_retrieval`` on COCO and Flickr30k (Karpathy test: 5,000 / 1,000 images, 5 captions
  each): ``image_retrieval_recall@K`` (text -> image) and ``text_retrieval_recall@K``
  (image -> text), counted CLIP-style (a hit when any relevant item is in the top K).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modalign.data.benchmarks import (
    CLASSIFICATION_BENCHMARKS,
    OPENAI_IMAGENET_TEMPLATES,
    load_benchmark,
)
from modalign.data.dataset import PairedDataset
from modalign.distributed.runtime import process_rank
from modalign.encoders.base import Encoder
from modalign.reproduce.extract import extract_embeddings
from modalign.reproduce.models import ResolvedModel
from modalign.reproduce.records import protocol_record
from modalign.reproduce.scoring import class_prototypes_for, score_retrieval, zero_shot_scores

SUITE = "clip-benchmark"
RETRIEVAL_DATASETS: tuple[str, ...] = ("coco", "flickr30k")
DATASETS: tuple[str, ...] = (*CLASSIFICATION_BENCHMARKS, *RETRIEVAL_DATASETS)
RECALL_K: tuple[int, ...] = (1, 5, 10)


def run_clip_benchmark(model: ResolvedModel, towers: dict[str, Encoder], data_root: str | Path,
                       out_dir: str | Path, datasets: tuple[str, ...], *,
                       batch_size: int = 256, device: str = "cpu",
                       progress: bool = True) -> list[dict[str, Any]]:
    """Run the zero-shot classification and retrieval tasks on ``datasets``."""
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
        raise ValueError(f"datasets: unknown {unknown or 'none given'}; expected some of "
                         f"{', '.join(DATASETS)}")
    records: list[dict[str, Any]] = []
    for name in datasets:
        bench = load_benchmark(name, data_root)
        ds = bench.dataset
        split = bench.classification_split or "test"
        items = ds.select(split=split)
        modalities = ["image"] if name in CLASSIFICATION_BENCHMARKS else ["image", "text"]
        sub = PairedDataset(name, items, root=ds.root, info=ds.info)
        store = extract_embeddings(sub, {m: towers[m] for m in modalities},
                                   Path(out_dir) / "embeddings" / f"{name}-{split}",
                                   batch_size=batch_size, device=device, progress=progress)
        if process_rank()[0] != 0:
            continue
        if name in CLASSIFICATION_BENCHMARKS:
            templates = OPENAI_IMAGENET_TEMPLATES if name == "imagenet" else bench.templates
            images = store.load("image")
            protos = class_prototypes_for(towers["text"], bench.classnames, templates,
                                          device=device)
            metrics = zero_shot_scores(images, protos, bench.classnames)
            records.append(protocol_record(
                suite=SUITE, dataset=name, task="zeroshot_classification", method="native",
                model=model, split=split, metrics=metrics, counts={"images": len(images),
                                                                   "classes": len(protos)},
                protocol={"templates": list(templates)}))
            continue
        image, text = store.load("image"), store.load("text")
        metrics = {}
        for proto_name, q, g, key in (("text-to-image", text, image, "image_retrieval"),
                                      ("image-to-text", image, text, "text_retrieval")):
            got = score_retrieval(bench.protocols[proto_name], q, g, device=device)
            metrics.update({f"{key}_recall@{k}": got[f"recall@{k}"] for k in RECALL_K})
        records.append(protocol_record(
            suite=SUITE, dataset=name, task="zeroshot_retrieval", method="native", model=model,
            split=split, metrics=metrics, counts={"images": len(image), "captions": len(text)},
            protocol={"recall": "CLIP-style: any relevant item in the top K"}))
    return records
