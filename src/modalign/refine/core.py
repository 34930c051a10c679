"""Short refinement of a trained model: CLIP-Refine (RaFA + HyCD) and the CMA objective.

``refine_model`` takes a :class:`~modalign.model.MultiTowerModel` and paired tower features of a
training split (frozen towers: the features come from the embedding store), trains the heads for
a few steps with AdamW, and returns the refined model; the starting model is the frozen teacher
of HyCD. A model with fine-tuned towers (``trainable_towers``, e.g. trained with
``train.unfreeze`` or LoRA) is refined end to end: the items of those modalities are encoded
from their raw inputs (``dataset``) by the student's tower, whose last ``tower_stages`` stages
(or its LoRA adapters) train with the heads, and by the frozen teacher's copy for HyCD; no image
augmentation, BatchNorm statistics fixed (as in ``train``). ``evaluate_model`` measures what the
refinement is meant to change and keep: the gap, cross-modal retrieval and zero-shot accuracy on
a held-out split.

Methods:

* ``clip-refine``: ``lambda_cont * CLIP + lambda_rand * RaFA + lambda_kd * HyCD`` on the heads'
  raw outputs (official form; ``normalize=True`` normalises first). Defaults = the official
  config: ``lambda_cont=0, lambda_rand=1, lambda_kd=1, alpha=0.5, T=1``, AdamW lr 1e-6, wd 0.1,
  one epoch, batch 512 (capped at the number of training groups).
* ``cma``: the CMA loss (:mod:`modalign.losses.cma`) between images and the class prompts of their
  ``label``, plus ``lambda_kd * HyCD`` when ``lambda_kd > 0``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.data.dataset import Item, PairedDataset
from modalign.embed.encode import raw_input
from modalign.embed.store import Embeddings, EmbeddingStore
from modalign.errors import ModalignError
from modalign.losses.clip import clip_loss
from modalign.losses.cma import cma_loss
from modalign.model import MultiTowerModel
from modalign.refine.losses import hycd_loss, rafa_loss
from modalign.train.data import PairedFeatures
from modalign.train.schedule import OptimizerSettings

METHODS = ("clip-refine", "cma")


@dataclass
class RefineConfig(OptimizerSettings):
    """Settings of one refinement (defaults: CLIP-Refine's official configuration). ``lr`` and
    ``weight_decay`` (AdamW, :class:`~modalign.train.schedule.OptimizerSettings`) are
    keyword-only; the official ``lr`` is 1e-6.

    Examples:
        >>> RefineConfig(lr=1e-4).method
        'clip-refine'
    """

    method: str = "clip-refine"
    modalities: tuple[str, str] = ("image", "text")
    epochs: int = 1
    batch_size: int = 512
    lambda_cont: float = 0.0
    lambda_rand: float = 1.0
    lambda_kd: float = 1.0
    alpha: float = 0.5
    temperature: float = 1.0
    normalize: bool = False
    cma_lambda: float = 0.001
    label: str | None = None
    templates: tuple[str, ...] = ("a photo of a {}.",)
    seed: int = 0
    split: str = "train"
    tower_stages: int = 1
    _: KW_ONLY
    lr: float = 1e-6

    def validate(self) -> None:
        """Raise :class:`ModalignError` naming the first bad setting."""
        if self.method not in METHODS:
            raise ModalignError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")
        if len(self.modalities) != 2 or len(set(self.modalities)) != 2:
            raise ModalignError(f"modalities={self.modalities!r}: expected two distinct names")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ModalignError(f"{name}={getattr(self, name)!r}: expected an integer >= 1")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ModalignError(f"{name}={v!r}: expected a finite number > 0")
        for name in ("weight_decay", "lambda_cont", "lambda_rand", "lambda_kd"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ModalignError(f"{name}={v!r}: expected a finite number >= 0")
        if (not isinstance(self.tower_stages, int) or isinstance(self.tower_stages, bool)
                or self.tower_stages < 0):
            raise ModalignError(f"tower_stages={self.tower_stages!r}: expected an integer >= 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ModalignError(f"alpha={self.alpha!r}: expected a number in [0, 1]")
        if self.method == "cma" and not self.label:
            raise ModalignError("method='cma' needs label: the label whose class prompts are "
                                "the texts (e.g. subgroup)")


@dataclass
class RefineResult:
    """The refined model and a per-step log of the loss parts."""

    model: MultiTowerModel
    steps: int
    seconds: float
    log: list[dict[str, float]] = field(default_factory=list)


def class_prompt_features(model: MultiTowerModel, classnames: Sequence[str],
                          templates: Sequence[str], modality: str = "text") -> Tensor:
    """Tower features ``(C, T, feature_dim)`` of every class prompt (the tower is frozen).

    Examples:
        >>> class Fake:  # the Encoder protocol, constant features
        ...     name, modality, dim = "fake", "text", 4
        ...     def preprocess(self, texts): return texts
        ...     def encode(self, texts): return torch.ones(len(texts), 4)
        ...     def identity(self): return {"name": "fake"}
        >>> from modalign.model import ModelConfig
        >>> m = MultiTowerModel(ModelConfig(towers={"text": "minilm"},
        ...                                 feature_dims={"text": 4}, joint_dim=2))
        >>> m.attach_tower("text", Fake())
        >>> class_prompt_features(m, ["cat", "dog"], ["a {}", "{}"]).shape
        torch.Size([2, 2, 4])
    """
    return tower_prompt_features(model.tower(modality), classnames, templates)


def tower_prompt_features(tower: Any, classnames: Sequence[str], templates: Sequence[str]
                          ) -> Tensor:
    """Features ``(C, T, feature_dim)`` of every class prompt encoded by a text ``tower``."""
    from modalign.evaluate.zeroshot import build_prompts, class_name

    prompts = build_prompts([class_name(c) for c in classnames], templates)
    flat = [p for per_class in prompts for p in per_class]
    with torch.no_grad():
        feats = torch.cat([tower.encode(tower.preprocess(flat[i:i + 256])).float()
                           for i in range(0, len(flat), 256)])
    return feats.reshape(len(classnames), len(templates), -1)


def refine_model(model: MultiTowerModel, data: PairedFeatures, config: RefineConfig, *,
                 prompt_features: Tensor | None = None, classnames: Sequence[str] = (),
                 dataset: PairedDataset | None = None, progress: bool = False) -> RefineResult:
    """Refine ``model``'s heads (and fine-tuned tower stages) on ``data``; returns a new model.

    Args:
        model: the starting model (left unchanged; a frozen copy is the HyCD teacher).
        data: paired tower features of the training split, keys ``config.modalities``.
        config: the settings.
        prompt_features: ``(C, T, feature_dim)`` text-tower features of the class prompts
            (``method='cma'``), row ``c`` for ``classnames[c]``.
        classnames: label value of each prompt row.
        dataset: the dataset of the store's items; needed when a refined modality's tower is
            in ``model.config.trainable_towers`` (its raw inputs are encoded on the fly).
        progress: print one line per epoch.

    Examples:
        >>> import tempfile
        >>> from modalign.model import ModelConfig
        >>> store = EmbeddingStore(tempfile.mkdtemp())
        >>> for m in ("image", "text"):
        ...     rows = [{"id": f"{m}{i}", "modality": m, "view": "v", "group": f"g{i}",
        ...              "split": "train"} for i in range(8)]
        ...     _ = store.add_array(m, np.random.rand(8, 4).astype(np.float32), rows)
        >>> model = MultiTowerModel(ModelConfig(towers={"image": "effnet-lite0", "text": "minilm"},
        ...                         feature_dims={"image": 4, "text": 4}, joint_dim=3))
        >>> r = refine_model(model, PairedFeatures(store, ["image", "text"], "train"),
        ...                  RefineConfig(batch_size=4, lr=1e-3))
        >>> r.steps
        2
    """
    config.validate()
    a_key, b_key = config.modalities
    raw_mods = [m for m in config.modalities if m in model.config.trainable_towers]
    if raw_mods and dataset is None:
        raise ModalignError(f"refine: the {raw_mods} tower(s) of this model are fine-tuned; "
                            "pass dataset (CLI: --data) so their raw inputs are encoded")
    if config.method == "cma" and b_key in raw_mods:
        raise ModalignError(f"method='cma': the {b_key!r} tower is fine-tuned, but the class "
                            "prompts are encoded once by a frozen tower; use clip-refine")
    if config.method == "cma":
        if prompt_features is None or len(prompt_features) != len(classnames):
            raise ModalignError("method='cma' needs prompt_features (C, T, feature_dim) and the "
                                "C classnames")
        class_index = {c: i for i, c in enumerate(classnames)}
    torch.manual_seed(config.seed)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student = copy.deepcopy(model).train()
    params = [p for m in config.modalities for p in student.head_for(m).parameters()]
    for m in raw_mods:
        params += _tower_params(student, m, config.tower_stages)
    by_id = {it.id: it for it in dataset.items} if dataset is not None else {}
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, len(data))
    generator = torch.Generator().manual_seed(config.seed)
    log: list[dict[str, float]] = []
    start = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        for index in range(data.num_batches(batch)):
            groups = data.batch_groups(seed=config.seed, epoch=epoch, index=index,
                                       batch_size=batch)
            rows = data.draw_rows(groups, seed=config.seed, epoch=epoch, index=index)
            feats = data.features({k: r for k, r in rows.items() if k not in raw_mods})
            for m in raw_mods:
                inputs = [raw_input(dataset, _item(by_id, data.tables[m].items[r]))  # type: ignore[arg-type]
                          for r in rows[m]]
                feats[m] = student.tower(m).preprocess(inputs)
            za, zb = (_features(student, m, feats[m], m in raw_mods) for m in (a_key, b_key))
            with torch.no_grad():
                ta, tb = (_features(teacher, m, feats[m], m in raw_mods) for m in (a_key, b_key))
            parts: dict[str, Tensor] = {}
            if config.method == "clip-refine":
                if config.lambda_cont:
                    parts["clip"] = config.lambda_cont * clip_loss(
                        F.normalize(za, dim=1), F.normalize(zb, dim=1),
                        student.logit_scale.detach()).loss
                if config.lambda_rand:
                    parts["rafa"] = config.lambda_rand * rafa_loss(
                        za, zb, normalize=config.normalize, generator=generator)
            else:
                labels = [data.tables[a_key].items[r].get("labels", {}).get(config.label, "")
                          for r in rows[a_key]]
                missing = sorted({v for v in labels if v not in class_index})
                if missing:
                    raise ModalignError(f"label={config.label!r}: training rows carry values "
                                        f"without a class prompt: {missing[:5]}")
                y = torch.tensor([class_index[v] for v in labels])
                protos = student.head_for(b_key)(prompt_features.flatten(0, 1))  # type: ignore[union-attr]
                protos = F.normalize(F.normalize(protos, dim=1).reshape(
                    len(classnames), -1, protos.shape[1]).mean(1), dim=1)
                parts["cma"] = cma_loss(za, protos[y], student.logit_scale.detach(),
                                        config.cma_lambda).loss
            if config.lambda_kd:
                parts["hycd"] = config.lambda_kd * hycd_loss(
                    za, zb, ta, tb, alpha=config.alpha, temperature=config.temperature,
                    normalize=config.normalize)
            if not parts:
                raise ModalignError("refine: every loss weight is 0; nothing to train")
            loss = torch.stack(list(parts.values())).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            log.append({"step": step, "loss": float(loss.detach()),
                        **{k: float(v.detach()) for k, v in parts.items()}})
        if progress:
            print(f"refine: epoch {epoch + 1}/{config.epochs} loss {log[-1]['loss']:.4f}")
    student.eval()
    return RefineResult(student, step, time.perf_counter() - start, log)


def _tower_params(model: MultiTowerModel, modality: str, stages: int) -> list[nn.Parameter]:
    """The trained parameters of a fine-tuned tower: its LoRA adapters, else its last
    ``stages`` stages; the tower stays in eval mode (BatchNorm statistics fixed)."""
    tower: Any = model.towers[modality]  # an Encoder module: freeze/trainable_tail checked below
    tower.eval()
    if modality in model.config.lora:
        return [p for n, p in tower.named_parameters() if "lora_" in n]
    if not hasattr(tower, "trainable_tail"):
        raise ModalignError(f"refine: the fine-tuned {modality!r} tower has no "
                            "trainable_tail(k) to choose its stages from")
    tower.freeze()
    try:
        return list(tower.trainable_tail(stages))
    except ValueError as err:
        raise ModalignError(f"tower_stages={stages!r}: {err}") from None


def _features(model: MultiTowerModel, modality: str, x: Any, raw: bool) -> Tensor:
    """Head outputs of tower features, or of a preprocessed raw batch encoded by the tower."""
    if raw:
        x = model.tower(modality).encode(x).float()
    return model.head_for(modality)(x)


def _item(by_id: Mapping[str, Item], row: Mapping[str, Any]) -> Item:
    item = by_id.get(row["id"])
    if item is None:
        raise ModalignError(f"dataset: item {row['id']!r} of the embedding store is not in it")
    return item


def joint_embeddings(model: MultiTowerModel, store: EmbeddingStore, split: str,
                     modalities: Sequence[str], dataset: PairedDataset | None = None,
                     ) -> dict[str, Embeddings]:
    """Joint embeddings of ``split`` per modality: store features projected by the heads, or
    (fine-tuned towers) ``dataset``'s raw inputs encoded by the model."""
    from modalign.embed.joint import fine_tuned_embeddings

    out = {}
    for m in modalities:
        if (tuned := fine_tuned_embeddings(model, m, split, store, dataset)) is not None:
            out[m] = tuned
            continue
        raw = store.load(m, split=split)
        if len(raw) == 0:
            raise ModalignError(f"split={split!r}: modality {m!r} has no rows in {store.path}")
        out[m] = Embeddings(model.project_array(m, raw.vectors), raw.items, raw.group_index)
    return out


def evaluate_model(model: MultiTowerModel, store: EmbeddingStore, *, split: str = "test",
                   modalities: tuple[str, str] = ("image", "text"), label: str | None = None,
                   prompt_features: Tensor | None = None, classnames: Sequence[str] = (),
                   dataset: PairedDataset | None = None) -> dict[str, float]:
    """Gap, cross-modal retrieval and (with prompts) zero-shot accuracy on ``split``.

    ``gap`` is the distance between the modality centroids of unit embeddings, ``gap_sq_per_dim``
    CLIP-Refine's ``|mu_a - mu_b|^2 / d``; retrieval keys are those of
    :func:`modalign.evaluate.retrieval.cross_modal_retrieval` (recall@1/5/10, map, ...).
    """
    from modalign.evaluate.retrieval import cross_modal_retrieval
    from modalign.evaluate.zeroshot import zero_shot_classification
    from modalign.geometry.gap import modality_gap

    emb = joint_embeddings(model, store, split, modalities, dataset)
    a, b = modalities
    gap = modality_gap(emb[a].vectors, emb[b].vectors)
    d = emb[a].dim
    metrics: dict[str, float] = {"gap": gap.centroid_distance,
                                 "gap_sq_per_dim": gap.centroid_distance**2 / d}
    ret = cross_modal_retrieval(emb, (a, b), k_values=(1, 5, 10))
    for key, value in ret.metrics.items():
        if ("recall@" in key and "true" not in key) or key.endswith("_map"):
            metrics[key] = value
    if label and prompt_features is not None:
        protos = prototypes(model, prompt_features, b)
        keep = np.array([v in set(classnames) for v in emb[a].labels(label)])
        zs = zero_shot_classification(emb[a].subset(keep), protos, list(classnames), label=label)
        metrics.update({f"zeroshot_{k}": v for k, v in zs.metrics.items()})
    return metrics


def prototypes(model: MultiTowerModel, prompt_features: Tensor, modality: str = "text") -> Tensor:
    """Class prototypes: prompt features projected, normalised, averaged over templates."""
    from modalign.evaluate.zeroshot import class_prototypes

    c, t, f = prompt_features.shape
    with torch.no_grad():
        z = model.project(modality, prompt_features.reshape(c * t, f))
    return class_prototypes(z.reshape(c, t, -1))


def config_dict(config: RefineConfig) -> dict[str, Any]:
    """The settings as JSON-ready data."""
    out = asdict(config)
    out["modalities"], out["templates"] = list(config.modalities), list(config.templates)
    return out


def label_classes(store: EmbeddingStore, modality: str, label: str) -> list[str]:
    """Sorted label values present on ``modality``'s rows (all splits)."""
    values = sorted({v for v in store.load(modality).labels(label) if v})
    if not values:
        raise ModalignError(f"label={label!r}: no {modality} row of {store.path} carries it")
    return values


def as_mapping(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``{prefix/key: value}``."""
    return {f"{prefix}/{k}": v for k, v in metrics.items()}
