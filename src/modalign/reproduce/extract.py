"""Embedding extraction for the protocols: batched, resumable, mixed precision, shardable.

One process: :func:`modalign.embed.embed_dataset` under autocast (float16 on CUDA), resumable
batch by batch. Several processes (``torchrun --nproc-per-node N``): rank ``r`` embeds the
``r``-th contiguous shard of each modality into ``<store>/shards/rank-r-of-N/`` (itself
resumable), all ranks meet at a barrier, and rank 0 concatenates the shards, in dataset order,
into the store. The merged array carries the same content hash a one-process run would give, so
either way the next run reuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from modalign import __version__
from modalign.data.dataset import PairedDataset
from modalign.distributed.runtime import autocast, barrier, process_rank, shard_bounds
from modalign.embed import EmbeddingStore, embed_dataset
from modalign.embed.arrays import ArrayWriter, array_lock
from modalign.embed.encode import inputs_hash
from modalign.encoders.base import Encoder
from modalign.errors import ModalignError
from modalign.io import write_json_atomic

SHARDS_DIR = "shards"


def extract_embeddings(dataset: PairedDataset, towers: Mapping[str, Encoder],
                       out_dir: str | Path, *, batch_size: int = 256,
                       device: str | torch.device = "cpu", rank: int | None = None,
                       world_size: int | None = None, progress: bool = True) -> EmbeddingStore:
    """Embed every item of the modalities in ``towers`` into the store at ``out_dir``.

    Args:
        dataset: the items (only the modalities in ``towers`` are embedded).
        towers: modality -> encoder.
        out_dir: the store folder.
        batch_size: items per forward pass.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``; autocast float16 on CUDA.
        rank, world_size: this process's shard; default from :func:`process_rank`.
        progress: show a progress bar.

    Returns:
        The store; complete on rank 0 (other ranks return after the barrier).

    Examples:
        >>> # torchrun --nproc-per-node 8 -m modalign reproduce cross-the-gap ...
        >>> # calls extract_embeddings on every rank; rank 0 ends with the full store.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    auto_rank, auto_world = process_rank()
    rank = auto_rank if rank is None else rank
    world_size = auto_world if world_size is None else world_size
    store = EmbeddingStore(out_dir)
    if world_size == 1:
        with autocast(device):
            return embed_dataset(dataset, towers, out_dir, batch_size=batch_size,
                                 progress=progress, device=device)
    done = {m: _cached(store, dataset, m, enc) for m, enc in towers.items()}
    todo = {m: enc for m, enc in towers.items() if not done[m]}
    if todo:
        shard_items = []
        for m in todo:
            items = dataset.select(modality=m)
            start, stop = shard_bounds(len(items), rank, world_size)
            shard_items += items[start:stop]
        shard = PairedDataset(dataset.name, shard_items, root=dataset.root, info=dataset.info)
        shard_towers = {m: enc for m, enc in todo.items() if shard.select(modality=m)}
        if shard_towers:
            with autocast(device):
                embed_dataset(shard, shard_towers, shard_dir(store, rank, world_size),
                              batch_size=batch_size, progress=progress and rank == 0,
                              device=device)
    barrier()
    if rank == 0 and todo:
        _merge_shards(store, dataset, todo, world_size)
    barrier()
    return store


def _cached(store: EmbeddingStore, dataset: PairedDataset, modality: str, enc: Encoder) -> bool:
    return store.is_current(modality, inputs_hash(dataset, dataset.select(modality=modality), enc))


def shard_dir(store: EmbeddingStore, rank: int, world_size: int) -> Path:
    """The folder of rank ``rank``'s share of ``store`` (itself a store), before rank 0 merges."""
    return store.path / SHARDS_DIR / f"rank-{rank}-of-{world_size}"


def _merge_shards(store: EmbeddingStore, dataset: PairedDataset, towers: Mapping[str, Encoder],
                  world_size: int) -> None:
    """Concatenate the ranks' shard arrays, in rank order, into ``store`` (rank 0 only)."""
    write_json_atomic(store.path / "dataset.json", {
        "name": dataset.name, "root": str(dataset.root) if dataset.root else None,
        "counts": dataset.counts(), "options_key": dataset.info.get("options_key")})
    store._register_groups(dataset.groups())
    for modality, enc in towers.items():
        items = dataset.select(modality=modality)
        parts = []
        for r in range(world_size):
            start, stop = shard_bounds(len(items), r, world_size)
            if stop == start:
                continue
            shard = EmbeddingStore(shard_dir(store, r, world_size))
            if modality not in shard.manifest["arrays"]:
                raise ModalignError(
                    f"rank {r} has not finished embedding {modality!r} into {shard.path}; run "
                    "every rank (torchrun starts them all) before rank 0 merges")
            emb = shard.load(modality)
            if [it["id"] for it in emb.items] != [it.id for it in items[start:stop]]:
                raise ModalignError(f"{shard.path}: rows do not match shard {r} of the dataset; "
                                    "delete the shards folder and run every rank again")
            parts.append(emb)
        h = inputs_hash(dataset, items, enc)
        with array_lock(store.path, modality):
            writer = ArrayWriter(store.path, modality, key=h, rows=len(items), dim=parts[0].dim)
            row = 0
            for emb in parts:
                if row >= writer.done:
                    writer.write(row, np.asarray(emb.vectors))
                row += len(emb)
            facts = writer.finish()
            rows = [r for emb in parts for r in emb.items]
            store.register(modality, rows, {
                "modality": modality, **facts, "dim": parts[0].dim, "hash": h,
                "encoder": enc.identity(), "normalized": False, "modalign_version": __version__,
                "shards": world_size})
