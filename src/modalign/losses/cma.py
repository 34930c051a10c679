"""Cross-modal alignment (CMA) regulariser for OoD detection (Kim & Hwang, CVPR 2025).

Inputs are an ID batch of images and the class prompts of their labels (``t_k = prompt(y_k)``).
With ``L = s * cos(e_img, e_txt)`` the official loss is, per direction,
``CE(L, diag) + lam * mean(-logsumexp(L))``, averaged over the two directions. Since
``CE = mean(-L_kk + LSE)``, each direction equals ``mean(-L_kk + (1 - lam) * LSE)``: the
regulariser scales the repulsion down. On the sphere ``|x - t|^2 = 2 - 2 cos``, so ``-LSE(s cos)``
is (up to an affine map) a soft-min of the squared image-text distances: the energy the paper
minimises to pull ID images and texts together. ``lam = 0`` is the CLIP (FLYP) loss; ``lam = 1``
keeps only the attraction (collapse risk).

Same-class rows give duplicate prompts; the official code keeps them as negatives
(``label_aware=False``); ``label_aware=True`` removes the other rows of the same class (``groups``)
from each softmax.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.losses._support import pick
from modalign.losses.base import ScaledLoss, ScaleOptions
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.vocabulary import direction_name

CMA_DEFAULT_LAMBDA = 0.001
"""The value of the official README command (the argparse default is 0)."""


def cma_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float, lam: float = 0.001, *,
             groups: Tensor | None = None, label_aware: bool = False,
             names: Sequence[str] = ("image", "text")) -> LossOutput:
    """CMA loss of B image embeddings and the B class-prompt embeddings of their labels.

    Args:
        image: ``(B, d)`` image embeddings (normalised here).
        text: ``(B, d)`` embeddings of each row's class prompt (normalised here).
        logit_scale: ``s`` (1 / temperature).
        lam: weight of the ``-logsumexp`` regulariser.
        groups: ``(B,)`` class id per row; used only with ``label_aware``.
        label_aware: drop the other rows of the same class from each softmax.
        names: the two modality names in the part names.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
        >>> out = cma_loss(a, b, 10.0, 0.0)
        >>> sorted(out.parts)
        ['image-to-text', 'lse', 'text-to-image']
    """
    if not math.isfinite(float(lam)):
        raise ValueError(f"lam must be finite, got {lam}")
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"image and text must be (B, d) of equal shape, got {tuple(image.shape)} "
                         f"and {tuple(text.shape)}")
    logits = logit_scale * F.normalize(image, dim=1) @ F.normalize(text, dim=1).T
    if label_aware:
        if groups is None or groups.shape != (len(image),):
            raise ValueError("label_aware=True needs groups: one class id per row")
        same = groups.view(-1, 1) == groups.view(1, -1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    diag = logits.diagonal()
    lse_row = torch.logsumexp(logits, dim=1)
    lse_col = torch.logsumexp(logits, dim=0)
    i2t = (lse_row - diag).mean() - lam * lse_row.mean()
    t2i = (lse_col - diag).mean() - lam * lse_col.mean()
    lse = (lse_row.mean() + lse_col.mean()) / 2
    parts = {direction_name(*names): i2t, direction_name(names[1], names[0]): t2i,
             "lse": lse.detach()}
    return LossOutput((i2t + t2i) / 2, parts)


@register_loss("cma")
class CMALoss(ScaledLoss):
    """The CMA objective; ``modalities = (image, class-prompt text)``; learnable, unbounded tau.

    ``groups`` (the class of each row) is used only with ``label_aware=True`` (and refused
    otherwise).

    Examples:
        >>> loss = CMALoss(["image", "text"], lam=0.001)
        >>> emb = {"image": torch.randn(3, 4), "text": torch.randn(3, 4)}
        >>> loss(emb).loss.ndim
        0
    """

    supports_groups = True
    scale_defaults = ScaleOptions(temperature=0.07, temperature_bounds=(0.0, math.inf))

    def __init__(self, modalities: Sequence[str], *, lam: float = CMA_DEFAULT_LAMBDA,
                 label_aware: bool = False, **options: Any) -> None:
        super().__init__(modalities, **options)
        if not math.isfinite(float(lam)):
            raise ValueError(f"lam must be finite, got {lam}")
        self.lam = float(lam)
        self.label_aware = bool(label_aware)
        self.supports_groups = self.label_aware

    def compute(self, embeddings: Mapping[str, Tensor], groups: Tensor | None,
                indices: Tensor | None) -> LossOutput:
        image, text = pick(embeddings, self.modalities)
        return cma_loss(image, text, self.logit_scale(), self.lam, groups=groups,
                        label_aware=self.label_aware, names=self.modalities)

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, lam={self.lam}, label_aware={self.label_aware}"
