"""Geometry of a joint embedding space: each diagnostic a pure function of embeddings.

Inputs are ``(n, d)`` numpy arrays (memory-mapped float32 included) or torch tensors; rows are
L2-normalised first unless a function says otherwise. :func:`diagnose` runs them all and returns one
JSON-ready record; :func:`modalign.geometry.report.diagnosis_page` renders records as a
self-contained HTML report.

Examples:
    >>> import numpy as np
    >>> from modalign.geometry import modality_gap, uniformity
    >>> x = np.random.default_rng(0).normal(size=(100, 8))
    >>> modality_gap(x, x[::-1]).centroid_distance < 1e-12
    True
"""

from modalign.geometry.agreement import neighbour_agreement
from modalign.geometry.cone import (
    mean_cross_cosine,
    mean_pairwise_cosine,
    mean_positive_cosine,
    paired_sums,
)
from modalign.geometry.diagnose import DiagnoseOptions, diagnose, pair_rows_by_group
from modalign.geometry.gap import GapResult, centroid, modality_gap
from modalign.geometry.hubness import hubness
from modalign.geometry.mir import (
    MIRResult,
    frechet_distance,
    modality_integration_rate,
    sqrtm_psd,
    trace_sqrt_product,
)
from modalign.geometry.separability import linear_separability
from modalign.geometry.spectrum import Spectrum, effective_rank, joint_spectrum, spectrum
from modalign.geometry.temperature import (
    clamped_share,
    logit_scale_history,
    similarity_margins,
    temperature_health,
)
from modalign.geometry.uniformity import alignment, cross_uniformity, uniformity

__all__ = [
    "DiagnoseOptions",
    "GapResult",
    "MIRResult",
    "Spectrum",
    "alignment",
    "centroid",
    "clamped_share",
    "cross_uniformity",
    "diagnose",
    "effective_rank",
    "frechet_distance",
    "hubness",
    "joint_spectrum",
    "linear_separability",
    "logit_scale_history",
    "mean_cross_cosine",
    "mean_pairwise_cosine",
    "mean_positive_cosine",
    "modality_gap",
    "modality_integration_rate",
    "neighbour_agreement",
    "pair_rows_by_group",
    "paired_sums",
    "similarity_margins",
    "spectrum",
    "sqrtm_psd",
    "temperature_health",
    "trace_sqrt_product",
    "uniformity",
]
