"""Mod-X (Ni et al., ICML 2023): distil the old model's off-diagonal similarity structure.

``KL(softmax(P_old_i) || softmax(P_new_i))`` per row, both directions; rows where the old model
"misunderstands" sample i (its argmax is not i) take the new row as target, so they contribute
zero and carry no gradient ("cognition align").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from modalign.distributed.gather import GatherGrad, ProcessGroup, parse_gather
from modalign.losses._support import gather_rows, local_labels, pick, unit_rows
from modalign.losses.base import as_modalities
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_positive

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
    new_x: Tensor, new_y: Tensor, old_x: Tensor, old_y: Tensor, *,
    temperature: float = 1.0, reduction: Reduction = "mean",
    gather: GatherGrad | None = GatherGrad.GLOBAL, process_group: ProcessGroup | None = None,
) -> LossOutput:
    """Mod-X distillation: ``(KL_x2y + KL_y2x) / 2`` on cosines divided by ``temperature``.

    ``old_*`` come from the frozen previous model and are detached. ``reduction="mean"`` averages
    the per-row KL (batch-size free); ``"sum"`` adds them, the reference code's scaling, which grows
    with the batch. The reference uses ``temperature = 1`` (unscaled cosines) and adds the term to
    CLIP with weight 20. Across processes, local rows are scored against all columns.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
        >>> float(modx_loss(x, y, x, y).loss)
        0.0
    """
    check_positive("temperature", temperature)
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
    parts = {
        "x_to_y": aligned_row_kl(nx @ all_ny.T / temperature, ox @ all_oy.T / temperature,
                                 positives).sum() * factor,
        "y_to_x": aligned_row_kl(ny @ all_nx.tensor.T / temperature, oy @ all_ox.T / temperature,
                                 positives).sum() * factor,
    }
    return LossOutput((parts["x_to_y"] + parts["y_to_x"]) / 2, parts)


@register_loss("modx")
class ModXLoss(nn.Module):
    """Mod-X distillation; ``old_keys`` name the frozen old model's embeddings (``<m>_old``).

    Combine it with ``clip`` in the objective list (the reference weight is 20).

    Examples:
        >>> loss = ModXLoss(["image", "text"])
        >>> emb = {k: torch.randn(4, 8) for k in ["image", "text", "image_old", "text_old"]}
        >>> loss(emb).loss.ndim
        0
    """

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        old_keys: Sequence[str] | None = None,
        temperature: float = 1.0,
        reduction: Reduction = "mean",
        gather: GatherGrad | str | None = GatherGrad.GLOBAL,
    ) -> None:
        super().__init__()
        self.modalities = as_modalities(modalities, 2)
        keys = old_keys if old_keys is not None else [f"{m}_old" for m in self.modalities]
        self.old_keys = as_modalities(keys, 2, name="old_keys")
        check_positive("temperature", temperature)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.temperature, self.reduction = float(temperature), reduction
        self.gather = parse_gather(gather)

    def forward(
        self,
        embeddings: Mapping[str, Tensor],
        *,
        groups: Tensor | None = None,
        indices: Tensor | None = None,
    ) -> LossOutput:
        x, y = pick(embeddings, self.modalities)
        ox, oy = pick(embeddings, self.old_keys)
        pick(embeddings, [self.modalities[0], self.old_keys[0]], same_dim=False)
        return modx_loss(x, y, ox, oy, temperature=self.temperature, reduction=self.reduction,
                         gather=self.gather)
