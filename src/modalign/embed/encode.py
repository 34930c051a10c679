"""Encode a dataset with towers into an :class:`EmbeddingStore`, resumably."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from modalign import __version__
from modalign.data.dataset import Item, PairedDataset
from modalign.embed.store import EmbeddingStore
from modalign.encoders.base import Encoder, check_encoder
from modalign.io import content_hash, read_json, write_json_atomic, write_jsonl_atomic

FILE_MODALITIES = ("image", "audio")
STORE_FORMAT = 2  # bump when the rows or arrays written for the same inputs change


def raw_input(ds: PairedDataset, item: Item) -> Any:
    """What a tower's ``preprocess`` takes for ``item``: a file path (images, audio, files of a
    user's own modality) or the text."""
    if item.modality in FILE_MODALITIES:
        return str(ds.resolve(item))
    p = ds.resolve(item) if item.modality != "text" else None
    return str(p) if p is not None and p.is_file() else item.value


def _signature(ds: PairedDataset, item: Item) -> list[Any]:
    """What identifies an input's content: the text, or a file's path, size and mtime."""
    if item.modality == "text":
        return [item.id, item.value]
    p = ds.resolve(item)
    try:
        st = p.stat()
        return [item.id, str(p), st.st_size, st.st_mtime_ns]
    except OSError:
        return [item.id, item.value]


def inputs_hash(ds: PairedDataset, items: Sequence[Item], encoder: Encoder) -> str:
    """Content hash of the inputs and the tower: a changed input or tower never reuses a cache."""
    return content_hash(STORE_FORMAT, encoder.identity(), [_signature(ds, it) for it in items])


def embed_dataset(dataset: PairedDataset, encoders: Mapping[str, Encoder],
                  out_dir: str | Path, batch_size: int = 64, progress: bool = True,
                  device: str | torch.device = "cpu", normalize: bool = False,
                  stop_after: int | None = None) -> EmbeddingStore:
    """Encode every item of the modalities in ``encoders`` into a store at ``out_dir``.

    Resumable: rows are written into ``<modality>.partial.npy`` batch by batch, with the number
    of finished rows in ``<modality>.progress.json``; a killed run continues where it stopped. An
    array whose content hash (inputs + tower identity) matches is reused; any change re-encodes.

    Args:
        dataset: the items to encode.
        encoders: modality -> tower.
        out_dir: the store folder.
        batch_size: items per ``encode`` call.
        normalize: L2-normalise the stored vectors (joint-space towers such as CLIP adapters).
        stop_after: stop after this many batches (for tests of resumption).

    Examples:
        >>> from modalign.data import load_dataset                          # doctest: +SKIP
        >>> from modalign.encoders import load_encoder                      # doctest: +SKIP
        >>> store = embed_dataset(load_dataset("emoji"), {"text": load_encoder("minilm")},
        ...                       "runs/emb")                              # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    store = EmbeddingStore(out_dir)
    write_json_atomic(store.path / "dataset.json", {
        "name": dataset.name, "root": str(dataset.root) if dataset.root else None,
        "counts": dataset.counts(), "options_key": dataset.info.get("options_key")})
    store._register_groups(dataset.groups())
    batches_done = 0
    for modality, enc in encoders.items():
        enc = check_encoder(enc)
        items = dataset.select(modality=modality)
        if not items:
            raise ValueError(f"encoders: modality {modality!r} has no items in dataset "
                             f"{dataset.name!r} (it has {dataset.modalities})")
        h = inputs_hash(dataset, items, enc)
        arrays = store.manifest["arrays"]
        if arrays.get(modality, {}).get("hash") == h and (store.path / f"{modality}.npy").exists():
            continue
        partial = store.path / f"{modality}.partial.npy"
        progress_file = store.path / f"{modality}.progress.json"
        done = 0
        if partial.exists() and progress_file.exists():
            state = read_json(progress_file)
            if state.get("hash") == h:
                done = int(state["done"])
        if done == 0:
            partial.unlink(missing_ok=True)
            mm = open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(items), enc.dim))
        else:
            mm = open_memmap(partial, mode="r+")
            if mm.shape != (len(items), enc.dim):
                mm = open_memmap(partial, mode="w+", dtype=np.float32,
                                 shape=(len(items), enc.dim))
                done = 0
        t0, n0 = time.perf_counter(), done
        bar = tqdm(total=len(items), initial=done, desc=f"embedding {modality}", unit="item",
                   disable=not progress)
        module = enc if isinstance(enc, torch.nn.Module) else None
        if module is not None:
            module.to(device).eval()
        with torch.inference_mode():
            for start in range(done, len(items), batch_size):
                chunk = items[start:start + batch_size]
                batch = enc.preprocess([raw_input(dataset, it) for it in chunk])
                batch = _to_device(batch, device)
                out = enc.encode(batch).float()
                if out.shape != (len(chunk), enc.dim):
                    raise RuntimeError(f"encoder {enc.name!r} returned shape {tuple(out.shape)}, "
                                       f"expected ({len(chunk)}, {enc.dim})")
                if normalize:
                    out = torch.nn.functional.normalize(out, dim=-1)
                mm[start:start + len(chunk)] = out.cpu().numpy()
                mm.flush()
                write_json_atomic(progress_file, {"hash": h, "done": start + len(chunk)})
                bar.update(len(chunk))
                batches_done += 1
                if stop_after is not None and batches_done >= stop_after:
                    bar.close()
                    return store
        bar.close()
        elapsed = time.perf_counter() - t0
        del mm
        os.replace(partial, store.path / f"{modality}.npy")
        rows = [it.to_dict() for it in items]
        write_jsonl_atomic(store.path / f"{modality}.items.jsonl", rows)
        entry = {"modality": modality, "file": f"{modality}.npy", "count": len(items),
                 "dim": enc.dim, "dtype": "float32", "hash": h, "encoder": enc.identity(),
                 "normalized": normalize, "modalign_version": __version__,
                 "items_per_s": round((len(items) - n0) / elapsed, 2) if elapsed > 0 else None}
        store._update_manifest(lambda m, e=entry, mod=modality: m["arrays"].__setitem__(mod, e))
        progress_file.unlink(missing_ok=True)
    return store


def _to_device(batch: Any, device: str | torch.device) -> Any:
    if str(device) == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch
