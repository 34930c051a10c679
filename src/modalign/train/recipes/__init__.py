"""Training recipes: systems that change how a model is trained around its objectives.

Each recipe is a config section of ``modalign train`` (off by default) with a small hook in the
loop: :mod:`~modalign.train.recipes.momentum` (ALBEF momentum distillation, ``[momentum]``),
:mod:`~modalign.train.recipes.distill` (contrastive distillation from a teacher, ``[distill]``),
:mod:`~modalign.train.recipes.negatives` (compositional hard negatives, DeGLA's IGC, TGC and
self-distillation, ``[negatives]``), :mod:`~modalign.train.recipes.harmonize` (cross-modality
gradient harmonization, ``[harmonize]``), :mod:`~modalign.train.recipes.mcl` (multistage
contrastive learning, ``[mcl]``). :mod:`~modalign.train.recipes.fdt` (finite discrete tokens,
``[fdt]``) trains its own model from token arrays; :mod:`~modalign.train.recipes.clsr` (latent
reconstruction) is an objective, ``loss = "clsr"``.
"""

from modalign.train.recipes.clsr import CLSRLoss
from modalign.train.recipes.distill import ContrastiveDistillation, DistillConfig
from modalign.train.recipes.harmonize import GradientHarmonization, HarmonizeConfig
from modalign.train.recipes.momentum import MomentumConfig, MomentumDistillation
from modalign.train.recipes.negatives import HardNegatives, NegativesConfig

__all__ = ["CLSRLoss", "ContrastiveDistillation", "DistillConfig", "GradientHarmonization",
           "HardNegatives", "HarmonizeConfig", "MomentumConfig", "MomentumDistillation",
           "NegativesConfig"]
