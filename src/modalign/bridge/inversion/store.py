"""Inverted features in the embedding store, next to the native arrays: keyed, resumable.

An inversion writes the array ``<modality>.<method>.<key>`` (e.g. ``text.oti.3f2a...``): one row
per source item, in the joint space of the model, with the source item's metadata (id, view,
group, split, labels), ``modality`` set to the tower that produced the feature, ``source_modality``
to the item's own modality and the row's ``final_cosine``. ``key`` is a content hash of the
settings, the forward (tower, template, slot), the caller's context (model weights, direction,
split), the item ids and the target vectors, so changed settings never reuse stale rows. Rows are
written chunk by chunk through the shared :class:`~modalign.embed.arrays.ArrayWriter` (one lock
per array, resumable); a killed run resumes at the first unfinished chunk. Each sample depends only
on its own key and settings, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from modalign.bridge.inversion.core import (
    InversionForward,
    InversionResult,
    InversionSettings,
    invert,
)
from modalign.embed.arrays import ArrayWriter, array_lock
from modalign.embed.store import EmbeddingStore
from modalign.io import content_hash


def inversion_key(targets: torch.Tensor, ids: Sequence[str], forward: InversionForward,
                  settings: InversionSettings, context: Mapping[str, Any]) -> str:
    """Content hash of everything an inverted array depends on (see the module docstring)."""
    vectors = np.ascontiguousarray(targets.detach().cpu().numpy().astype(np.float32))
    digest = hashlib.sha256(vectors.tobytes()).hexdigest()[:16]
    return content_hash(settings.as_dict(), forward.identity(), dict(context), list(ids),
                        list(vectors.shape), digest)


def invert_chunks(writer: ArrayWriter, targets: Callable[[int, int], torch.Tensor],
                  ids: Sequence[str], forward: InversionForward, settings: InversionSettings, *,
                  rows: range, chunk: int,
                  progress: Callable[[int], None] | None = None,
                  state: Callable[[int, int, InversionResult], Mapping[str, Any]] | None = None,
                  ) -> Iterator[tuple[int, int, InversionResult]]:
    """Invert the items ``rows`` that ``writer`` (whose row 0 is ``rows.start``) has not written
    yet, ``chunk`` at a time; yields ``(a, b, result)`` once rows ``a:b`` are written.

    A killed run resumes at the first unfinished chunk: each sample depends only on its key
    (``ids[i]``) and the settings. ``targets(a, b)`` gives the target rows ``a:b``; ``progress``
    is :func:`invert`'s per-item callback; ``state(a, b, result)`` is recorded with the chunk
    (e.g. the final cosines so far).
    """
    for a in range(rows.start + writer.done, rows.stop, chunk):
        b = min(a + chunk, rows.stop)
        res = invert(targets(a, b), forward, settings, keys=list(ids[a:b]), progress=progress)
        extra = {} if state is None else state(a, b, res)
        writer.write(a - rows.start, res.features.detach().float().cpu().numpy(), **extra)
        yield a, b, res


def inverted_arrays(store: EmbeddingStore, method: str | None = None) -> dict[str, dict[str, Any]]:
    """The inverted arrays of ``store`` (optionally of one method), name -> manifest entry.

    Examples:
        >>> import tempfile
        >>> from modalign.embed import EmbeddingStore
        >>> inverted_arrays(EmbeddingStore(tempfile.mkdtemp()))
        {}
    """
    arrays = store.manifest["arrays"]
    return {n: a for n, a in sorted(arrays.items())
            if "inversion" in a and (method is None or a["inversion"].get("method") == method)}


def invert_into_store(store: EmbeddingStore, targets: torch.Tensor,
                      items: Sequence[Mapping[str, Any]], forward: InversionForward,
                      settings: InversionSettings, *, method: str,
                      context: Mapping[str, Any] | None = None,
                      on_chunk: Callable[[int, float], None] | None = None) -> str:
    """Invert ``targets`` (one per item) and store the result; returns the array name.

    An array with the same key is reused as is; a partial one is resumed. Chunks hold
    ``settings.batch_size`` items.

    Args:
        store: the embedding store to write into.
        targets: ``(n, dim)`` joint-space targets, one per item.
        items: row metadata of the source items (``id`` required).
        forward: the inversion forward, ending in the joint space.
        settings: optimisation knobs.
        method: ``"oti"``, ``"ovi"`` or another short name, part of the array name.
        context: extra data that identifies the inputs (model weights hash, direction, split).
        on_chunk: called after each chunk with the number of items done in it and the sum of
            their final cosines.

    Examples:
        >>> import tempfile, torch
        >>> class Linear:
        ...     modality, num_tokens, token_dim = "text", 1, 3
        ...     def __call__(self, tokens): return tokens[:, 0]
        ...     def identity(self): return {"kind": "identity"}
        >>> store = EmbeddingStore(tempfile.mkdtemp())
        >>> items = [{"id": f"e{i}", "modality": "image", "view": "noto", "group": f"g{i}",
        ...           "split": "test"} for i in range(3)]
        >>> name = invert_into_store(store, torch.eye(3), items, Linear(),
        ...                          InversionSettings(steps=50, lr=0.1), method="oti")
        >>> name.startswith("text.oti."), store.load(name).vectors.shape
        (True, (3, 3))
    """
    if targets.ndim != 2 or targets.shape[0] != len(items) or not items:
        raise ValueError(f"targets must be (n, dim) with one row per item ({len(items)}), got "
                         f"{tuple(targets.shape)}")
    ids = [str(it["id"]) for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("items must have unique ids (they seed each sample's pseudo-tokens)")
    if not method or "." in method or "/" in method:
        raise ValueError(f"method must be a short name without '.' or '/', got {method!r}")
    context = dict(context or {})
    key = inversion_key(targets, ids, forward, settings, context)
    name = f"{forward.modality}.{method}.{key}"
    if store.is_current(name, key):
        return name

    n, chunk = len(items), settings.batch_size
    with array_lock(store.path, name):
        if store.is_current(name, key):  # another process finished it while this one waited
            return name
        writer = ArrayWriter(store.path, name, key=key, rows=n, dim=int(targets.shape[1]))
        cosines = np.zeros(n, dtype=np.float64)
        done = writer.done
        if done:
            cosines[:done] = writer.state["final_cosine"][:done]
            if on_chunk is not None:
                on_chunk(done, float(cosines[:done].sum()))

        def record(start: int, stop: int, res: InversionResult) -> dict[str, Any]:
            cosines[start:stop] = res.final_cosine.detach().double().cpu().numpy()
            return {"final_cosine": cosines[:stop].tolist()}

        for start, stop, _ in invert_chunks(writer, lambda a, b: targets[a:b], ids, forward,
                                            settings, rows=range(n), chunk=chunk, state=record):
            if on_chunk is not None:
                on_chunk(stop - start, float(cosines[start:stop].sum()))
        facts = writer.finish()
        rows = [{**dict(it), "modality": forward.modality, "source_modality": it.get("modality"),
                 "final_cosine": float(c)} for it, c in zip(items, cosines)]
        info = {
            "modality": forward.modality,
            "space": "joint",
            "inversion": {"method": method, "key": key, "settings": settings.as_dict(),
                          "batch_size": settings.batch_size, "forward": forward.identity(),
                          "mean_final_cosine": float(cosines.mean()), **context},
        }
        store.register(name, rows, {**info, **facts, "dim": int(targets.shape[1]), "hash": key})
    return name
