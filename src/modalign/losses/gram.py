"""GRAM (Cicchetti et al., ICLR 2025): the volume of the Gram matrix as an N-modal similarity.

For unit vectors v_1..v_k, ``Vol = sqrt(det(A A^T))`` with ``A = [v_1; ...; v_k]``: 0 when they are
aligned, 1 when orthonormal. The anchor modality is contrasted against tuples of the others; the
non-anchor modalities stay paired within a tuple.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.distributed.gather import GatherGrad, ProcessGroup
from modalign.losses._support import (
    check_fraction,
    checked,
    gather_rows,
    local_labels,
    pick,
    unit_rows,
)
from modalign.losses.base import ScaledLoss
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_positive
from modalign.vocabulary import direction_name

DEFAULT_VOLUME_EPS = 1e-8


def gram_volume(anchors: Tensor, *tuples: Tensor, eps: float = DEFAULT_VOLUME_EPS) -> Tensor:
    """(B1, B2) volumes ``sqrt(det G_ij + eps)`` between anchor row i and tuple j of ``tuples``.

    ``G_ij`` is the Gram matrix of ``(anchors[i], tuples[0][j], tuples[1][j], ...)``; rows are
    L2-normalised here. The determinant is taken in float64 and ``eps > 0`` keeps the gradient
    finite where the vectors align (``d sqrt(x)/dx`` is unbounded at 0); the result has the
    anchors' dtype.

    Examples:
        >>> a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> round(float(gram_volume(a, b, eps=0.0)), 4)
        1.0
    """
    if not tuples:
        raise ValueError("tuples must hold at least one tensor besides the anchors")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    a = unit_rows(anchors, "anchors").double()
    others = [
        unit_rows(t, f"tuples[{k}]", rows=tuples[0].shape[0], dim=a.shape[1]).double()
        for k, t in enumerate(tuples)
    ]
    b1, b2, k = a.shape[0], others[0].shape[0], len(others) + 1
    stacked = torch.stack(others, dim=1)  # (B2, k-1, d)
    within = stacked @ stacked.transpose(1, 2)  # (B2, k-1, k-1), the within-tuple cosines
    cross = torch.einsum("id,jmd->ijm", a, stacked)  # (B1, B2, k-1)
    gram = a.new_empty(b1, b2, k, k)
    gram[..., 0, 0] = 1.0
    gram[..., 0, 1:] = cross
    gram[..., 1:, 0] = cross
    gram[..., 1:, 1:] = within.unsqueeze(0)
    det = torch.linalg.det(gram).clamp_min(0.0)
    return (det + eps).sqrt().to(anchors.dtype)


def gram_loss(
    anchors: Tensor,
    tuples: Sequence[Tensor],
    logit_scale: Tensor | float,
    *,
    label_smoothing: float = 0.1,
    eps: float = DEFAULT_VOLUME_EPS,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
    names: Sequence[str] = ("anchors", "tuples"),
) -> LossOutput:
    """``(CE(-s V, diag) + CE(-s V^T, diag)) / 2`` with ``V = gram_volume(anchors, *tuples)``.

    Across processes each rank scores its anchors against all tuples and its tuples against all
    anchors; the mean of the per-rank losses is the single-process loss. Parts: ``A-to-T`` and
    ``T-to-A`` with ``names = (A, T)``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> t, v, a = (torch.randn(4, 8, generator=g) for _ in range(3))
        >>> sorted(gram_loss(t, [v, a], 1 / 0.07).parts)
        ['anchors-to-tuples', 'tuples-to-anchors']
    """
    check_positive("logit_scale", logit_scale)
    check_fraction(label_smoothing, "label_smoothing")
    if not tuples:
        raise ValueError("tuples must hold at least one tensor besides the anchors")
    checked(anchors, "anchors", normalize=True)
    for k, t in enumerate(tuples):
        checked(t, f"tuples[{k}]", rows=anchors.shape[0], dim=anchors.shape[1], normalize=True)
    all_anchors = gather_rows(anchors, gather, process_group)
    all_tuples = [
        gather_rows(t, gather, process_group, list(all_anchors.sizes)).tensor for t in tuples
    ]
    labels = local_labels(all_anchors, anchors.device)
    factor = all_anchors.world_size / all_anchors.total
    a2t = -logit_scale * gram_volume(anchors, *all_tuples, eps=eps)
    if all_anchors.world_size == 1:
        t2a = a2t.T
    else:
        t2a = -logit_scale * gram_volume(all_anchors.tensor, *tuples, eps=eps).T
    a2t_loss, t2a_loss = (
        F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum") * factor
        for logits in (a2t, t2a)
    )
    parts = {direction_name(*names): a2t_loss, direction_name(names[1], names[0]): t2a_loss}
    return LossOutput((a2t_loss + t2a_loss) / 2, parts)


@register_loss("gram")
class GramLoss(ScaledLoss):
    """GRAM volume loss; ``modalities[0]`` is the anchor (text in the paper), the rest the tuple.

    The temperature (0.07 at init) is learned as a log logit scale and kept in [0.01, 1], unlike the
    reference's unclamped learnable divisor; label smoothing defaults to 0.1 as there.

    Examples:
        >>> loss = GramLoss(["text", "video", "audio"])
        >>> emb = {m: torch.randn(4, 8) for m in ["text", "video", "audio"]}
        >>> sorted(loss(emb).parts)
        ['text-to-video+audio', 'video+audio-to-text']
    """

    max_modalities = None
    distributed = True

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        label_smoothing: float = 0.1,
        eps: float = DEFAULT_VOLUME_EPS,
        **options: Any,
    ) -> None:
        super().__init__(modalities, **options)
        check_fraction(label_smoothing, "label_smoothing")
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        self.label_smoothing, self.eps = float(label_smoothing), float(eps)

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        anchors, *tuples = pick(embeddings, self.modalities)
        names = (self.modalities[0], "+".join(self.modalities[1:]))
        return gram_loss(anchors, tuples, self.logit_scale(), label_smoothing=self.label_smoothing,
                         eps=self.eps, gather=self.gather, names=names)
