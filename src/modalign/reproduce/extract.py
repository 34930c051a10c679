"""Embedding extraction for the protocols: batched, resumable, mixed precision, shardable.

One process: :func:`modalign.embed.embed_dataset` under autocast (float16 on CUDA), resumable
batch by batch. Several processes (``torchrun --nproc-per-node N``): rank ``r`` embeds the
``r``-th contiguous shard of each modality into ``<store>/shards/rank-r-of-N/`` (itself
resumable), all ranks meet at a barrier, and rank 0 concatenates the shards, in dataset order,
into the store. The merged array carries the same content hash a one-process run would give, so
either way the next run reuses it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from modalign import __version__
from modalign.data.dataset import PairedDataset
from modalign.embed import EmbeddingStore, embed_dataset
from modalign.embed.arrays import ArrayWriter, array_lock
from modalign.embed.encode import inputs_hash
from modalign.encoders.base import Encoder
from modalign.io import write_json_atomic

SHARDS_DIR = "shards"


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the process group, else from ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Start and stop of shard ``rank`` of ``n`` rows split into ``world_size`` contiguous shards.

    Examples:
        >>> [shard_bounds(10, r, 3) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@contextlib.contextmanager
def mixed_precision(device: str | torch.device, dtype: torch.dtype = torch.float16
                    ) -> Iterator[None]:
    """Autocast to ``dtype`` on CUDA; a no-op on the CPU (full precision there)."""
    if torch.device(device).type == "cuda":
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield


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
        with mixed_precision(device):
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
            with mixed_precision(device):
                embed_dataset(shard, shard_towers, _shard_dir(store, rank, world_size),
                              batch_size=batch_size, progress=progress and rank == 0,
                              device=device)
    barrier()
    if rank == 0 and todo:
        _merge_shards(store, dataset, todo, world_size)
    barrier()
    return store


def _cached(store: EmbeddingStore, dataset: PairedDataset, modality: str, enc: Encoder) -> bool:
    return store.is_current(modality, inputs_hash(dataset, dataset.select(modality=modality), enc))


def _shard_dir(store: EmbeddingStore, rank: int, world_size: int) -> Path:
    return store.path / SHARDS_DIR / f"rank-{rank}-of-{world_size}"


def barrier() -> None:
    """Wait for every rank when a process group is up; a no-op otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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
            shard = EmbeddingStore(_shard_dir(store, r, world_size))
            if modality not in shard.manifest["arrays"]:
                raise RuntimeError(
                    f"rank {r} has not finished embedding {modality!r} into {shard.path}; run "
                    "every rank (torchrun starts them all) before rank 0 merges")
            emb = shard.load(modality)
            if [it["id"] for it in emb.items] != [it.id for it in items[start:stop]]:
                raise RuntimeError(f"{shard.path}: rows do not match shard {r} of the dataset")
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
