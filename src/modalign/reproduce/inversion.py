"""OTI and OVI over many stored features: batched, autocast on GPU, resumable, cached.

OTI (optimization-based textual inversion) turns each image feature into a text-tower feature
("a photo of £", the pseudo-token optimised so the text tower maps onto the image feature); OVI
turns each text feature into an image-tower feature (pseudo-patches). The optimisation itself is
:func:`modalign.bridge.inversion.invert`; this module feeds it stored features chunk by chunk on
the model's device, under bfloat16 autocast on CUDA (bfloat16 needs no gradient scaler), writes
each finished chunk through the store's resumable array writer so a killed run resumes, and
keeps the result as an array of the embedding store, keyed by a content hash of the model, the
settings and every byte of the targets.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modalign.bridge.inversion import (
    InversionSettings,
    encoder_inversion,
    official_ovi_tokens,
    vit_geometry,
)
from modalign.bridge.inversion.core import InversionForward, check_precision
from modalign.bridge.inversion.store import invert_chunks
from modalign.data.benchmarks.templates import INVERSION_TEMPLATE
from modalign.distributed.runtime import barrier, process_rank, shard_bounds
from modalign.embed import Embeddings, EmbeddingStore
from modalign.embed.arrays import ArrayWriter, array_lock
from modalign.encoders.base import Encoder
from modalign.errors import ModalignError
from modalign.io import array_hash, content_hash
from modalign.reproduce.extract import shard_dir
from modalign.reproduce.models import ResolvedModel

DIRECTIONS = ("oti", "ovi")
CHUNK = 1024


@dataclass(frozen=True)
class InversionPlan:
    """One inversion run: direction, steps, pseudo-tokens, template, batch, seed and precision.

    Defaults follow Cross the Gap: OTI 150 steps with R=1 token in "a photo of {}"; OVI 1000
    steps with P pseudo-patches (:func:`ovi_tokens_for`); AdamW lr 0.02, weight decay 0.01,
    batch 64; fp16 autocast with a gradient scaler on CUDA. ``template`` is the OTI template and
    the OVI class prompt of zero-shot classification.

    Examples:
        >>> InversionPlan("ovi").steps
        1000
    """

    direction: str
    steps: int | None = None
    num_tokens: int = 1
    template: str = INVERSION_TEMPLATE
    batch_size: int = 64
    seed: int = 0
    precision: str = "fp16"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction={self.direction!r}: expected 'oti' or 'ovi'")
        if self.steps is None:
            object.__setattr__(self, "steps", 150 if self.direction == "oti" else 1000)
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens={self.num_tokens}: expected >= 1")

    def settings(self, device: str | torch.device = "cpu") -> InversionSettings:
        """The optimisation settings on ``device`` (mixed precision on CUDA only)."""
        assert self.steps is not None
        precision = self.precision if torch.device(device).type == "cuda" else "fp32"
        return InversionSettings(steps=self.steps, batch_size=self.batch_size, seed=self.seed,
                                 precision=precision)


def ovi_family(model: ResolvedModel, towers: Mapping[str, Encoder]) -> str:
    """The official-config family of ``model``: openai, openclip, siglip (or slip).

    Examples:
        >>> from modalign.reproduce.models import ResolvedModel
        >>> ovi_family(ResolvedModel("x", "open_clip:ViT-L-14/datacomp_xl_s13b_b90k",
        ...                          "open_clip"), {})
        'openclip'
    """
    spec = model.spec.lower()
    if model.family == "hf-siglip" or "siglip" in spec:
        return "siglip"
    if model.family == "slip":
        return "slip"
    if model.family == "open_clip":
        return "openai" if spec.rstrip("/").endswith("/openai") else "openclip"
    image = towers.get("image")
    source = str(getattr(getattr(getattr(image, "model", None), "config", None),
                         "_name_or_path", ""))
    text = f"{model.given} {source}".lower()
    tags = ("laion", "datacomp", "dfn", "metaclip", "commonpool", "openclip", "open_clip")
    return "openclip" if any(tag in text for tag in tags) else "openai"


def ovi_tokens_for(model: ResolvedModel, towers: Mapping[str, Encoder]) -> int:
    """OVI's ``P`` for ``model`` from its architecture (patch size, width, family) and the
    official table; 1 with a warning for an architecture the paper did not run."""
    image = towers["image"]
    net = getattr(image, "model", None)
    if net is None:
        raise ModalignError(f"OVI needs a ViT image tower; {model.given!r} has none")
    patch, width = vit_geometry(net)
    return official_ovi_tokens(ovi_family(model, towers), patch, width)


def inversion_forward(towers: Mapping[str, Encoder], plan: InversionPlan) -> InversionForward:
    """The pseudo-token forward of ``towers`` for ``plan.direction``, into the model's joint space.

    OTI runs the text tower (and its projection or head) from a pseudo-token in
    ``plan.template``; OVI runs the image tower from pseudo-patches. Supported: transformers CLIP
    and SigLIP, open_clip (see :func:`modalign.bridge.inversion.encoder_inversion`).
    """
    tower = towers["text" if plan.direction == "oti" else "image"]
    if getattr(tower, "model", None) is None:
        raise ModalignError(
            f"{plan.direction.upper()}: {getattr(tower, 'name', type(tower).__name__)!r} has no "
            "inversion hooks (supported: hf-clip, hf-siglip, open_clip). Run with --methods "
            "native to skip the inversion.")
    if plan.direction == "oti":
        return encoder_inversion(tower, template=plan.template, num_tokens=plan.num_tokens)
    return encoder_inversion(tower, num_tokens=plan.num_tokens)


def invert_stored(store: EmbeddingStore, name: str, targets: Embeddings,
                  towers: Mapping[str, Encoder], plan: InversionPlan, *,
                  device: str | torch.device = "cpu", chunk: int = CHUNK,
                  rank: int | None = None, world_size: int | None = None,
                  progress: bool = True) -> Embeddings | None:
    """Invert every row of ``targets`` and keep the result as array ``name`` of ``store``.

    The array is written by the store's resumable writer (:class:`~modalign.embed.arrays.
    ArrayWriter`) a chunk at a time, so a killed run resumes at the first unfinished chunk; its
    content key hashes the forward, the plan, the target ids and every byte of the targets. With
    several processes (``torchrun``), rank ``r`` inverts the ``r``-th contiguous shard of the
    rows into ``<store>/shards/rank-r-of-N/`` (the layout of
    :func:`~modalign.reproduce.extract.extract_embeddings`); all ranks meet at a barrier and
    rank 0 concatenates the shards into the store.

    Args:
        store: where the result goes.
        name: the array name, e.g. ``"oti"``.
        targets: the features to invert (rows keep their items).
        towers: the model's towers (see :func:`inversion_forward`).
        plan: what to run.
        device: where to optimise.
        chunk: targets per saved chunk.
        rank, world_size: this process's share; default from the process group.
        progress: show a progress bar.

    Returns:
        On rank 0, the inverted features (L2-normalised), one row per target, same items;
        None on the other ranks.

    Examples:
        >>> # oti = invert_stored(store, "oti", store.load("image", split="test"), towers,
        >>> #                     InversionPlan("oti"), device="cuda")
    """
    auto_rank, auto_world = process_rank()
    rank = auto_rank if rank is None else rank
    world_size = auto_world if world_size is None else world_size
    device = torch.device(device)
    forward = inversion_forward(towers, plan)
    ids = [it["id"] for it in targets.items]
    key = content_hash(forward.identity(), asdict(plan), ids, array_hash(targets.vectors))
    if store.is_current(name, key):
        return store.load(name) if rank == 0 else None
    info = {"hash": key, "bridge": plan.direction, "plan": asdict(plan),
            "forward": forward.identity(), "device": str(device), "processes": world_size}
    start, stop = shard_bounds(len(ids), rank, world_size)
    mine = store if world_size == 1 else EmbeddingStore(shard_dir(store, rank, world_size))
    if not mine.is_current(name, key):
        tower = towers["text" if plan.direction == "oti" else "image"]
        # not in the Encoder protocol: inversion_forward checked the tower has a .model
        tower.model.to(device)  # type: ignore[attr-defined]
        rate = _invert_rows(mine, name, key, targets, start, stop, forward, plan, device, chunk,
                            progress and rank == 0)
        mine.register(name, targets.items[start:stop], {**info, **rate})
    if world_size == 1:
        return store.load(name)
    barrier()
    if rank != 0:
        barrier()
        return None
    _merge_shards(store, name, key, targets, world_size, info)
    barrier()
    return store.load(name)


def _invert_rows(store: EmbeddingStore, name: str, key: str, targets: Embeddings, start: int,
                 stop: int, forward: InversionForward, plan: InversionPlan,
                 device: torch.device, chunk: int, progress: bool) -> dict[str, Any]:
    """Invert rows ``start:stop`` of ``targets`` chunk by chunk into ``store``'s ``name``.npy
    (resuming a killed run); returns the writer's facts and the rate of the fresh rows."""
    ids = [it["id"] for it in targets.items]
    dim = int(np.asarray(targets.vectors[:0]).shape[1])
    with array_lock(store.path, name, quiet=True):
        writer = ArrayWriter(store.path, name, key=key, rows=stop - start, dim=dim)
        bar = tqdm(total=stop - start, initial=writer.done, unit="item",
                   desc=f"{plan.direction.upper()} {name}", disable=not progress or None)
        t0 = time.perf_counter()

        def advance(n: int) -> None:  # invert's progress callback (tqdm's update returns a flag)
            bar.update(n)

        def read(a: int, b: int) -> torch.Tensor:
            return torch.from_numpy(np.array(targets.vectors[a:b], dtype=np.float32)).to(device)

        fresh = sum(b - a for a, b, _ in invert_chunks(
            writer, read, ids, forward, plan.settings(device), rows=range(start, stop),
            chunk=chunk, progress=advance))
        bar.close()
        elapsed = time.perf_counter() - t0
        facts = writer.finish()
    return {**facts, "dim": dim,
            "items_per_s": round(fresh / elapsed, 3) if fresh and elapsed > 0 else None}


def _merge_shards(store: EmbeddingStore, name: str, key: str, targets: Embeddings,
                  world_size: int, info: Mapping[str, Any]) -> None:
    """Concatenate the ranks' finished shards of ``name`` into ``store`` (rank 0); drop them."""
    n = len(targets.items)
    shards = []
    for r in range(world_size):
        start, stop = shard_bounds(n, r, world_size)
        shard = EmbeddingStore(shard_dir(store, r, world_size))
        if stop > start and not shard.is_current(name, key):
            raise ModalignError(f"rank {r} has not finished inverting rows {start}..{stop - 1} "
                                f"into {shard.path}; run every rank (torchrun starts them all)")
        shards.append((start, stop, shard))
    dim = int(np.asarray(targets.vectors[:0]).shape[1])
    rates = [shard.info(name).get("items_per_s") for a, b, shard in shards if b > a]
    with array_lock(store.path, name, quiet=True):
        writer = ArrayWriter(store.path, name, key=key, rows=n, dim=dim)
        for start, stop, shard in shards:
            if stop > start and start >= writer.done:
                writer.write(start, np.asarray(shard.load(name).vectors))
        facts = writer.finish()
    total = sum(r for r in rates if r) if all(rates) else None
    store.register(name, targets.items, {**info, **facts, "dim": dim,
                                         "items_per_s": round(total, 3) if total else None})
    for _, _, shard in shards:
        shard.remove_array(name)
