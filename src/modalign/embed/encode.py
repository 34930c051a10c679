"""Encode a dataset with towers into an :class:`EmbeddingStore`, resumably."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modalign import __version__
from modalign.data.dataset import Item, PairedDataset
from modalign.embed.arrays import ArrayWriter, array_lock
from modalign.embed.store import DATASET_INFO, EmbeddingStore
from modalign.encoders.base import Encoder, check_encoder
from modalign.errors import ModalignError
from modalign.io import content_hash, write_json_atomic

FILE_MODALITIES = ("image", "audio")
STORE_FORMAT = 3
"""Part of every array's key (:func:`array_key`): changing it re-encodes every array of every
store, whatever its tower. Change it only when what is written for the same inputs changes for
all towers (the row layout); a change in what one tower computes (its preprocessing, its
decoding of files) belongs in that tower's ``identity()``, which re-encodes only its arrays. (The
move from 2 to 3, for a change in how large images are decoded, re-encoded text and audio arrays
too.)"""


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


def array_key(ds: PairedDataset, items: Sequence[Item], identity: Mapping[str, Any], *,
              normalized: bool = False) -> str:
    """The key of the array of ``items`` encoded by the tower with ``identity``: a hash of
    :data:`STORE_FORMAT`, the identity, each input (a text, or a file's path, size and
    modification time) and, for L2-normalised vectors only, that fact (so the keys of plain
    arrays are those written before it was part of the key). A changed input or tower, or a
    request for the other kind of vectors, never reuses an array.

    Examples:
        >>> from modalign.data.dataset import Item, PairedDataset
        >>> ds = PairedDataset("toy", [Item("a", "text", "v", "hi", "g", "test")])
        >>> array_key(ds, ds.items, {"name": "t"}) == array_key(ds, ds.items, {"name": "u"})
        False
        >>> array_key(ds, ds.items, {"name": "t"}, normalized=True) == array_key(
        ...     ds, ds.items, {"name": "t"})
        False
    """
    parts = [STORE_FORMAT, dict(identity), [_signature(ds, it) for it in items]]
    return content_hash(*parts, *(["L2-normalised"] if normalized else []))


def inputs_hash(ds: PairedDataset, items: Sequence[Item], encoder: Encoder) -> str:
    """:func:`array_key` of ``items`` with the tower ``encoder``."""
    return array_key(ds, items, encoder.identity())


def embed_dataset(dataset: PairedDataset, encoders: Mapping[str, Encoder],
                  out_dir: str | Path, batch_size: int = 64, progress: bool = True,
                  device: str | torch.device = "cpu", normalize: bool = False,
                  stop_after: int | None = None, name: str | None = None) -> EmbeddingStore:
    """Encode every item of the modalities in ``encoders`` into a store at ``out_dir``.

    Resumable: rows are written batch by batch through the shared
    :class:`~modalign.embed.arrays.ArrayWriter`; a killed run continues where it stopped. Each
    array is written under its own lock: a second process embedding into the same store waits for
    it and then reuses the array. An array whose content hash (inputs + tower identity) matches
    and whose file is whole is reused; any change, or a damaged file, re-encodes. An input the
    tower cannot decode is left out of the array and listed under ``skipped`` in the manifest.

    Args:
        dataset: the items to encode.
        encoders: modality -> tower.
        out_dir: the store folder.
        batch_size: items per ``encode`` call.
        normalize: L2-normalise the stored vectors (joint-space towers such as CLIP adapters).
        stop_after: stop after this many batches (for tests of resumption).
        name: a readable dataset name recorded in the store (``dataset.json``), shown by
            ``modalign stores`` and written into eval records; the folder key is unchanged. A
            name given once is kept when the store is updated without one.

    Examples:
        (Not run as a doctest: it encodes the whole emoji dataset with MiniLM (minutes).)

        >>> from modalign.data import load_dataset                          # doctest: +SKIP
        >>> from modalign.encoders import load_encoder                      # doctest: +SKIP
        >>> store = embed_dataset(load_dataset("emoji"), {"text": load_encoder("minilm")},
        ...                       "runs/emb")                              # doctest: +SKIP
    """
    if batch_size < 1:
        raise ModalignError(f"batch_size={batch_size}: expected a positive integer")
    if name is not None and not name.strip():
        raise ModalignError(f"name={name!r}: expected a non-empty dataset name")
    store = EmbeddingStore(out_dir)
    display = name.strip() if name is not None else store.display_name
    write_json_atomic(store.path / DATASET_INFO, {
        "name": dataset.name, "root": str(dataset.root) if dataset.root else None,
        "counts": dataset.counts(), "options_key": dataset.info.get("options_key"),
        **({"display_name": display} if display else {})})
    store._register_groups(dataset.groups())
    batches_done = 0
    for modality, enc in encoders.items():
        enc = check_encoder(enc)
        items = dataset.select(modality=modality)
        if not items:
            raise ModalignError(f"encoders: modality {modality!r} has no items in dataset "
                                f"{dataset.name!r} (it has {dataset.modalities})")
        h = array_key(dataset, items, enc.identity(), normalized=normalize)
        if store.is_current(modality, h):
            continue
        if stop_after is not None and batches_done >= stop_after:
            return store
        with array_lock(store.path, modality):
            entry = store.manifest["arrays"].get(modality)
            if entry and entry.get("hash") == h:
                problem = store.check(modality, entry)
                if problem is None:  # another process finished it while this one waited
                    continue
                print(f"{store.path / entry['file']} is damaged ({problem}); re-encoding it",
                      file=sys.stderr, flush=True)
            writer = ArrayWriter(store.path, modality, key=h, rows=len(items), dim=enc.dim)
            try:
                finished = _encode_rows(dataset, items, enc, writer, batch_size=batch_size,
                                        device=device, normalize=normalize, progress=progress,
                                        budget=None if stop_after is None
                                        else stop_after - batches_done)
            finally:
                writer.close()
            batches_done += finished.batches
            if not finished.complete:
                return store
            bad = sorted(int(r) for r in writer.state.get("bad", {}))
            facts = writer.finish(drop=bad)
            if bad:
                reasons = writer.state["bad"]
                print(f"skipped {len(bad)} undecodable {modality} inputs:", file=sys.stderr)
                for r in bad[:20]:
                    print(f"  {raw_input(dataset, items[r])}: {reasons[str(r)]}", file=sys.stderr)
            dropped = set(bad)
            kept = [it.to_dict() for i, it in enumerate(items) if i not in dropped]
            store.register(modality, kept, {
                "modality": modality, **facts, "dim": enc.dim, "hash": h,
                "encoder": enc.identity(), "normalized": normalize,
                "modalign_version": __version__, "items_per_s": finished.rate,
                "skipped": [{"id": items[r].id, "reason": writer.state["bad"][str(r)]}
                            for r in bad]})
    return store


@dataclass
class _Pass:
    complete: bool
    batches: int
    rate: float | None


DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError)


def _preprocess(enc: Encoder, inputs: list[Any]) -> tuple[Any, dict[int, str]]:
    """A batch of ``inputs``; an input the tower cannot read is left out and reported
    (position -> reason) instead of failing the whole batch."""
    try:
        return enc.preprocess(inputs), {}
    except (*DECODE_ERRORS, _bomb()):
        pass
    bad: dict[int, str] = {}
    for i, x in enumerate(inputs):
        try:
            enc.preprocess([x])
        except (*DECODE_ERRORS, _bomb()) as e:
            bad[i] = f"{type(e).__name__}: {e}"
    good = [x for i, x in enumerate(inputs) if i not in bad]
    return (enc.preprocess(good) if good else None), bad


def _bomb() -> type[BaseException]:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return OSError
    return Image.DecompressionBombError


def _encode_rows(dataset: PairedDataset, items: Sequence[Item], enc: Encoder,
                 writer: ArrayWriter, *, batch_size: int, device: str | torch.device,
                 normalize: bool, progress: bool, budget: int | None) -> _Pass:
    """Encode rows ``writer.done ..`` into ``writer``; stop early after ``budget`` batches."""
    t0, n0, batches = time.perf_counter(), writer.done, 0
    bar = tqdm(total=len(items), initial=writer.done, desc=f"embedding {writer.name}",
               unit="item", disable=(not progress) or None)
    module = enc if isinstance(enc, torch.nn.Module) else None
    if module is not None:
        module.to(device).eval()
    bad_all: dict[str, str] = dict(writer.state.get("bad", {}))
    with torch.inference_mode():
        for start in range(writer.done, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch, bad = _preprocess(enc, [raw_input(dataset, it) for it in chunk])
            rows = np.zeros((len(chunk), enc.dim), np.float32)
            good = [i for i in range(len(chunk)) if i not in bad]
            if good:
                out = enc.encode(_to_device(batch, device)).float()
                if out.shape != (len(good), enc.dim):
                    raise ModalignError(f"encoder {enc.name!r} returned shape "
                                        f"{tuple(out.shape)}, expected ({len(good)}, {enc.dim})")
                if normalize:
                    out = torch.nn.functional.normalize(out, dim=-1)
                rows[good] = out.cpu().numpy()
            bad_all.update({str(start + i): r for i, r in bad.items()})
            writer.write(start, rows, bad=bad_all)
            bar.update(len(chunk))
            batches += 1
            if budget is not None and batches >= budget and writer.done < len(items):
                bar.close()
                return _Pass(False, batches, None)
    bar.close()
    elapsed = time.perf_counter() - t0
    rate = round((len(items) - n0) / elapsed, 2) if elapsed > 0 and len(items) > n0 else None
    return _Pass(True, batches, rate)


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
