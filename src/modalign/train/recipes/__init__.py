"""Training recipes: systems that change how a model is trained around its objectives.

Each recipe is a config section of ``modalign train`` (off by default) with a small hook in the
loop: :mod:`~modalign.train.recipes.momentum` (ALBEF momentum distillation, ``[momentum]``) and
:mod:`~modalign.train.recipes.distill` (contrastive distillation from a teacher, ``[distill]``).
"""

from modalign.train.recipes.distill import ContrastiveDistillation, DistillConfig
from modalign.train.recipes.momentum import MomentumConfig, MomentumDistillation

__all__ = ["ContrastiveDistillation", "DistillConfig", "MomentumConfig", "MomentumDistillation"]
