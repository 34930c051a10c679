"""Multistage contrastive learning (MCL, "Learning the Unlearned: Mitigating Feature Suppression in
Contrastive Learning", Zhang et al. 2024).

Stage 1 is plain training. After each stage the training groups are embedded with that stage's
model (the mean of ``mcl.key``'s rows per group, normalised) and clustered with k-means
(faiss, ``mcl.clusters`` centroids, spherical); a group's pseudo-label is the mixed-radix
combination of its labels from every stage so far, ``y = sum_s l_s K^s``. The next stage trains
a fresh model (the same initialisation and budget) whose batches are cut from the groups ordered
cluster by cluster (clusters in a random order each epoch, groups shuffled within), so the
in-batch negatives share the anchor's earlier clusters and the features that already separated
them no longer help: the model must learn others. The final embedding concatenates the stages'
unit embeddings, divided by ``sqrt(stages)`` (unit norm again):
:class:`MultistageModel`.

Difference from the paper's code: a cluster smaller than the batch shares its batch with the next
cluster in the order (the paper draws every batch from one cluster and drops the remainders, which
would drop whole clusters at small scale); the number of steps per epoch stays the plain run's.

Examples:
    >>> cfg = MCLConfig(stages=2, clusters=4)
    >>> cfg.enabled, mixed_radix([np.array([0, 1, 1]), np.array([2, 2, 0])], 4).tolist()
    (True, [1, 2, 0])
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign.errors import ModalignError
from modalign.io import read_json, write_json_atomic

MANIFEST = "mcl.json"


@dataclass
class MCLConfig:
    """The ``[mcl]`` section: multistage contrastive learning (``stages = 1``: off)."""

    stages: int = 1
    clusters: int = 10
    key: str = ""
    iterations: int = 20

    @property
    def enabled(self) -> bool:
        """Whether the recipe runs (two or more stages)."""
        return self.stages > 1

    def check(self, keys: Sequence[str]) -> None:
        """Raise :class:`ModalignError` naming the first bad key."""
        if not isinstance(self.stages, int) or self.stages < 1:
            raise ModalignError(f"mcl.stages must be an int >= 1 (1: off), got {self.stages!r}")
        if not self.enabled:
            return
        if not isinstance(self.clusters, int) or self.clusters < 1:
            raise ModalignError(f"mcl.clusters must be an int >= 1, got {self.clusters!r}")
        if self.iterations < 1:
            raise ModalignError(f"mcl.iterations must be >= 1, got {self.iterations!r}")
        if self.key and self.key not in keys:
            raise ModalignError(f"mcl.key={self.key!r} is not in data.keys {list(keys)}")


HELP: dict[str, str] = {
    "mcl.stages": "multistage contrastive learning: training stages (1: off); each later stage "
                  "draws its batches within the earlier stages' k-means clusters",
    "mcl.clusters": "k-means clusters per stage",
    "mcl.key": "the key whose embeddings are clustered (default: the first of data.keys)",
    "mcl.iterations": "k-means iterations",
}


def mixed_radix(labels: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Combine per-stage labels into one pseudo-label per group, ``sum_s l_s k^s``, renumbered
    0..C-1 in order of value."""
    combined = np.zeros(len(labels[0]), dtype=np.int64)
    for s, lab in enumerate(labels):
        combined += np.asarray(lab, dtype=np.int64) * k ** s
    return np.unique(combined, return_inverse=True)[1].astype(np.int64)


def kmeans_labels(x: np.ndarray, k: int, seed: int, iterations: int = 20) -> np.ndarray:
    """Spherical k-means (faiss) of the rows of ``x``; the nearest centroid of each row."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True,
                      verbose=False, min_points_per_centroid=1)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0].astype(np.int64)


def group_embeddings(trainer: Any, key: str) -> np.ndarray:
    """The mean joint embedding of ``key``'s training rows per group (in ``trainer.data.groups``
    order), normalised."""
    table = trainer.data.tables[key]
    z = trainer._embed_table(key, table).numpy().astype(np.float64)
    pos = np.searchsorted(trainer.data.groups, table.group_ids)
    keep = (pos < len(trainer.data.groups)) & (
        trainer.data.groups[np.minimum(pos, len(trainer.data.groups) - 1)] == table.group_ids)
    sums = np.zeros((len(trainer.data.groups), z.shape[1]))
    np.add.at(sums, pos[keep], z[keep])
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(
        np.float32)


class MultistageModel:
    """The stages' models side by side: embeddings are their concatenation over ``sqrt(S)``.

    Examples:
        (Not run as a doctest: it needs the run folder of a multistage training.)

        >>> m = MultistageModel.from_run("runs/mcl")                        # doctest: +SKIP
        >>> m.project_array("image", feats).shape                           # doctest: +SKIP
        (n, stages * joint_dim)
    """

    def __init__(self, models: Sequence[Any]) -> None:
        if not models:
            raise ModalignError("MultistageModel needs at least one stage model")
        self.models = list(models)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str]) -> MultistageModel:
        """The stage models an ``[mcl]`` run lists in its ``mcl.json``."""
        from modalign.model import MultiTowerModel

        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            raise ModalignError(f"{run_dir}: no {MANIFEST} (not a finished [mcl] run)")
        stages = read_json(path)["stages"]
        return cls([MultiTowerModel.from_pretrained(Path(run_dir) / s) for s in stages])

    def project_array(self, key: str, features: np.ndarray, batch_size: int = 1024
                      ) -> np.ndarray:
        """Tower features of ``key`` -> concatenated unit joint embeddings."""
        parts = [m.project_array(key, features, batch_size) for m in self.models]
        return (np.concatenate(parts, axis=1) / math.sqrt(len(parts))).astype(np.float32)

    def encode(self, key: str, inputs: Sequence[Any]) -> torch.Tensor:
        """Raw inputs of ``key`` through the towers -> concatenated unit joint embeddings."""
        parts = [m.encode(key, list(inputs)).float() for m in self.models]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))


def _stage_labels(path: Path, groups: np.ndarray) -> np.ndarray:
    saved = read_json(path)
    index = {int(g): int(lab) for g, lab in zip(saved["groups"], saved["labels"], strict=True)}
    return np.array([index[int(g)] for g in groups], dtype=np.int64)


def train_mcl(config: Any, *, towers: Mapping[str, Any] | None = None,
              run_dir: str | os.PathLike[str] | None = None, resume: bool = False
              ) -> dict[str, Any]:
    """Train ``mcl.stages`` stages (each a ``modalign train`` run in ``<run>/stage-<s>``) and
    write ``<run>/mcl.json`` (the stage model folders, cluster counts); returns its summary.

    A resumed run skips finished stages (their ``clusters.json`` holds the labels) and resumes
    the stage in progress from its checkpoint.
    """
    from modalign.train.loop import Trainer, default_run_dir

    cfg = config.mcl
    root = Path(run_dir) if run_dir is not None else default_run_dir(config)
    key = cfg.key or config.data.keys[0]
    history: list[np.ndarray] = []
    stages: list[dict[str, Any]] = []
    for s in range(1, cfg.stages + 1):
        sdir = root / f"stage-{s}"
        labels_file = sdir / "clusters.json"
        started = (sdir / "checkpoints" / "latest.json").is_file()
        trainer = Trainer(config, towers=towers, run_dir=sdir, resume=resume and started)
        if history:
            trainer.data.clusters = mixed_radix(history, cfg.clusters)
        clusters = int(trainer.data.clusters.max()) + 1 if trainer.data.clusters is not None \
            else 1
        if resume and labels_file.is_file():  # a finished stage
            history.append(_stage_labels(labels_file, trainer.data.groups))
            stages.append({"stage": s, "model": f"stage-{s}/model", "batch_clusters": clusters})
            continue
        result = trainer.run()
        from modalign.model import MultiTowerModel

        trainer.model.load_state_dict(MultiTowerModel.from_pretrained(
            result.model_dir).state_dict())
        labels = kmeans_labels(group_embeddings(trainer, key), cfg.clusters,
                               seed=config.train.seed + s, iterations=cfg.iterations)
        if trainer.ctx.is_main:
            write_json_atomic(labels_file, {"key": key, "groups": trainer.data.groups.tolist(),
                                            "labels": labels.tolist()})
        history.append(labels)
        stages.append({"stage": s, "model": f"stage-{s}/model", "batch_clusters": clusters,
                       "best": result.summary.get("best")})
    summary = {"run": str(root), "stages": [st["model"] for st in stages], "key": key,
               "clusters": cfg.clusters, "detail": stages}
    if trainer.ctx.is_main:
        write_json_atomic(root / MANIFEST, summary)
    return summary
