"""Contrastive objectives. Every loss takes embeddings keyed by modality and returns LossOutput."""

# ruff: noqa: F401, I001  (the built-in modules are imported for their registrations)

from modalign.losses.output import LossOutput
from modalign.losses.base import LossModule, ScaledLoss, ScaleOptions
from modalign.losses.registry import available_losses, build_loss, loss_class, register_loss

# Built-in loss modules (each registers its losses on import), one line per module.
from modalign.losses import clip
from modalign.losses import siglip
from modalign.losses import gap
from modalign.losses import intra
from modalign.losses import objective
from modalign.losses import cwcl
from modalign.losses import isogclr
from modalign.losses import geodesic_mixup
from modalign.losses import m3col
from modalign.losses import one_to_k
from modalign.losses import slap
from modalign.losses import modx
from modalign.losses import symile
from modalign.losses import gram
from modalign.losses import multiview
from modalign.losses import cma

from modalign.losses.objective import LossTerm, Objective, PairwiseLoss, build_objective

__all__ = [
    "LossModule",
    "LossOutput",
    "LossTerm",
    "Objective",
    "PairwiseLoss",
    "ScaleOptions",
    "ScaledLoss",
    "available_losses",
    "build_loss",
    "build_objective",
    "loss_class",
    "register_loss",
]
