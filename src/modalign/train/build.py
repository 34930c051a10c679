"""What a run trains, built from its config: store, model, towers, objective, recipes, optimiser.

Each function is one piece of :class:`~modalign.train.loop.Trainer`'s set-up; the trainer calls
them in a fixed order (the random draws of a run depend on it).

Examples:
    >>> from modalign.train.config import OptimConfig
    >>> o = OptimConfig(warmup_steps=2, schedule="cosine")
    >>> [round(lr_factor(s, o, total_steps=6), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalign.distributed import runtime as D
from modalign.embed.resolve import dataset_store, load_tower, open_store, recorded_towers
from modalign.embed.store import EmbeddingStore
from modalign.errors import ModalignError, ProtocolError
from modalign.io import read_json
from modalign.losses.objective import Objective, build_objective
from modalign.model import MultiTowerModel, base_modality
from modalign.train.config import OptimConfig, TrainConfig
from modalign.train.data import PairedFeatures
from modalign.train.recipes.distill import ContrastiveDistillation, load_teacher
from modalign.train.recipes.negatives import HardNegatives


# -- store -----------------------------------------------------------------------------------
def resolve_store(config: TrainConfig, ctx: D.DistContext | None = None) -> EmbeddingStore:
    """The store of ``data.embeddings``; else the default store of ``data.dataset`` and the
    configured towers, brought up to date by rank 0 (missing or stale arrays are encoded)."""
    if config.data.embeddings:
        return open_store(config.data.embeddings, option="data.embeddings")
    if not config.data.dataset:
        raise ModalignError("set data.embeddings (a store folder) or data.dataset (e.g. 'emoji')")
    store = dataset_store(config.data.dataset, config.modalities(), config.model.towers,
                          encode=ctx is None or ctx.is_main,
                          option="data.dataset")
    if ctx is not None:
        D.barrier(ctx)
    return store


def tower_specs(config: TrainConfig, store: EmbeddingStore) -> dict[str, str]:
    """Encoder spec per modality: ``model.towers``, else the encoder recorded in the store."""
    specs = dict(config.model.towers)
    specs.update(recorded_towers(store, [m for m in config.modalities() if m not in specs]))
    return specs


# -- model -----------------------------------------------------------------------------------
def feature_dims(config: TrainConfig, data: PairedFeatures) -> dict[str, int]:
    """The (single) feature dimension of each modality's keys."""
    out = {}
    for m in config.modalities():
        dims = {data.feature_dim(k) for k in config.data.keys if base_modality(k) == m}
        if len(dims) != 1:
            raise ModalignError(f"keys of modality {m!r} have different feature dims {dims}")
        out[m] = dims.pop()
    return out


def build_model(config: TrainConfig, data: PairedFeatures, specs: Mapping[str, str],
                dims: Mapping[str, int]) -> MultiTowerModel:
    """The heads to train; the objective owns the temperatures, so the model's own scale is
    frozen (the trainer then gives the model the objective's first one, see
    :meth:`~modalign.model.MultiTowerModel.use_scale`); with ``model.center_features`` each
    modality's training-feature mean is stored as its centre."""
    model = MultiTowerModel(config.model_config(specs, dims))
    model.log_logit_scale.requires_grad_(False)
    if model.logit_bias is not None:
        model.logit_bias.requires_grad_(False)
    if model.config.center_features:
        for m in config.modalities():
            tables = [t.features for k, t in data.tables.items() if base_modality(k) == m]
            feats = tables[0] if len(tables) == 1 else torch.cat(tables)  # no copy of one table
            if model.config.input_norm == "l2":
                feats = F.normalize(feats, dim=-1)
            model.set_feature_center(m, feats.mean(0))
    return model


def attach_towers(model: MultiTowerModel, config: TrainConfig, specs: Mapping[str, str],
                  towers: Mapping[str, Any]) -> tuple[list[str], list[nn.Parameter]]:
    """Attach the towers that encode raw inputs during training: ``train.unfreeze`` tails, then
    ``[lora]`` adapters, then any other given tower (used at inference only).

    Returns the keys whose items are encoded on the fly and the tower parameters to train.
    """
    from modalign.encoders.lora import apply_lora

    raw_keys: list[str] = []
    params: list[nn.Parameter] = []
    for m, k in config.train.unfreeze.items():
        if k <= 0:
            continue
        tower = towers.get(m) or load_tower(specs[m], m)
        if not hasattr(tower, "trainable_tail"):
            raise ProtocolError(f"train.unfreeze[{m!r}]: tower {specs[m]!r} cannot be partly "
                                "unfrozen (it has no trainable_tail(k))")
        tower.freeze()
        params += tower.trainable_tail(k)
        model.attach_tower(m, tower)
        raw_keys += [key for key in config.data.keys if base_modality(key) == m]
    for m, settings in config.lora_settings().items():
        tower = towers.get(m) or load_tower(specs[m], m)
        params += apply_lora(tower, settings)
        model.attach_tower(m, tower)
        raw_keys += [key for key in config.data.keys if base_modality(key) == m]
    return raw_keys, params


def attach_inference_towers(model: MultiTowerModel, towers: Mapping[str, Any]) -> None:
    """Attach the given towers not attached yet (they encode at inference, not in training)."""
    for m, t in towers.items():
        if m not in model.towers:
            model.attach_tower(m, t)


# -- objective and recipes -------------------------------------------------------------------
def training_objective(config: TrainConfig, n_groups: int) -> Objective:
    """The weighted sum of ``objectives``; the terms whose loss declares ``needs_dataset_size``
    (per-sample state, as iSogCLR's) get ``dataset_size = n_groups`` unless the config sets it,
    those that declare ``needs_joint_dim`` (CLSR's networks) ``dim = model.joint_dim``."""
    from modalign.losses.registry import loss_class

    specs = [{"dim": config.model.joint_dim, **spec}
             if getattr(loss_class(spec.get("loss", "")), "needs_joint_dim", False) else spec
             for spec in config.objectives]
    return build_objective(specs, dataset_size=n_groups)


def skip_second_normalisation(objective: nn.Module) -> int:
    """Switch off the L2 normalisation inside the pair losses (CLIP, SigLIP, also within
    pairwise terms): the trainer hands them unit rows (the heads end with one; CLOSE noise
    normalises again), so a second one is the identity, and its Jacobian at a unit row is the
    projection the first already applies: the same loss and gradients up to rounding, two
    normalisations fewer forward and backward per pair. Returns how many losses were switched.

    Examples:
        >>> obj = build_objective([{"loss": "clip", "modalities": ["image", "text"]}])
        >>> skip_second_normalisation(obj), obj.terms[0].normalize
        (1, False)
    """
    from modalign.losses.clip import PairLogitLoss

    switched = 0
    for module in objective.modules():
        if isinstance(module, PairLogitLoss) and module.normalize:
            module.normalize = False
            switched += 1
    return switched


def build_distillation(config: TrainConfig, dims: Mapping[str, int],
                       raw_keys: Sequence[str]) -> ContrastiveDistillation | None:
    """``[distill]``: the frozen teacher and the distillation term (None when off)."""
    if not config.distill.enabled:
        return None
    if raw_keys:
        raise ModalignError("distill.teacher cannot be combined with train.unfreeze: the "
                            "teacher reads cached tower features")
    teacher = load_teacher(config.distill.teacher, dims)
    return ContrastiveDistillation(teacher, config.data.keys, config.distill)


def build_negatives(config: TrainConfig, data: PairedFeatures, specs: Mapping[str, str],
                    towers: Mapping[str, Any], model: MultiTowerModel | None = None
                    ) -> HardNegatives | None:
    """``[negatives]``: hard negative captions of the text key, generated or read from
    ``negatives.file``, encoded with the text tower (None when off); ``model`` starts the EMA
    teacher of the text-grounded contrast and self-distillation."""
    cfg = config.negatives
    if not cfg.enabled:
        return None
    m = base_modality(cfg.text_key)
    tower = towers.get(m) or load_tower(specs[m], m)

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        return torch.cat([tower.encode(tower.preprocess(texts[i:i + 256])).float().cpu()
                          for i in range(0, len(texts), 256)])

    given = None
    if cfg.file:
        given = read_json(cfg.file)
        if not isinstance(given, dict) or not all(
                isinstance(v, list) and all(isinstance(t, str) for t in v)
                for v in given.values()):
            raise ModalignError(f"negatives.file={cfg.file!r} must hold a JSON object "
                                "{caption: [negative caption, ...]}")
    return HardNegatives(data.tables[cfg.text_key].items, encode, cfg, given, model=model)


# -- optimiser and schedule ------------------------------------------------------------------
def build_optimizer(model: nn.Module, objective: nn.Module, extra: Sequence[nn.Parameter],
                    tower_params: Sequence[nn.Parameter], o: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the heads (weight decay on matrices only), the objective's and the recipes'
    parameters (``extra``; no decay) and the trained tower parameters (at ``optim.tower_lr``).
    A parameter the model holds for the objective (its temperature) goes with the objective.
    PyTorch's fused implementation where the parameters allow it (CPU or CUDA, floating)."""
    skip = {id(p) for p in tower_params} | {id(p) for p in objective.parameters()}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        (decay if p.ndim >= 2 and not name.endswith("center") else no_decay).append(p)
    obj_params = [p for p in objective.parameters() if p.requires_grad] + list(extra)
    groups: list[dict[str, Any]] = [
        {"params": decay, "lr": o.lr, "weight_decay": o.weight_decay},
        {"params": no_decay + obj_params, "lr": o.lr, "weight_decay": 0.0}]
    if tower_params:
        groups.append({"params": [p for p in tower_params if p.ndim >= 2], "lr": o.tower_lr,
                       "weight_decay": o.weight_decay})
        groups.append({"params": [p for p in tower_params if p.ndim < 2], "lr": o.tower_lr,
                       "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    # the fused kernel (one pass per tensor instead of a dozen ops) where every parameter allows it
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                 for p in params)
    return torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps,  # type: ignore[arg-type]
                             fused=fused or None)


def lr_factor(step: int, o: OptimConfig, total_steps: int) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then constant or cosine to 0."""
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, total_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return 0.5 * (1 + math.cos(math.pi * progress))
