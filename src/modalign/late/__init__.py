"""Late interaction (multi-vector retrieval): MaxSim scoring over token sets of several
modalities, its search, and projection heads trained on MaxSim scores."""

from modalign.late.maxsim import (
    Ragged,
    maxsim_pairs,
    maxsim_scores,
    maxsim_search,
    modality_wins,
    prefilter_search,
    topk_recall,
)

__all__ = ["Ragged", "maxsim_pairs", "maxsim_scores", "maxsim_search", "modality_wins",
           "prefilter_search", "topk_recall"]
