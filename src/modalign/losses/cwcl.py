"""CWCL: continuously weighted contrastive loss (Srinivasa et al., NeurIPS 2023).

One modality (U) is frozen and pretrained; its intra-modal similarities give soft targets for the
other one (V): ``w_ij = ((p_i . p_j + 1) / 2) ** sharpness``, row-normalised and detached. With
``sharpness = 1`` this is the paper's weight ``p_i.p_j / 2 + 0.5``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from modalign.distributed.gather import GatherGrad, ProcessGroup
from modalign.losses._support import gather_rows, local_labels, pick, unit_rows
from modalign.losses.base import ScaledLoss
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_positive
from modalign.vocabulary import direction_name


def cwcl_weights(
    frozen: Tensor, *, sharpness: float = 1.0, columns: Tensor | None = None
) -> Tensor:
    """Row-normalised, detached CWCL targets from the frozen modality's intra-modal cosines.

    ``w_ij = ((cos(p_i, p_j) + 1) / 2) ** sharpness`` for rows ``p_i`` of ``frozen`` and rows
    ``p_j`` of ``columns`` (default: ``frozen``), so ``w`` lies in [0, 1] with ``w_ii = 1`` before
    the row normalisation; a larger ``sharpness`` moves the targets towards one-hot.

    Examples:
        >>> import torch
        >>> w = cwcl_weights(torch.eye(3))
        >>> torch.allclose(w.sum(1), torch.ones(3))
        True
    """
    check_positive("sharpness", sharpness)
    p = unit_rows(frozen, "frozen").detach()
    cols = p if columns is None else unit_rows(columns, "columns", dim=p.shape[1]).detach()
    w = ((p @ cols.T + 1) / 2).clamp(0, 1) ** sharpness
    return w / w.sum(dim=1, keepdim=True)


def cwcl_loss(
    frozen: Tensor,
    trained: Tensor,
    logit_scale: Tensor | float,
    *,
    sharpness: float = 1.0,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
    names: Sequence[str] = ("frozen", "trained"),
) -> LossOutput:
    """CWCL between a frozen modality U (``frozen``) and a trained modality V (``trained``).

    ``U->V = -mean_i sum_j wbar_ij log softmax_j(s p_i.q_j)`` with ``wbar`` from
    :func:`cwcl_weights`; ``V->U`` is the standard InfoNCE of ``q_i`` against all ``p_j``. The total
    is their mean. Both inputs are L2-normalised here; no gradient reaches ``frozen`` through the
    targets. Across processes the local rows are scored against every rank's columns. ``names``
    (frozen, trained) name the parts ``U-to-V`` and ``V-to-U``.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> p, q = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
        >>> out = cwcl_loss(p, q, 10.0)
        >>> sorted(out.parts)
        ['frozen-to-trained', 'trained-to-frozen']
    """
    p = unit_rows(frozen, "frozen")
    q = unit_rows(trained, "trained", rows=p.shape[0], dim=p.shape[1])
    check_positive("logit_scale", logit_scale)
    all_p = gather_rows(p, gather, process_group)
    all_q = gather_rows(q, gather, process_group, list(all_p.sizes)).tensor
    labels = local_labels(all_p, p.device)
    factor = all_p.world_size / all_p.total
    targets = cwcl_weights(p, sharpness=sharpness, columns=all_p.tensor)
    u_to_v = -(targets * (logit_scale * p @ all_q.T).log_softmax(dim=1)).sum() * factor
    v_to_u = F.cross_entropy(logit_scale * q @ all_p.tensor.T, labels, reduction="sum") * factor
    parts = {direction_name(*names): u_to_v, direction_name(names[1], names[0]): v_to_u}
    return LossOutput((u_to_v + v_to_u) / 2, parts)


@register_loss("cwcl")
class CWCLLoss(ScaledLoss):
    """CWCL with a learnable temperature (0.07); ``modalities = (frozen, trained)``.

    Examples:
        >>> import torch
        >>> loss = CWCLLoss(["image", "text"])
        >>> g = torch.Generator().manual_seed(0)
        >>> emb = {"image": torch.randn(4, 8, generator=g), "text": torch.randn(4, 8, generator=g)}
        >>> sorted(loss(emb).parts)
        ['image-to-text', 'text-to-image']
    """

    distributed = True

    def __init__(self, modalities: Sequence[str], *, sharpness: float = 1.0, **options: Any
                 ) -> None:
        super().__init__(modalities, **options)
        check_positive("sharpness", sharpness)
        self.sharpness = float(sharpness)

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        frozen, trained = pick(embeddings, self.modalities)
        return cwcl_loss(frozen, trained, self.logit_scale(), sharpness=self.sharpness,
                         gather=self.gather, names=self.modalities)
