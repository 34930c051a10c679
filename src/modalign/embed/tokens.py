"""Token-level features in the embedding store: ragged arrays (token vectors plus offsets).

A tower that can return its tokens (MiniLM's last-layer token states, EfficientNet's spatial
positions, a transformers CLIP tower's projected text or ``[CLS]`` + patch tokens, the log-mel
audio tower's time frames, or any tower with ``token_counts`` and ``encode_tokens``) gets, per
modality::

    <modality>.tokens.npy            float32 (total tokens, dim), memory-mapped on read
    <modality>.tokens.offsets.npy    int64 (rows + 1,): row i owns tokens offsets[i]:offsets[i+1]
    <modality>.tokens.items.jsonl    one JSON object per row, as for the pooled arrays

recorded under ``"tokens"`` in the store manifest (facts and checksums of both files). The token
rows are written through the shared :class:`~modalign.embed.arrays.ArrayWriter`: a killed run
resumes at the first unfinished item, a second writer waits on the lock and reuses the result.

Reading: :func:`load_tokens` gives a :class:`TokenFeatures` (``tokens(i)``, ``counts()``,
``padded(...)``, ``pooled()``, ``filter(...)``), the one API for code that needs tokens.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign import __version__
from modalign.data.dataset import PairedDataset
from modalign.embed.arrays import (
    ArrayWriter,
    array_facts,
    array_lock,
    check_array_file,
    verify_array_file,
)
from modalign.embed.encode import DECODE_ERRORS, _bomb, _to_device, inputs_hash, raw_input
from modalign.embed.store import EmbeddingStore, RowTable
from modalign.errors import ModalignError
from modalign.io import atomic_path, read_jsonl, write_jsonl_atomic

__all__ = ["TokenFeatures", "embed_tokens", "load_tokens", "supports_tokens", "token_modalities",
           "verify_tokens"]


def _name(modality: str) -> str:
    return f"{modality}.tokens"


@dataclass
class TokenFeatures(RowTable):
    """Ragged token features of one modality: row ``i`` owns ``values[offsets[i]:offsets[i+1]]``.

    Attributes:
        values: ``(total tokens, dim)`` float32 (memory-mapped when read from a store).
        offsets: ``(rows + 1,)`` int64, non-decreasing, ``offsets[0] == 0``.
        items: one dict per row (``id``, ``modality``, ``view``, ``group``, ``split``, ...).
        group_index: group key -> integer id, shared with the store's pooled arrays.

    Examples:
        >>> import numpy as np
        >>> rows = [{"group": "a"}, {"group": "b"}]
        >>> tf = TokenFeatures(np.arange(10, dtype=np.float32).reshape(5, 2),
        ...                    np.array([0, 2, 5]), rows, {"a": 0, "b": 1})
        >>> tf.counts().tolist(), tf.tokens(1).shape
        ([2, 3], (3, 2))
    """

    values: np.ndarray
    offsets: np.ndarray
    items: list[dict[str, Any]]
    group_index: Mapping[str, int]

    def __post_init__(self) -> None:
        off = np.asarray(self.offsets, dtype=np.int64)
        if (off.ndim != 1 or len(off) != len(self.items) + 1 or (len(off) and off[0] != 0)
                or np.any(np.diff(off) < 0) or off[-1] != len(self.values)):
            raise ModalignError(f"offsets: expected {len(self.items) + 1} non-decreasing values "
                                f"from 0 to {len(self.values)} (the token count), got shape "
                                f"{off.shape}")
        self.offsets = off

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def counts(self) -> np.ndarray:
        """Tokens per row."""
        return np.diff(self.offsets)

    def tokens(self, i: int) -> np.ndarray:
        """The ``(n_i, dim)`` tokens of row ``i``."""
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def subset(self, idx: np.ndarray | Sequence[int] | Sequence[bool]) -> TokenFeatures:
        """Rows selected by a boolean mask or integer indices (tokens copied into memory)."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        counts = self.counts()[idx]
        parts = [np.asarray(self.tokens(int(i))) for i in idx]
        values = (np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32))
        return TokenFeatures(values.astype(np.float32, copy=False),
                             np.concatenate([[0], np.cumsum(counts)]),
                             [self.items[i] for i in idx], self.group_index)

    def filter(self, view: str | Iterable[str] | None = None,
               split: str | Iterable[str] | None = None) -> TokenFeatures:
        """Rows of the given view(s) and split(s)."""
        return self.subset(self.row_mask(view, split))

    def pooled(self) -> np.ndarray:
        """Mean token of each row ``(rows, dim)`` (zeros for a row without tokens)."""
        sums = np.add.reduceat(np.asarray(self.values, dtype=np.float64),
                               np.minimum(self.offsets[:-1], max(len(self.values) - 1, 0)), axis=0
                               ) if len(self.values) else np.zeros((len(self), self.dim))
        counts = self.counts()
        sums[counts == 0] = 0.0
        return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)

    def padded(self, idx: Sequence[int] | np.ndarray | None = None,
               max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` (default all) as a zero-padded ``(B, T, dim)`` float32 tensor and a
        ``(B, T)`` bool mask; ``max_tokens`` keeps each row's first tokens."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        counts = self.counts()[idx]
        t = int(counts.max()) if len(counts) else 0
        if max_tokens is not None:
            t = min(t, int(max_tokens))
        out = np.zeros((len(idx), t, self.dim), np.float32)
        mask = np.zeros((len(idx), t), bool)
        for r, i in enumerate(idx):
            n = min(int(counts[r]), t)
            out[r, :n] = self.values[self.offsets[i]:self.offsets[i] + n]
            mask[r, :n] = True
        return torch.from_numpy(out), torch.from_numpy(mask)


def supports_tokens(encoder: object) -> bool:
    """True when a tower can give token-level features (``token_counts`` and
    ``encode_tokens``)."""
    return callable(getattr(encoder, "token_counts", None)) and callable(
        getattr(encoder, "encode_tokens", None))


def token_modalities(store: EmbeddingStore | str | Path) -> list[str]:
    """Modalities with a token array in the store."""
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    return sorted(store.manifest.get("tokens", {}))


def _entry(store: EmbeddingStore, modality: str) -> dict[str, Any]:
    entries = store.manifest.get("tokens", {})
    if modality not in entries:
        raise ModalignError(f"the store {store.path} has no token array for {modality!r} (it has "
                            f"{sorted(entries) or 'none'}); run `modalign embed --tokens`")
    return entries[modality]


def _problem(store: EmbeddingStore, entry: Mapping[str, Any], full: bool = False) -> str | None:
    check = verify_array_file if full else (lambda p, f: check_array_file(p, f))
    problem = check(store.path / entry["file"], entry["values"])
    if problem:
        return f"{entry['file']}: {problem}"
    problem = check(store.path / entry["offsets_file"], entry["offsets"])
    return f"{entry['offsets_file']}: {problem}" if problem else None


def load_tokens(store: EmbeddingStore | str | Path, modality: str,
                view: str | Iterable[str] | None = None,
                split: str | Iterable[str] | None = None) -> TokenFeatures:
    """Read the token array of ``modality`` (memory-mapped), optionally some views/splits.

    Examples:
        (Not run as a doctest: it needs a store with token arrays on disk.)

        >>> tf = load_tokens("runs/emb", "text", split="test")        # doctest: +SKIP
        >>> x, mask = tf.padded()                                     # doctest: +SKIP
    """
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    entry = _entry(store, modality)
    problem = _problem(store, entry)
    if problem:
        raise ModalignError(f"token array {modality!r} of the store {store.path} is damaged "
                            f"({problem}); run `modalign embed --tokens` to re-encode it")
    tf = TokenFeatures(np.load(store.path / entry["file"], mmap_mode="r"),
                       np.load(store.path / entry["offsets_file"]),
                       read_jsonl(store.path / f"{_name(modality)}.items.jsonl"),
                       store.group_index())
    return tf if view is None and split is None else tf.filter(view=view, split=split)


def verify_tokens(store: EmbeddingStore) -> dict[str, str | None]:
    """Every token array checked against its recorded checksums: name -> None or the problem."""
    return {_name(m): _problem(store, e, full=True)
            for m, e in sorted(store.manifest.get("tokens", {}).items())}


def _set_tokens(modality: str, facts: dict[str, Any], manifest: dict[str, Any]) -> None:
    manifest.setdefault("tokens", {})[modality] = facts


def embed_tokens(dataset: PairedDataset, encoders: Mapping[str, Any], out_dir: str | Path,
                 batch_size: int = 64, progress: bool = True,
                 device: str | torch.device = "cpu", normalize: bool = False,
                 stop_after: int | None = None) -> EmbeddingStore:
    """Encode the token-level features of every item into ragged arrays of the store.

    Resumable and shared like :func:`~modalign.embed.encode.embed_dataset`: a finished array
    with the same inputs and tower is reused, a partial one resumes, an undecodable input is
    left out (rows and its tokens) and listed under ``skipped``.

    Args:
        encoders: modality -> a tower with ``token_counts(inputs)`` and ``encode_tokens(batch)``
            (returning ``(B, T, dim)`` states and a ``(B, T)`` mask).
        normalize: L2-normalise each token vector.
        stop_after: stop after this many batches (for tests of resumption).

    Examples:
        (Not run as a doctest: it encodes the whole emoji dataset with MiniLM (minutes).)

        >>> store = embed_tokens(load_dataset("emoji"), {"text": load_encoder("minilm")},
        ...                      "runs/emb")                                   # doctest: +SKIP
    """
    if batch_size < 1:
        raise ModalignError(f"batch_size={batch_size}: expected a positive integer")
    store = EmbeddingStore(out_dir)
    store._register_groups(dataset.groups())
    budget = stop_after
    for modality, enc in encoders.items():
        if not supports_tokens(enc):
            raise ModalignError(f"tower {getattr(enc, 'name', enc)!r} for {modality!r} gives no "
                                "token features (it needs token_counts and encode_tokens); "
                                "built-in: minilm, effnet-lite0, logmel, hf-clip")
        items = dataset.select(modality=modality)
        if not items:
            raise ModalignError(f"encoders: modality {modality!r} has no items in dataset "
                                f"{dataset.name!r} (it has {dataset.modalities})")
        h = inputs_hash(dataset, items, enc) + f"-tokens{int(normalize)}"
        name = _name(modality)
        with array_lock(store.path, name):
            entry = store.manifest.get("tokens", {}).get(modality)
            if entry and entry.get("hash") == h and _problem(store, entry) is None:
                continue
            if budget is not None and budget <= 0:
                return store
            inputs = [raw_input(dataset, it) for it in items]
            counts = np.asarray(enc.token_counts(inputs), dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            writer = ArrayWriter(store.path, name, key=h, rows=int(offsets[-1]), dim=enc.dim)
            try:
                done, batches, rate = _encode(enc, inputs, offsets, writer, batch_size, device,
                                              normalize, progress, budget)
            finally:
                writer.close()
            if budget is not None:
                budget -= batches
            if not done:
                return store
            bad = sorted(int(r) for r in writer.state.get("bad", {}))
            drop = [t for r in bad for t in range(offsets[r], offsets[r + 1])]
            facts = writer.finish(drop=drop)
            keep = np.setdiff1d(np.arange(len(items)), np.asarray(bad, dtype=np.int64))
            kept_offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
            offsets_file = f"{name}.offsets.npy"
            with atomic_path(store.path / offsets_file) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, kept_offsets)
                offsets_facts = array_facts(tmp)
            if bad:
                print(f"skipped {len(bad)} undecodable {modality} inputs", file=sys.stderr)
            write_jsonl_atomic(store.path / f"{name}.items.jsonl",
                               [items[i].to_dict() for i in keep])
            full = {"file": f"{name}.npy", "offsets_file": offsets_file, "values": facts,
                    "offsets": offsets_facts, "rows": len(keep), "dim": int(enc.dim),
                    "tokens": int(kept_offsets[-1]), "hash": h, "normalized": normalize,
                    "encoder": enc.identity(), "modalign_version": __version__,
                    "items_per_s": rate,
                    "skipped": [{"id": items[r].id, "reason": writer.state["bad"][str(r)]}
                                for r in bad]}
            store._update_manifest(functools.partial(_set_tokens, modality, full))
    return store


def _encode(enc: Any, inputs: list[Any], offsets: np.ndarray, writer: ArrayWriter,
            batch_size: int, device: str | torch.device, normalize: bool, progress: bool,
            budget: int | None) -> tuple[bool, int, float | None]:
    """Encode items from the first unfinished one; (complete, batches, items/s)."""
    from tqdm.auto import tqdm

    first = int(np.searchsorted(offsets, writer.done, side="left"))
    if offsets[first] != writer.done:  # progress not on an item boundary: start that item again
        first -= 1
    module = enc if isinstance(enc, torch.nn.Module) else None
    if module is not None:
        module.to(device).eval()
    bad_all: dict[str, str] = dict(writer.state.get("bad", {}))
    bar = tqdm(total=len(inputs), initial=first, desc=f"tokens {writer.name}", unit="item",
               disable=not progress)
    t0, batches = time.perf_counter(), 0
    with torch.inference_mode():
        for start in range(first, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            rows = np.zeros((int(offsets[start + len(chunk)] - offsets[start]), enc.dim),
                            np.float32)
            bad: dict[int, str] = {}
            try:
                batch = enc.preprocess(chunk)
                good = list(range(len(chunk)))
            except (*DECODE_ERRORS, _bomb()):
                good = []
                for i, x in enumerate(chunk):
                    try:
                        enc.preprocess([x])
                        good.append(i)
                    except (*DECODE_ERRORS, _bomb()) as e:
                        bad[i] = f"{type(e).__name__}: {e}"
                batch = enc.preprocess([chunk[i] for i in good]) if good else None
            if good:
                states, mask = enc.encode_tokens(_to_device(batch, device))
                states = states.float()
                if normalize:
                    states = torch.nn.functional.normalize(states, dim=-1)
                for b, i in enumerate(good):
                    got = states[b][mask[b]].cpu().numpy()
                    lo, hi = offsets[start + i] - offsets[start], offsets[start + i + 1] - \
                        offsets[start]
                    if len(got) != hi - lo:
                        raise ModalignError(f"tower {enc.name!r} gave {len(got)} tokens for input "
                                            f"{start + i}, token_counts said {hi - lo}")
                    rows[lo:hi] = got
            bad_all.update({str(start + i): r for i, r in bad.items()})
            if len(rows):
                writer.write(int(offsets[start]), rows, bad=bad_all)
            else:
                writer.state["bad"] = bad_all
            bar.update(len(chunk))
            batches += 1
            if budget is not None and batches >= budget and start + len(chunk) < len(inputs):
                bar.close()
                return False, batches, None
    bar.close()
    elapsed = time.perf_counter() - t0
    n = len(inputs) - first
    return True, batches, (round(n / elapsed, 2) if elapsed > 0 and n else None)
