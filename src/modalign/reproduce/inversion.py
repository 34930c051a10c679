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

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from modalign.bridge.inversion import (
    InversionSettings,
    encoder_inversion,
    invert,
    official_ovi_tokens,
    vit_geometry,
)
from modalign.bridge.inversion.core import PRECISIONS, InversionForward
from modalign.data.benchmarks.templates import INVERSION_TEMPLATE
from modalign.embed import Embeddings, EmbeddingStore
from modalign.embed.arrays import ArrayWriter, array_lock
from modalign.encoders.base import Encoder
from modalign.errors import ModalignError
from modalign.io import content_hash, read_json, write_json_atomic
from modalign.reproduce.extract import barrier, process_rank
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
        if self.precision not in PRECISIONS:
            raise ModalignError(f"precision={self.precision!r}: expected one of "
                                f"{', '.join(PRECISIONS)}")
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
               desc=f"{plan.direction.upper()} {name}", disable=(not progress or rank != 0) or None)
    t0, fresh = time.perf_counter(), 0
    for start in mine:
        part = _part(parts_dir, start)
        stop = min(start + chunk, len(ids))
        if part.exists():
            bar.update(stop - start)
            continue
        t = torch.from_numpy(np.array(targets.vectors[start:stop], dtype=np.float32)).to(device)
        res = invert(t, forward, plan.settings(device), keys=ids[start:stop],
                     progress=bar.update)
        rows = res.features.float().cpu().numpy()
        with array_lock(parts_dir, part.stem, quiet=True):  # the shared resumable writer
            if not part.exists():
                writer = ArrayWriter(parts_dir, part.stem, key=key, rows=len(rows),
                                     dim=rows.shape[1])
                writer.write(0, rows)
                writer.finish()
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
        _part(parts_dir, s).with_suffix(".lock").unlink(missing_ok=True)
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
