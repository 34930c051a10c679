"""Intra-modal contrast: symmetric InfoNCE between two views of one modality (TCL's IMC, SLIP).

The two views are any two embedding keys that hold the same samples in the same row order, e.g.
``"image"`` and ``"image:openmoji"`` (two image styles of one concept) or ``"text"`` and
``"text:alias"`` (two captions). The loss is the CLIP loss between the views: cross-view
negatives only, learnable temperature (TCL initialises it at 0.07), the same tiled and
distributed paths.

Examples:
    >>> import torch
    >>> loss = IntraModalLoss(["image", "image:openmoji"])
    >>> out = loss({"image": torch.randn(6, 8), "image:openmoji": torch.randn(6, 8)})
    >>> sorted(out.parts)
    ['image-to-image:openmoji', 'image:openmoji-to-image']
"""

from __future__ import annotations

from modalign.losses.clip import ClipLoss
from modalign.losses.registry import register_loss


@register_loss("intra")
class IntraModalLoss(ClipLoss):
    """InfoNCE between two views of one modality; takes the arguments of :class:`ClipLoss`
    (tau = 0.07, learnable).

    Examples:
        >>> loss = IntraModalLoss(["text", "text:alias"], learnable_temperature=False)
        >>> loss.modalities
        ('text', 'text:alias')
    """
