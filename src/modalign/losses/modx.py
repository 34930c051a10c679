"""Mod-X (Ni et al., ICML 2023): distil the old model's off-diagonal similarity structure.

``KL(softmax(P_old_i) || softmax(P_new_i))`` per row, both directions; rows where the old model
"misunderstands" sample i (its argmax is not i) take the new row as target, so they contribute
zero and carry no gradient ("cognition align").
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from modalign.distributed.gather import GatherGrad, ProcessGroup
from modalign.losses._support import gather_rows, local_labels, pick, unit_rows
from modalign.losses.base import ScaledLoss, ScaleOptions, as_modalities, caller_stacklevel
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_positive
from modalign.vocabulary import direction_name

Reduction = Literal["mean", "sum"]


def aligned_row_kl(
    new_logits: Tensor, old_logits: Tensor, positives: Tensor | None = None
) -> Tensor:
    """Per-row ``KL(softmax(old) || softmax(new))`` after cognition align, shape (rows,).

    ``positives[i]`` is the column of row i's own pair (default ``i``). ``old_logits`` is detached;
    a row whose old argmax is not its positive takes the detached new row as target, so it
    contributes exactly 0 and no gradient.
    """
    if positives is None:
        positives = torch.arange(new_logits.shape[0], device=new_logits.device)
    old = old_logits.detach()
    misread = old.argmax(dim=1) != positives
    log_p_old = old.log_softmax(dim=1)
    kl = (log_p_old.exp() * (log_p_old - new_logits.log_softmax(dim=1))).sum(dim=1)
    return kl.masked_fill(misread, 0.0)


def modx_loss(
    new_x: Tensor, new_y: Tensor, old_x: Tensor, old_y: Tensor,
    logit_scale: Tensor | float = 1.0, *, reduction: Reduction = "mean",
    gather: GatherGrad | None = GatherGrad.GLOBAL, process_group: ProcessGroup | None = None,
    names: Sequence[str] = ("x", "y"), temperature: float | None = None,
) -> LossOutput:
    """Mod-X distillation: ``(KL_x2y + KL_y2x) / 2`` on cosines times ``logit_scale`` (1 / tau).

    ``old_*`` come from the frozen previous model and are detached. ``reduction="mean"`` averages
    the per-row KL (batch-size free); ``"sum"`` adds them, the reference code's scaling, which grows
    with the batch. The reference uses tau = 1 (unscaled cosines) and adds the term to CLIP with
    weight 20. Across processes, local rows are scored against all columns. ``names`` name the
    parts ``x-to-y`` and ``y-to-x``; ``temperature=tau`` is the older spelling of
    ``logit_scale=1/tau``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
        >>> float(modx_loss(x, y, x, y).loss)
        0.0
    """
    if temperature is not None:
        warnings.warn("modx_loss(temperature=tau) is deprecated; use logit_scale=1/tau",
                      FutureWarning, stacklevel=caller_stacklevel())
        check_positive("temperature", temperature)
        logit_scale = 1 / temperature
    check_positive("logit_scale", logit_scale)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    nx = unit_rows(new_x, "new_x")
    ny = unit_rows(new_y, "new_y", rows=nx.shape[0], dim=nx.shape[1])
    ox = unit_rows(old_x, "old_x", rows=nx.shape[0]).detach()
    oy = unit_rows(old_y, "old_y", rows=nx.shape[0], dim=ox.shape[1]).detach()
    all_nx = gather_rows(nx, gather, process_group)
    sizes = list(all_nx.sizes)
    all_ny = gather_rows(ny, gather, process_group, sizes).tensor
    frozen = None if gather is None else GatherGrad.NONE
    all_ox = gather_rows(ox, frozen, process_group, sizes).tensor
    all_oy = gather_rows(oy, frozen, process_group, sizes).tensor
    positives = local_labels(all_nx, nx.device)
    factor = all_nx.world_size / (all_nx.total if reduction == "mean" else 1)
    s = logit_scale
    x2y = aligned_row_kl(nx @ all_ny.T * s, ox @ all_oy.T * s, positives).sum() * factor
    y2x = aligned_row_kl(ny @ all_nx.tensor.T * s, oy @ all_ox.T * s, positives).sum() * factor
    parts = {direction_name(*names): x2y, direction_name(names[1], names[0]): y2x}
    return LossOutput((x2y + y2x) / 2, parts)


@register_loss("modx")
class ModXLoss(ScaledLoss):
    """Mod-X distillation; ``old_keys`` name the frozen old model's embeddings (``<m>_old``).

    tau = 1, fixed (the reference's unscaled cosines); the temperature keywords of
    :class:`~modalign.losses.base.ScaleOptions` change it. Combine it with ``clip`` in the
    objective list (the reference weight is 20).

    Examples:
        >>> loss = ModXLoss(["image", "text"])
        >>> emb = {k: torch.randn(4, 8) for k in ["image", "text", "image_old", "text_old"]}
        >>> sorted(loss(emb).parts)
        ['image-to-text', 'text-to-image']
    """

    distributed = True
    scale_defaults = ScaleOptions(temperature=1.0, learnable_temperature=False)

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        old_keys: Sequence[str] | None = None,
        reduction: Reduction = "mean",
        **options: Any,
    ) -> None:
        super().__init__(modalities, **options)
        keys = old_keys if old_keys is not None else [f"{m}_old" for m in self.modalities]
        self.old_keys = as_modalities(keys, 2, name="old_keys")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        x, y = pick(embeddings, self.modalities)
        ox, oy = pick(embeddings, self.old_keys)
        pick(embeddings, [self.modalities[0], self.old_keys[0]], same_dim=False)
        return modx_loss(x, y, ox, oy, self.logit_scale(), reduction=self.reduction,
                         gather=self.gather, names=self.modalities)
