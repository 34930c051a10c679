"""Training batches: groups of a split, one item per embedding key, drawn reproducibly.

A training tuple is one *group* (an emoji concept, an image and its captions) seen through each
embedding key of ``data.keys``: ``"image"`` picks any image item of the group (its styles act as
views), ``"image:noto"`` only the Noto style, ``"text"`` any of the group's texts (names, aliases,
prompt templates: sampling among them is the text augmentation on cached features).

Every draw is a pure function of ``(seed, epoch, batch index)``, so a resumed run sees exactly the
batches an uninterrupted run would, and ``N`` processes that each take their shard of the global
batch see together exactly what one process sees.

Image augmentation (random resized crop, colour jitter) changes pixels, so it applies only to
towers that are fine-tuned (``train.unfreeze``) and encode raw images on the fly; frozen towers
read their features from the embedding store unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from modalign.distributed.runtime import shard_bounds
from modalign.embed.store import Embeddings, EmbeddingStore
from modalign.errors import ModalignError
from modalign.model import base_modality


@dataclass
class KeyTable:
    """The rows of one embedding key in one split: features, group ids and rows per group."""

    key: str
    features: torch.Tensor  # (n, feature_dim) float32
    group_ids: np.ndarray  # (n,) int64
    items: list[dict[str, Any]]
    order: np.ndarray  # row indices sorted by group (stable)
    start: np.ndarray  # group id -> first position in ``order`` (-1: group absent)
    count: np.ndarray  # group id -> number of rows

    @classmethod
    def from_embeddings(cls, key: str, emb: Embeddings) -> KeyTable:
        gids = emb.group_ids()
        order = np.argsort(gids, kind="stable")
        uniq, starts, counts = np.unique(gids[order], return_index=True, return_counts=True)
        size = int(gids.max()) + 1 if len(gids) else 0
        start = np.full(size, -1, dtype=np.int64)
        count = np.zeros(size, dtype=np.int64)
        start[uniq], count[uniq] = starts, counts
        vectors = emb.vectors
        # one float32 copy in memory (a filtered store array is already one: not copied again)
        owned = (not isinstance(vectors, np.memmap) and vectors.dtype == np.float32
                 and vectors.flags.c_contiguous and vectors.flags.writeable)
        feats = torch.from_numpy(vectors if owned else np.array(vectors, dtype=np.float32))
        finite = torch.isfinite(feats).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite)[:, 0].tolist()
            ids = [emb.items[i]["id"] for i in bad[:5]]
            raise ModalignError(
                f"data.keys {key!r}: {len(bad)} rows of the store hold NaN or inf (items "
                f"{ids}{' ...' if len(bad) > 5 else ''}); re-encode them "
                "(modalign embed) or drop those items from the data")
        return cls(key, feats, gids, list(emb.items), order, start, count)

    @property
    def groups(self) -> np.ndarray:
        """The group ids present, sorted."""
        return np.flatnonzero(self.count)

    def rows_of_group(self, group: int) -> np.ndarray:
        """Row indices of one group, in store order."""
        s = self.start[group]
        return self.order[s:s + self.count[group]]


def load_key(store: EmbeddingStore, key: str, split: str | None) -> Embeddings:
    """The store rows of ``key`` (``"modality"`` or ``"modality:view"``) in ``split``."""
    modality, _, view = key.partition(":")
    if modality not in store.arrays:
        raise ValueError(f"data.keys: {key!r} needs array {modality!r}, which the store "
                         f"{store.path} lacks; it has {store.arrays}")
    emb = store.load(modality, view=view or None, split=split)
    if len(emb) == 0:
        where = f"view {view!r} of " if view else ""
        raise ValueError(f"data.keys: {key!r} has no rows in {where}split {split!r} "
                         f"of {store.path}")
    return emb


class PairedFeatures:
    """Paired training data read from an embedding store, batched by group.

    Args:
        store: the embedding store.
        keys: embedding keys of one tuple.
        split: the split to draw from.

    Examples:
        >>> import tempfile, numpy as np
        >>> store = EmbeddingStore(tempfile.mkdtemp())
        >>> for m in ("image", "text"):
        ...     rows = [{"id": f"{m}{i}", "modality": m, "view": "v", "group": f"g{i % 4}",
        ...              "split": "train"} for i in range(8)]
        ...     store.add_array(m, np.random.rand(8, 3).astype(np.float32), rows)
        >>> data = PairedFeatures(store, ["image", "text"], "train")
        >>> groups = data.batch_groups(seed=0, epoch=0, index=0, batch_size=2)
        >>> rows = data.draw_rows(groups, seed=0, epoch=0, index=0)
        >>> [len(r) for r in rows.values()]
        [2, 2]
    """

    def __init__(self, store: EmbeddingStore, keys: Sequence[str], split: str) -> None:
        if not keys:
            raise ValueError("keys must name at least one embedding key")
        self.store = store
        self.keys = list(keys)
        self.split = split
        self.tables = {k: KeyTable.from_embeddings(k, load_key(store, k, split)) for k in keys}
        common: np.ndarray | None = None
        for t in self.tables.values():
            common = t.groups if common is None else np.intersect1d(common, t.groups)
        self.groups = np.asarray(common, dtype=np.int64)
        if len(self.groups) == 0:
            raise ValueError(f"no group of split {split!r} has items for every key {self.keys}")
        self._perm: tuple[tuple[int, int], np.ndarray] | None = None  # the last epoch's order
        self._on: dict[tuple[str, str], torch.Tensor] = {}  # features moved to a device once

    def __len__(self) -> int:
        return len(self.groups)

    def feature_dim(self, key: str) -> int:
        return int(self.tables[key].features.shape[1])

    def num_batches(self, batch_size: int) -> int:
        """Full batches per epoch (a last partial batch is dropped: every batch has one size)."""
        if batch_size > len(self.groups):
            raise ValueError(f"train.batch_size={batch_size} exceeds the {len(self.groups)} "
                             f"groups of split {self.split!r}; lower the batch size")
        return len(self.groups) // batch_size

    def batch_groups(self, *, seed: int, epoch: int, index: int, batch_size: int) -> np.ndarray:
        """The group ids of global batch ``index`` of ``epoch`` (a seeded permutation per epoch;
        with :attr:`clusters` set, the groups of one cluster after another)."""
        if self._perm is None or self._perm[0] != (seed, epoch):  # drawn once per epoch
            rng = np.random.default_rng([seed, epoch, 0x5EED])
            order = rng.permutation(len(self.groups))
            if self._clusters is not None:  # clusters in a random order, groups shuffled within
                rank = rng.permutation(int(self._clusters.max()) + 1)
                order = order[np.argsort(rank[self._clusters[order]], kind="stable")]
            self._perm = ((seed, epoch), order)
        return self.groups[self._perm[1][index * batch_size:(index + 1) * batch_size]]

    _clusters: np.ndarray | None = None

    @property
    def clusters(self) -> np.ndarray | None:
        """Optional pseudo-cluster id per training group (in :attr:`groups` order): batches are
        then cut from the groups ordered cluster by cluster, so in-batch negatives share a
        cluster (multistage contrastive learning, :mod:`modalign.train.recipes.mcl`)."""
        return self._clusters

    @clusters.setter
    def clusters(self, labels: np.ndarray | None) -> None:
        if labels is not None and len(labels) != len(self.groups):
            raise ModalignError(f"clusters: {len(labels)} labels for {len(self.groups)} groups")
        self._clusters = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._perm = None  # the epoch's order is drawn again

    def draw_rows(self, groups: np.ndarray, *, seed: int, epoch: int, index: int,
                  sample: bool = True) -> dict[str, np.ndarray]:
        """One row per group for each key: uniform among the group's rows, or its first row."""
        out: dict[str, np.ndarray] = {}
        for k_i, key in enumerate(self.keys):
            table = self.tables[key]
            offset = np.zeros(len(groups), dtype=np.int64)
            if sample:
                rng = np.random.default_rng([seed, epoch, index, k_i, 0xD2A3])
                offset = rng.integers(0, table.count[groups])
            out[key] = table.order[table.start[groups] + offset]
        return out

    def features(self, rows: dict[str, np.ndarray],
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tower features of the chosen rows, per key, on ``device`` (each key's table is moved
        there once, on first use; the rows are gathered there)."""
        out = {}
        for k, r in rows.items():
            table = self.features_on(k, device)
            out[k] = table.index_select(0, to_device(torch.from_numpy(r), table.device))
        return out

    def features_on(self, key: str, device: torch.device | str) -> torch.Tensor:
        """Key ``key``'s feature table on ``device`` (copied there once, then reused)."""
        table = self.tables[key].features
        dev = torch.device(device)
        if table.device == dev or (dev.type == table.device.type and dev.index is None):
            return table
        cached = self._on.get((key, str(dev)))
        if cached is None:
            cached = self._on[(key, str(dev))] = table.to(dev)
        return cached

    def feature_mean(self, modality: str) -> torch.Tensor:
        """Mean feature of a modality over the keys that use it (after L2 when ``l2``)."""
        tabs = [t.features for k, t in self.tables.items() if k.split(":", 1)[0] == modality]
        return torch.cat(tabs).mean(0)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; to a CUDA device through pinned memory without waiting for the copy
    (a plain copy from pageable memory waits for the work queued before it).

    Examples:
        >>> to_device(torch.arange(3), "cpu").tolist()
        [0, 1, 2]
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def shard(rows: np.ndarray | torch.Tensor, rank: int, world_size: int) -> Any:
    """This process's contiguous slice of a global batch (batch size divisible by world size).

    Examples:
        >>> shard(np.arange(6), 1, 3).tolist()
        [2, 3]
    """
    n = len(rows)
    if n % world_size:
        raise ValueError(f"global batch of {n} is not divisible by world size {world_size}; "
                         "choose train.batch_size as a multiple of the number of processes")
    start, stop = shard_bounds(n, rank, world_size)
    return rows[start:stop]


class RawInputs:
    """Raw inputs (file paths, texts) of store rows, for towers that encode on the fly.

    Args:
        dataset_spec: the dataset the store was encoded from (``data.dataset``).
    """

    def __init__(self, dataset_spec: str) -> None:
        from modalign.data import load_dataset

        if not dataset_spec:
            raise ModalignError("data.dataset must name the dataset when train.unfreeze is set "
                                "(unfrozen towers encode raw inputs)")
        self.dataset = load_dataset(dataset_spec)
        self.by_id = {it.id: it for it in self.dataset.items}

    def inputs(self, items: Sequence[dict[str, Any]]) -> list[Any]:
        """The path (or, for text, the value) of each store row's item."""
        out = []
        for row in items:
            it = self.by_id.get(row["id"])
            if it is None:
                raise ModalignError(f"item {row['id']!r} of the store is not in data.dataset")
            out.append(str(self.dataset.resolve(it)) if it.modality != "text" else it.value)
        return out


@dataclass
class Batch:
    """One process's share of a global batch."""

    rows: dict[str, np.ndarray]  # table rows per key
    features: dict[str, torch.Tensor]  # cached features of the keys read from the store
    raw: dict[str, list[Any]]  # raw inputs (augmented images) of the keys encoded on the fly
    indices: torch.Tensor  # each sample's group position among the training groups (on device)


def draw_batch(data: PairedFeatures, *, seed: int, epoch: int, index: int, batch_size: int,
               rank: int = 0, world_size: int = 1, sample: bool = True,
               raw: RawInputs | None = None, raw_keys: Sequence[str] = (),
               crop_scale: Sequence[float] = (0.8, 1.0), color_jitter: float = 0.2,
               device: torch.device | str = "cpu",
               augment_keys: Sequence[str] | None = None) -> Batch:
    """This process's shard of global batch ``index`` of ``epoch``: cached features, raw inputs
    of ``raw_keys`` (images augmented, seeded by ``(seed, epoch, index, rank)``) and indices.

    ``augment_keys``: the image keys of ``raw_keys`` augmented here (default: all of them); the
    others are passed as raw inputs (paths) for a tower that augments them itself.

    A sample's index is its group's position among the training groups (stable across epochs;
    what per-sample objectives such as iSogCLR key their state on).
    """
    groups = data.batch_groups(seed=seed, epoch=epoch, index=index, batch_size=batch_size)
    rows = data.draw_rows(groups, seed=seed, epoch=epoch, index=index, sample=sample)
    rows = {k: shard(r, rank, world_size) for k, r in rows.items()}
    indices = to_device(torch.from_numpy(np.searchsorted(data.groups,
                                                         shard(groups, rank, world_size))), device)
    cached = {k: r for k, r in rows.items() if k not in raw_keys}
    feats = data.features(cached, device)
    inputs: dict[str, list[Any]] = {}
    for k in raw_keys:
        if raw is None:
            raise ValueError(f"raw_keys {list(raw_keys)} need raw (the dataset's inputs)")
        table = data.tables[k]
        values = raw.inputs([table.items[i] for i in rows[k]])
        if base_modality(k) == "image" and (augment_keys is None or k in augment_keys):
            from modalign.encoders.images import to_rgb

            rng = np.random.default_rng([seed, epoch, index, rank, 0x1A6E])
            values = [augment_image(to_rgb(x), rng, crop_scale=crop_scale,
                                    color_jitter=color_jitter) for x in values]
        inputs[k] = values
    return Batch(rows, feats, inputs, indices)


def augment_image(image: Image.Image, rng: np.random.Generator, *,
                  crop_scale: Sequence[float] = (0.8, 1.0), color_jitter: float = 0.2,
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """Random resized crop (area fraction in ``crop_scale``, aspect in ``ratio``) + colour jitter.

    The crop is resized back to the input size; brightness, contrast and saturation are each
    scaled by a factor drawn from ``[1 - color_jitter, 1 + color_jitter]``.

    Examples:
        >>> img = Image.new("RGB", (32, 32), (200, 30, 30))
        >>> augment_image(img, np.random.default_rng(0)).size
        (32, 32)
    """
    img = image.convert("RGB")
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(crop_scale[0], crop_scale[1])
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw = round((target * aspect) ** 0.5)
        ch = round((target / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
            break
    if color_jitter > 0:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            factor = float(rng.uniform(max(0.0, 1 - color_jitter), 1 + color_jitter))
            img = enhancer(img).enhance(factor)
    return img
