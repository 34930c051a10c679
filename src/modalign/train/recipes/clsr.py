"""Contrastive latent space reconstruction (CLSR, "Contrastive Latent Space Reconstruction
Learning for Audio-Text Retrieval", Luo et al. 2023), as the objective ``loss = "clsr"``.

The paper states three parts (intra-modal separability, an adaptive temperature, latent
reconstruction modules) and ships no code; their form here is ours. For two keys ``a``, ``b``
with unit embeddings and a learnable, clamped logit scale ``s = 1 / tau`` (the adaptive
temperature)::

    L_a = mean_i -log( exp(s a_i.b_i) / (sum_j exp(s a_i.b_j) + lambda sum_{j!=i} exp(s a_i.a_j)) )
    L_sep = (L_a + L_b) / 2                       (lambda = intra_weight; 0: the CLIP loss)
    L_rec = mean_i ||g_ab(a_i) - b_i||^2 + ||g_ba(b_i) - a_i||^2
    L = L_sep + rec_weight L_rec

The intra-modal negatives ``a_j`` (other rows of the same modality) in the denominator push
the rows of one modality apart (separability); ``g_ab``, ``g_ba`` are two-layer MLPs
(Linear, GELU, Linear) that reconstruct one modality's latent from the other's, trained with the
heads (their gradients reach both embeddings). Under ``torchrun`` the columns are gathered with
gradient, as for the CLIP loss.

Examples:
    >>> import torch
    >>> loss = CLSRLoss(["audio", "text"], dim=8)
    >>> out = loss({"audio": torch.randn(6, 8), "text": torch.randn(6, 8)})
    >>> sorted(out.parts)
    ['audio-to-text', 'reconstruction', 'text-to-audio']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.distributed.gather import GatherGrad, gather_with_grad
from modalign.errors import ModalignError
from modalign.losses.base import ScaledLoss, ScaleOptions
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.train.recipes._checks import check_weight
from modalign.vocabulary import direction_name


def separability_terms(x: Tensor, y: Tensor, scale: Tensor, intra_weight: float,
                      gather: GatherGrad | None = GatherGrad.GLOBAL) -> tuple[Tensor, Tensor]:
    """``(L_x, L_y)``: InfoNCE of each row against the other modality's rows plus
    ``intra_weight`` times its own modality's other rows in the denominator."""

    def side(q: Tensor, other: Tensor) -> Tensor:
        qs = gather_with_grad(q, gather) if gather is not None else None
        os_ = gather_with_grad(other, gather) if gather is not None else None
        cols = os_.tensor if os_ is not None else other
        same = qs.tensor if qs is not None else q
        offset = qs.offset if qs is not None else 0
        n = q.shape[0]
        rows = torch.arange(n, device=q.device)
        cross = scale * q @ cols.T
        intra = scale * q @ same.T
        intra[rows, offset + rows] = -math.inf  # a row is not its own negative
        parts = [cross]
        if intra_weight > 0:
            parts.append(intra + math.log(intra_weight))
        lse = torch.cat(parts, dim=1).logsumexp(1)
        per_row = lse - cross[rows, offset + rows]
        total = qs.total if qs is not None else n
        world = qs.world_size if qs is not None else 1
        return per_row.sum() * world / total

    return side(x, y), side(y, x)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


@register_loss("clsr")
class CLSRLoss(ScaledLoss):
    """CLSR on two keys: separability with intra-modal negatives, a learnable clamped
    temperature (tau = 0.07, kept in [0.01, 1]), and latent reconstruction both ways.

    Args:
        modalities: the two embedding keys, e.g. ``["audio", "text"]``.
        dim: the joint dimension (the reconstruction networks' input and output size; the
            trainer passes ``model.joint_dim``).
        hidden_dim: width of the reconstruction networks.
        intra_weight: ``lambda``, weight of the intra-modal negatives (0: none).
        rec_weight: weight of the reconstruction term.
        temperature, learnable_temperature, temperature_bounds: the shared scale keywords.
        gather: how gradients cross the all-gather under ``torchrun`` (as for ``clip``).
    """

    distributed = True
    needs_joint_dim: ClassVar[bool] = True
    scale_defaults = ScaleOptions(temperature=0.07)

    def __init__(self, modalities: Sequence[str], *, dim: int, hidden_dim: int = 256,
                 intra_weight: float = 1.0, rec_weight: float = 1.0, **options: Any) -> None:
        super().__init__(modalities, **options)
        for name, v in (("intra_weight", intra_weight), ("rec_weight", rec_weight)):
            check_weight(f"clsr: {name}", v)
        if not (isinstance(dim, int) and dim >= 1 and isinstance(hidden_dim, int)
                and hidden_dim >= 1):
            raise ModalignError(f"clsr: dim and hidden_dim must be positive ints (dim = the "
                                f"joint dimension), got {dim!r}, {hidden_dim!r}")
        self.intra_weight, self.rec_weight = float(intra_weight), float(rec_weight)
        self.reconstruct = nn.ModuleDict({"a_to_b": _mlp(dim, hidden_dim),
                                          "b_to_a": _mlp(dim, hidden_dim)})

    def compute(self, embeddings: Mapping[str, Tensor], groups: Tensor | None,
                indices: Tensor | None) -> LossOutput:
        x, y = (F.normalize(t, dim=-1) for t in self.select(embeddings))
        la, lb = separability_terms(x, y, self.logit_scale().to(x.dtype), self.intra_weight,
                                   self.gather)
        a, b = self.modalities
        rec = (((self.reconstruct["a_to_b"](x) - y) ** 2).sum(-1)
               + ((self.reconstruct["b_to_a"](y) - x) ** 2).sum(-1)).mean()
        loss = (la + lb) / 2 + self.rec_weight * rec
        return LossOutput(loss, {direction_name(a, b): la, direction_name(b, a): lb,
                                 "reconstruction": rec})
