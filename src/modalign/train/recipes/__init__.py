"""Training recipes: systems that change how a model is trained around its objectives.

Each recipe is a config section of ``modalign train`` (off by default) with a small hook in the
loop: :mod:`~modalign.train.recipes.momentum` (ALBEF momentum distillation, ``[momentum]``),
:mod:`~modalign.train.recipes.distill` (contrastive distillation from a teacher, ``[distill]``),
:mod:`~modalign.train.recipes.negatives` (compositional hard negatives, ``[negatives]``) and
:mod:`~modalign.train.recipes.harmonize` (cross-modality gradient harmonization,
``[harmonize]``).
"""

from modalign.train.recipes.distill import ContrastiveDistillation, DistillConfig
from modalign.train.recipes.harmonize import GradientHarmonization, HarmonizeConfig
from modalign.train.recipes.momentum import MomentumConfig, MomentumDistillation
from modalign.train.recipes.negatives import HardNegatives, NegativesConfig

__all__ = ["ContrastiveDistillation", "DistillConfig", "GradientHarmonization", "HardNegatives",
           "HarmonizeConfig", "MomentumConfig", "MomentumDistillation", "NegativesConfig"]
