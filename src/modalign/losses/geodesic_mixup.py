"""Geodesic multimodal mixup, m²-Mix (Oh et al., NeurIPS 2023): hard negatives on the sphere.

Each pair (x_j, y_j) is mixed along the great circle between them, ``n_j = slerp(x_j, y_j, lam)``,
and the mixtures replace the off-diagonal candidates of both anchors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.distributed.gather import GatherGrad, ProcessGroup
from modalign.losses._support import gather_rows, local_labels, pick, unit_rows
from modalign.losses.base import ScaledLoss, ScaleOptions
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_positive, validation_enabled
from modalign.vocabulary import direction_name


def slerp(a: Tensor, b: Tensor, lam: Tensor | float) -> Tensor:
    """Spherical interpolation of unit rows: ``sin(lam t)/sin t * a + sin((1-lam) t)/sin t * b``.

    ``t = arccos(a.b)``; ``lam = 1`` gives ``a``, ``lam = 0`` gives ``b``. The ratios are written
    with ``sinc`` so ``a = b`` needs no special case, the cosine is clamped away from -1 and 1 so
    values and gradients stay finite, and the result is renormalised. At ``a = -b`` the great
    circle is undefined: the result is finite but not meaningful (zero for ``lam = 0.5``).

    Examples:
        >>> a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> slerp(a, b, 0.5)
        tensor([[0.7071, 0.7071]])
    """
    lam_t = torch.as_tensor(lam, dtype=a.dtype, device=a.device)
    if lam_t.ndim == 1:
        lam_t = lam_t.unsqueeze(-1)
    eps = 1e-6 if a.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-12
    cos = (a * b).sum(dim=-1, keepdim=True).clamp(-1 + eps, 1 - eps)
    theta = torch.acos(cos) / math.pi  # in units of pi, as torch.sinc expects
    coef_a = lam_t * torch.sinc(lam_t * theta) / torch.sinc(theta)
    coef_b = (1 - lam_t) * torch.sinc((1 - lam_t) * theta) / torch.sinc(theta)
    return F.normalize(coef_a * a + coef_b * b, dim=-1)


def sample_beta(
    beta: float, size: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``Beta(beta, beta)`` ratios (a scalar, or ``size`` of them) from torch's RNG.

    The seed is taken from ``generator`` (or torch's global generator), so ``torch.manual_seed``
    makes training runs repeatable.

    Examples:
        >>> lam = sample_beta(0.5, generator=torch.Generator().manual_seed(0))
        >>> 0 <= float(lam) <= 1
        True
    """
    check_positive("beta", beta)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    draw = np.random.default_rng(seed).beta(beta, beta, size=size)
    return torch.as_tensor(draw, dtype=torch.float32)


def m2mix_loss(
    x: Tensor,
    y: Tensor,
    logit_scale: Tensor | float,
    lam: Tensor | float,
    *,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
    names: Sequence[str] = ("x", "y"),
) -> LossOutput:
    """m²-Mix: CE of each anchor against its true partner and the mixed negatives ``n_j``, j != i.

    ``L = CE(s [x_i.y_i | x_i.n_j]) + CE(s [y_i.x_i | y_i.n_j])``, ``n_j = slerp(x_j, y_j, lam)``
    (a sum, as in the reference code). Inputs are L2-normalised here; ``lam`` is one ratio or one
    per row. Across processes the local anchors meet the mixtures of every rank's pairs. Parts:
    ``<x>-to-mixed`` and ``<y>-to-mixed`` with ``names``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
        >>> sorted(m2mix_loss(x, y, 1 / 0.07, 0.5).parts)
        ['x-to-mixed', 'y-to-mixed']
    """
    xs = unit_rows(x, "x")
    ys = unit_rows(y, "y", rows=xs.shape[0], dim=xs.shape[1])
    check_positive("logit_scale", logit_scale)
    lam_t = torch.as_tensor(lam, dtype=xs.dtype, device=xs.device)
    if lam_t.ndim > 1 or (lam_t.ndim == 1 and lam_t.shape[0] != xs.shape[0]):
        raise ValueError(
            f"lam must be a scalar or have shape ({xs.shape[0]},), got {tuple(lam_t.shape)}"
        )
    if validation_enabled() and bool(((lam_t < 0) | (lam_t > 1) | ~torch.isfinite(lam_t)).any()):
        raise ValueError("lam must lie in [0, 1]")
    all_x = gather_rows(xs, gather, process_group)
    sizes = list(all_x.sizes)
    all_y = gather_rows(ys, gather, process_group, sizes).tensor
    if lam_t.ndim == 1:
        lam_t = gather_rows(
            lam_t, None if gather is None else GatherGrad.NONE, process_group, sizes
        ).tensor
    mixed = slerp(all_x.tensor, all_y, lam_t)
    labels = local_labels(all_x, xs.device)
    own_column = labels.unsqueeze(1) == torch.arange(all_x.total, device=xs.device).unsqueeze(0)
    positive = (xs * ys).sum(dim=-1, keepdim=True)
    factor = all_x.world_size / all_x.total
    parts = {}
    for name, anchor in zip(names, (xs, ys), strict=True):
        sims = torch.where(own_column, positive, anchor @ mixed.T)
        parts[direction_name(name, "mixed")] = (
            F.cross_entropy(logit_scale * sims, labels, reduction="sum") * factor)
    x_part, y_part = parts.values()
    return LossOutput(x_part + y_part, parts)


@register_loss("m2mix")
class M2MixLoss(ScaledLoss):
    """m²-Mix with ``lam ~ Beta(beta, beta)`` per batch (``beta = 0.5``) and ``tau2 = 0.07``.

    Pass ``generator`` for reproducible ratios. The temperature is fixed by default, as ``tau2`` in
    the reference code; ``learnable_temperature=True`` learns it.

    Examples:
        >>> loss = M2MixLoss(["image", "text"], generator=torch.Generator().manual_seed(0))
        >>> emb = {"image": torch.randn(4, 8), "text": torch.randn(4, 8)}
        >>> sorted(loss(emb).parts)
        ['image-to-mixed', 'lam', 'text-to-mixed']
    """

    distributed = True
    scale_defaults = ScaleOptions(temperature=0.07, learnable_temperature=False)

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        beta: float = 0.5,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> None:
        super().__init__(modalities, **options)
        check_positive("beta", beta)
        self.beta = float(beta)
        self.generator = generator

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        x, y = pick(embeddings, self.modalities)
        lam = sample_beta(self.beta, generator=self.generator)
        out = m2mix_loss(x, y, self.logit_scale(), lam, gather=self.gather, names=self.modalities)
        return LossOutput(out.loss, {**out.parts, "lam": lam.detach()})
