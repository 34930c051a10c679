"""OTI and OVI over many stored features: batched, autocast on GPU, resumable, cached.

OTI (optimization-based textual inversion) turns each image feature into a text-tower feature
("a photo of £", the pseudo-token optimised so the text tower maps onto the image feature); OVI
turns each text feature into an image-tower feature (pseudo-patches). The optimisation itself is
:func:`modalign.bridge.inversion.invert`; this module feeds it stored features chunk by chunk on
the model's device, under bfloat16 autocast on CUDA (bfloat16 needs no gradient scaler), keeps
each finished chunk on disk so a killed run resumes, and stores the result as an array of the
embedding store, keyed by a content hash of the model, the settings and the targets.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from modalign.bridge.inversion import (
    InversionSettings,
    TemplateTokens,
    clip_text_inversion,
    clip_vision_inversion,
    invert,
)
from modalign.bridge.inversion.core import InversionForward
from modalign.data.benchmarks.templates import INVERSION_TEMPLATE
from modalign.embed import Embeddings, EmbeddingStore
from modalign.encoders.base import Encoder
from modalign.io import atomic_path, content_hash, read_json, write_json_atomic
from modalign.reproduce.extract import barrier, process_rank

DIRECTIONS = ("oti", "ovi")
CHUNK = 1024


@dataclass(frozen=True)
class InversionPlan:
    """One inversion run: direction, steps, pseudo-tokens, template, batch and seed.

    Defaults follow Cross the Gap: OTI 150 steps with R=1 token in "a photo of {}"; OVI 1000
    steps with P pseudo-patches (1 for B/32, 4 for L/14 and SigLIP B/16); AdamW lr 0.02, weight
    decay 0.01, batch 64.

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

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction={self.direction!r}: expected 'oti' or 'ovi'")
        if self.steps is None:
            object.__setattr__(self, "steps", 150 if self.direction == "oti" else 1000)
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens={self.num_tokens}: expected >= 1")

    def settings(self) -> InversionSettings:
        assert self.steps is not None
        return InversionSettings(steps=self.steps, batch_size=self.batch_size, seed=self.seed)


def inversion_forward(towers: Mapping[str, Encoder], plan: InversionPlan) -> InversionForward:
    """The pseudo-token forward of ``towers`` for ``plan.direction``.

    OTI runs the text tower (and its projection) from a pseudo-token in ``plan.template``; OVI runs
    the image tower from pseudo-patches. Supported: transformers CLIP (``hf-clip``).
    """
    tower = towers["text" if plan.direction == "oti" else "image"]
    model = getattr(tower, "model", None)
    family = getattr(tower, "family", None)
    if model is None or family != "clip":
        raise ValueError(
            f"{plan.direction.upper()} needs a transformers CLIP model (hf-clip); "
            f"{getattr(tower, 'name', type(tower).__name__)!r} has no inversion hooks here. "
            "Run with --methods native to skip the inversion.")
    if plan.direction == "oti":
        template = TemplateTokens.from_tokenizer(tower.tokenizer, plan.template,  # type: ignore[attr-defined]
                                                 num_tokens=plan.num_tokens)
        return clip_text_inversion(model, template)
    return clip_vision_inversion(model, num_tokens=plan.num_tokens)


@contextlib.contextmanager
def inversion_precision(device: torch.device) -> Iterator[None]:
    """bfloat16 autocast on CUDA, full precision elsewhere."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def invert_stored(store: EmbeddingStore, name: str, targets: Embeddings,
                  towers: Mapping[str, Encoder], plan: InversionPlan, *,
                  device: str | torch.device = "cpu", chunk: int = CHUNK,
                  rank: int | None = None, world_size: int | None = None,
                  progress: bool = True) -> Embeddings | None:
    """Invert every row of ``targets`` and keep the result as array ``name`` of ``store``.

    Rows are inverted in chunks saved as they finish, so a killed run resumes. With several
    processes (``torchrun``), rank ``r`` inverts chunks ``r, r + N, ...``; all ranks meet at a
    barrier and rank 0 assembles the array.

    Args:
        store: where the result (and the resumable chunks) go.
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
    key = content_hash(forward.identity(), asdict(plan), ids,
                       _fingerprint(np.asarray(targets.vectors)))
    if store.manifest["arrays"].get(name, {}).get("hash") == key:
        return store.load(name) if rank == 0 else None
    sync = barrier if world_size > 1 else _no_barrier
    parts_dir = store.path / f"{name}.parts"
    state_file = parts_dir / "state.json"
    if not state_file.exists():
        write_json_atomic(state_file, {"hash": key, "rows": len(ids)})
    elif rank == 0 and read_json(state_file).get("hash") != key:  # chunks of other settings
        for old in parts_dir.glob("part-*.npy"):
            old.unlink()
        write_json_atomic(state_file, {"hash": key, "rows": len(ids)})
    sync()
    starts = list(range(0, len(ids), chunk))
    mine = starts[rank::world_size]
    tower_module = towers["text" if plan.direction == "oti" else "image"].model  # type: ignore[attr-defined]
    tower_module.to(device)
    bar = tqdm(total=sum(min(s + chunk, len(ids)) - s for s in mine), unit="item",
               desc=f"{plan.direction.upper()} {name}", disable=not progress or rank != 0)
    t0, fresh = time.perf_counter(), 0
    for start in mine:
        part = _part(parts_dir, start)
        stop = min(start + chunk, len(ids))
        if part.exists():
            bar.update(stop - start)
            continue
        t = torch.from_numpy(np.array(targets.vectors[start:stop], dtype=np.float32)).to(device)
        with inversion_precision(device):
            res = invert(t, forward, plan.settings(), keys=ids[start:stop], progress=bar.update)
        with atomic_path(part) as tmp, open(tmp, "wb") as f:
            np.save(f, res.features.float().cpu().numpy())
        fresh += stop - start
    bar.close()
    elapsed = time.perf_counter() - t0
    sync()
    if rank != 0:
        sync()
        return None
    missing = [s for s in starts if not _part(parts_dir, s).exists()]
    if missing:
        owner = starts.index(missing[0]) % world_size
        raise RuntimeError(f"rank {owner} has not finished inverting rows {missing[0]}.. into "
                           f"{parts_dir}; run every rank (torchrun starts them all)")
    vectors = np.concatenate([np.load(_part(parts_dir, s)) for s in starts])
    store.add_array(name, vectors, targets.items, info={
        "hash": key, "bridge": plan.direction, "plan": asdict(plan),
        "forward": forward.identity(), "device": str(device), "processes": world_size,
        "items_per_s": round(world_size * fresh / elapsed, 3) if fresh and elapsed > 0 else None})
    for s in starts:
        _part(parts_dir, s).unlink()
    state_file.unlink(missing_ok=True)
    parts_dir.rmdir()
    sync()
    return store.load(name)


def _no_barrier() -> None:
    return None


def _part(parts_dir: Path, start: int) -> Path:
    return parts_dir / f"part-{start:09d}.npy"


def _fingerprint(vectors: np.ndarray) -> str:
    """A cheap content fingerprint of a feature array (shape plus a strided sample)."""
    step = max(1, len(vectors) // 256)
    return content_hash(list(vectors.shape), np.round(vectors[::step].astype(np.float64), 5))
