"""The Cross the Gap protocol (Mistretta et al., ICLR 2025) on the standard datasets.

For each dataset:

- image datasets (CUB, SOP, ROxford5k, RParis6k, the 11 CoOp sets): image -> image retrieval with
  native image queries ("Orig") and with OTI queries (each query image inverted to a text-tower
  feature), both against the native image gallery; mAP over the full ranking;
- caption datasets (COCO, Flickr30k, nocaps): text -> text retrieval, the first caption of each
  image querying the other captions, native vs OVI queries (each query caption inverted to an
  image-tower feature);
- purely textual sets (IMDB, 20 Newsgroups, 7 NanoBEIR sets): short queries against documents
  (or their summaries), native vs OVI queries;
- the 11 CoOp sets also get zero-shot classification three ways: image features vs class-prompt
  text features (inter-modal, the usual CLIP), OTI features of the images vs the same prompts
  (text-text), and image features vs OVI-inverted prompts "a photo of {class}" (image-image).

Only the queries are inverted; galleries and prompts keep native features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign.data.benchmarks import (
    CAPTION_BENCHMARKS,
    CLASSIFICATION_BENCHMARKS,
    TEXTUAL_BENCHMARKS,
    Benchmark,
    load_benchmark,
    load_karpathy,
    load_nocaps,
)
from modalign.data.dataset import PairedDataset
from modalign.distributed.runtime import process_rank
from modalign.embed import Embeddings, EmbeddingStore
from modalign.embed.store import evenly_spaced
from modalign.encoders.base import Encoder
from modalign.reproduce.extract import extract_embeddings
from modalign.reproduce.inversion import InversionPlan, invert_stored
from modalign.reproduce.models import ResolvedModel
from modalign.reproduce.records import RecordBook, protocol_record
from modalign.reproduce.scoring import (
    class_prototypes_for,
    encode_texts,
    score_retrieval,
    zero_shot_scores,
)

SUITE = "cross-the-gap"
IMAGE_DATASETS: tuple[str, ...] = ("cub2011", "sop", "roxford5k", "rparis6k",
                                   *CLASSIFICATION_BENCHMARKS)
TEXT_DATASETS: tuple[str, ...] = CAPTION_BENCHMARKS + TEXTUAL_BENCHMARKS
DATASETS: tuple[str, ...] = IMAGE_DATASETS + TEXT_DATASETS
METHODS: tuple[str, ...] = ("native", "inversion")


@dataclass(frozen=True)
class CrossTheGapConfig:
    """What to run.

    Attributes:
        datasets: keys of :data:`DATASETS`.
        methods: ``"native"`` and/or ``"inversion"`` (OTI for images, OVI for captions).
        zero_shot: also run the three zero-shot classifiers on the CoOp datasets.
        oti, ovi: the inversion plans (Cross the Gap defaults: 150 / 1000 steps).
        max_queries: evenly spaced subset of the queries (None: all), for a quick look.
        batch_size: embedding batch size.
        device: ``"cuda"``, ``"cpu"``, ...
        paper_model: the published row to print beside ours (None: matched by name).
    """

    datasets: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    zero_shot: bool = True
    oti: InversionPlan = field(default_factory=lambda: InversionPlan("oti"))
    ovi: InversionPlan = field(default_factory=lambda: InversionPlan("ovi"))
    max_queries: int | None = None
    batch_size: int = 256
    device: str = "cpu"
    paper_model: str | None = None

    def __post_init__(self) -> None:
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            raise ValueError(f"datasets: unknown {unknown or 'none given'}; expected some of "
                             f"{', '.join(DATASETS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods: {bad or 'none given'}; expected native and/or inversion")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries={self.max_queries}: expected a positive integer")

    def key(self, dataset: str) -> dict[str, Any]:
        """What a dataset's records depend on (device and batch size do not count)."""
        d = asdict(self)
        for k in ("datasets", "device", "batch_size", "paper_model"):
            d.pop(k)
        return {"dataset": dataset, **d}


def load_for_protocol(name: str, data_root: str | Path) -> Benchmark:
    """Load ``name`` with only what the protocol reads (captions need no image files)."""
    if name in ("coco", "flickr30k"):
        return load_karpathy(name, data_root, with_images=False)
    if name == "nocaps":
        return load_nocaps(data_root, with_images=False)
    return load_benchmark(name, data_root)


def run_dataset(name: str, model: ResolvedModel, towers: dict[str, Encoder],
                data_root: str | Path, out_dir: str | Path, config: CrossTheGapConfig,
                progress: bool = True) -> list[dict[str, Any]]:
    """Run the protocol on one dataset; returns its records (rank 0) or [] (other ranks)."""
    bench = load_for_protocol(name, data_root)
    modality = "text" if name in TEXT_DATASETS else "image"
    task = f"{modality}-to-{modality}"
    protocol = bench.protocols[task]
    ds = bench.dataset
    chosen: dict[str, Any] = {}
    for it in protocol.query.select(ds) + protocol.gallery.select(ds):
        chosen.setdefault(it.id, it)
    sub = PairedDataset(name, list(chosen.values()), root=ds.root, info=ds.info)
    store = extract_embeddings(sub, {modality: towers[modality]},
                               Path(out_dir) / "embeddings" / name,
                               batch_size=config.batch_size, device=config.device,
                               progress=progress)
    queries = store.load(modality, view=protocol.query.views, split=protocol.query.split)
    queries = queries.subset(evenly_spaced(len(queries), config.max_queries))
    plan = config.oti if modality == "image" else config.ovi
    inverted = None
    if "inversion" in config.methods:  # every rank inverts its share
        inverted = invert_stored(store, plan.direction, queries, towers, plan,
                                 device=config.device, progress=progress)
    if process_rank()[0] != 0:
        return []
    gallery = store.load(modality, view=protocol.gallery.views, split=protocol.gallery.split)
    counts = {"queries": len(queries), "gallery": len(gallery)}
    split = f"{protocol.query.describe()} -> {protocol.gallery.describe()}"
    proto_info = {"query": protocol.query.describe(), "gallery": protocol.gallery.describe(),
                  "exclude_self": protocol.exclude_self, "relevance": protocol.relevance,
                  "distractors": ds.info.get("distractors"),
                  "gallery_text": ds.info.get("gallery_text")}

    def record(task_name: str, method: str, metrics: dict[str, float],
               inversion: dict[str, Any] | None = None) -> dict[str, Any]:
        return protocol_record(suite=SUITE, dataset=name, task=task_name, method=method,
                               model=model, split=split, protocol=proto_info, metrics=metrics,
                               counts=counts, inversion=inversion, seed=config.oti.seed)

    def score(q: Embeddings) -> dict[str, float]:
        return score_retrieval(protocol, q, gallery, revisited=bench.revisited,
                               qrels=bench.qrels, device=config.device)

    records = []
    if "native" in config.methods:
        records.append(record(task, "native", score(queries)))
    if inverted is not None:
        info = store.info(plan.direction)
        records.append(record(task, plan.direction, score(inverted),
                              {**asdict(plan), "items_per_s": info.get("items_per_s")}))
    if config.zero_shot and name in CLASSIFICATION_BENCHMARKS:
        records += _zero_shot(bench, store, queries, inverted, towers, config, record, progress)
    return records


def _zero_shot(bench: Benchmark, store: EmbeddingStore, images: Embeddings,
               oti: Embeddings | None, towers: dict[str, Encoder],
               config: CrossTheGapConfig, record: Any, progress: bool) -> list[dict[str, Any]]:
    protos = class_prototypes_for(towers["text"], bench.classnames, bench.templates,
                                  device=config.device)
    out = []
    if "native" in config.methods:
        out.append(record("zero-shot", "native",
                          zero_shot_scores(images, protos, bench.classnames)))
    if oti is not None:
        out.append(record("zero-shot", "oti", zero_shot_scores(
            images, protos, bench.classnames, override=torch.from_numpy(np.array(oti.vectors))),
            asdict(config.oti)))
    if "inversion" in config.methods:
        # the class prompts OVI inverts: the plan's template (--template; "a photo of {}")
        prompts = [config.ovi.template.format(c.replace("_", " ")) for c in bench.classnames]
        feats = encode_texts(towers["text"], prompts, device=config.device).numpy()
        rows = [{"id": f"class:{i}", "modality": "text", "view": "class-prompt", "group": c,
                 "split": "test", "labels": {"class": c, "label": str(i)}}
                for i, c in enumerate(bench.classnames)]
        ovi = invert_stored(store, "ovi-classes", Embeddings(feats, rows, {}), towers, config.ovi,
                            device=config.device, rank=0, world_size=1, progress=progress)
        assert ovi is not None  # rank 0 of one
        out.append(record("zero-shot", "ovi", zero_shot_scores(
            images, torch.from_numpy(np.array(ovi.vectors)), bench.classnames),
            asdict(config.ovi)))
    return out


def run_cross_the_gap(model: ResolvedModel, towers: dict[str, Encoder], data_root: str | Path,
                      out_dir: str | Path, config: CrossTheGapConfig,
                      progress: bool = True) -> list[dict[str, Any]]:
    """Run every dataset of ``config``; finished datasets of an earlier run are reused.

    Examples:
        >>> # from modalign.reproduce import resolve_model, load_towers
        >>> # m = resolve_model("openai/clip-vit-base-patch32")
        >>> # run_cross_the_gap(m, load_towers(m), "/data", "runs/ctg",
        >>> #                   CrossTheGapConfig(datasets=("dtd", "coco"), device="cuda"))
    """
    book = RecordBook(out_dir)
    records: list[dict[str, Any]] = []
    for name in config.datasets:
        key = {"model": model.spec, **config.key(name)}
        done = book.done(name, key)
        if done is not None:
            records += done
            continue
        got = run_dataset(name, model, towers, data_root, out_dir, config, progress)
        if process_rank()[0] == 0:
            book.save(name, key, got)
            records += got
    if process_rank()[0] == 0:
        book.finish(records)
    return records
