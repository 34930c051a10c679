"""Modality Integration Rate (Huang et al. 2025): a Fréchet distance between modalities, per layer.

For each layer k with "vision" rows ``v`` (any non-reference modality) and "text" rows ``t`` (the
reference modality):

1. Text-centric normalisation: ``alpha_k = 1 / mean_j ||t_j||``; both sets are multiplied by
   ``alpha_k``, so the result does not change when every hidden state is rescaled.
2. Outlier replacement: rows whose norm is more than ``n_std`` standard deviations away from the
   median norm are replaced by the per-dimension median row (they are not dropped).
3. ``FID_k = ||mu_v - mu_t||^2 + Tr(S_v + S_t - 2 (S_v S_t)^{1/2})`` with unbiased covariances.
4. ``MIR = log10(sum_k FID_k)`` (base 10, as the reference code does; the paper writes "log").

The matrix square root is exact: ``Tr((S_v S_t)^{1/2}) = Tr((S_v^{1/2} S_t S_v^{1/2})^{1/2})``,
a sum of square roots of eigenvalues of a symmetric PSD matrix (``eigh`` in float64, tiny negative
eigenvalues from rounding clamped to 0). The reference code's default "fast" Newton–Schulz routine
starts at its own fixed point and returns ``S_v S_t`` unchanged, i.e. it never takes the root.

Identical sets give ``FID = 0`` and hence ``MIR = log10(0) = -inf``; report the FID alongside.

Examples:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(200, 4))
    >>> frechet_distance(x, x) < 1e-9
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modalign.geometry.inputs import ArrayLike, as_matrices, sample_rows

__all__ = [
    "MIRResult",
    "frechet_distance",
    "frechet_distance_from_moments",
    "modality_integration_rate",
    "replace_norm_outliers",
    "sqrtm_psd",
    "trace_sqrt_product",
]

DEFAULT_MAX_ROWS = 50000


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (float64, ``eigh``).

    Examples:
        >>> sqrtm_psd(torch.diag(torch.tensor([4.0, 9.0]))).diag().tolist()
        [2.0, 3.0]
    """
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a: expected a square matrix, got shape {tuple(a.shape)}")
    a = a.to(torch.float64)
    vals, vecs = torch.linalg.eigh((a + a.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> float:
    """``Tr((s1 s2)^{1/2})`` for symmetric PSD ``s1, s2``, via ``(s1^{1/2} s2 s1^{1/2})^{1/2}``."""
    r = sqrtm_psd(s1)
    m = r @ s2.to(torch.float64) @ r
    vals = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(vals.clamp_min(0).sqrt().sum())


def frechet_distance_from_moments(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor,
                                  cov2: torch.Tensor) -> float:
    """``||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^{1/2})``, clamped at 0 (rounding)."""
    diff = (mu1 - mu2).to(torch.float64)
    value = float(diff @ diff) + float(torch.trace(cov1) + torch.trace(cov2)) \
        - 2.0 * trace_sqrt_product(cov1, cov2)
    return max(value, 0.0)


def frechet_distance(x: ArrayLike, y: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``x`` and ``y`` (float64).

    Invariant to a shared rotation and a shared translation of both sets.
    """
    xm, ym = as_matrices({"x": x, "y": y}, min_rows=2)
    xs = sample_rows(xm, None, 0, "x", normalize=False)
    ys = sample_rows(ym, None, 0, "y", normalize=False)
    return frechet_distance_from_moments(xs.mean(0), torch.cov(xs.T).reshape(xs.shape[1], -1),
                                         ys.mean(0), torch.cov(ys.T).reshape(ys.shape[1], -1))


def replace_norm_outliers(x: torch.Tensor, n_std: float = 3.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace rows whose norm is beyond ``n_std`` std of the median norm by the median row.

    Returns the new matrix and the boolean mask of replaced rows; other rows are untouched.

    Examples:
        >>> x = torch.ones(20, 2); x[3] = 100.0
        >>> new, mask = replace_norm_outliers(x)
        >>> mask.nonzero().flatten().tolist(), new[3].tolist()
        ([3], [1.0, 1.0])
    """
    if n_std <= 0:
        raise ValueError(f"n_std: expected a positive number of standard deviations, got {n_std}")
    norms = x.norm(dim=1)
    mask = (norms - norms.median()).abs() > n_std * norms.std()
    out = x.clone()
    if bool(mask.any()):
        out[mask] = x.median(dim=0).values
    return out, mask


@dataclass(frozen=True)
class MIRResult:
    """MIR (log10 of the summed per-layer FIDs), the FIDs, and the rows replaced per layer."""

    mir: float
    fid_per_layer: list[float]
    outliers_replaced: list[tuple[int, int]]

    def to_dict(self) -> dict[str, Any]:
        return {"mir": self.mir, "fid_total": float(sum(self.fid_per_layer)),
                "fid_per_layer": self.fid_per_layer,
                "outliers_replaced": [list(p) for p in self.outliers_replaced]}


def modality_integration_rate(
    vision_layers: Sequence[ArrayLike],
    text_layers: Sequence[ArrayLike],
    *,
    replace_outliers: bool = True,
    n_std: float = 3.0,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> MIRResult:
    """MIR over layers; ``vision_layers[k]`` (r_k, d_k) and ``text_layers[k]`` (s_k, d_k).

    A single embedding space is one layer: ``modality_integration_rate([img], [txt])``.
    Above ``max_rows`` rows per set, a seeded sample is used.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> v, t = rng.normal(size=(500, 3)), rng.normal(size=(500, 3)) + 1.0
        >>> r1 = modality_integration_rate([v], [t])
        >>> r2 = modality_integration_rate([10 * v], [10 * t])
        >>> abs(r1.mir - r2.mir) < 1e-9
        True
    """
    if len(vision_layers) == 0 or len(vision_layers) != len(text_layers):
        raise ValueError(f"vision_layers, text_layers: expected the same non-zero number of "
                         f"layers, got {len(vision_layers)} and {len(text_layers)}")
    fids: list[float] = []
    replaced: list[tuple[int, int]] = []
    for k, (v, t) in enumerate(zip(vision_layers, text_layers)):
        v_name, t_name = f"vision_layers[{k}]", f"text_layers[{k}]"
        vm, tm = as_matrices({v_name: v, t_name: t}, min_rows=2)
        vs = sample_rows(vm, max_rows, seed, v_name, normalize=False)
        ts = sample_rows(tm, max_rows, seed + 1, t_name, normalize=False)
        mean_norm = float(ts.norm(dim=1).mean())
        if mean_norm == 0.0:
            raise ValueError(f"text_layers[{k}]: all rows are zero; text-centric normalisation "
                             "needs a non-zero mean norm")
        vs, ts = vs / mean_norm, ts / mean_norm
        nv = nt = 0
        if replace_outliers:
            vs, mv = replace_norm_outliers(vs, n_std)
            ts, mt = replace_norm_outliers(ts, n_std)
            nv, nt = int(mv.sum()), int(mt.sum())
        replaced.append((nv, nt))
        d = vs.shape[1]
        fids.append(frechet_distance_from_moments(vs.mean(0), torch.cov(vs.T).reshape(d, d),
                                                  ts.mean(0), torch.cov(ts.T).reshape(d, d)))
    total = sum(fids)
    return MIRResult(mir=math.log10(total) if total > 0 else -math.inf, fid_per_layer=fids,
                     outliers_replaced=replaced)
