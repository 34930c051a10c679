"""Post-training refinement of a trained model: CLIP-Refine (RaFA + HyCD) and the CMA objective."""

from modalign.refine.core import RefineConfig, RefineResult, evaluate_model, refine_model
from modalign.refine.losses import hycd_loss, rafa_loss

__all__ = ["RefineConfig", "RefineResult", "evaluate_model", "hycd_loss", "rafa_loss",
           "refine_model"]
