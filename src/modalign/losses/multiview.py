"""Multi-view contrastive losses MV-InfoNCE and MV-DHEL (Koromilas et al., 2025).

M instances seen in N >= 2 views (one embedding key per view, each (M, d)); ``U_il`` is the unit
embedding of instance i in view l and ``S = s U U^T`` the scaled similarities. Both losses are
written with log-sum-exp, so no ``exp`` can overflow whatever the temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from modalign.distributed.gather import Gathered, GatherGrad, ProcessGroup
from modalign.errors import ModalignError
from modalign.losses._support import at_least_two, gather_rows, pick, unit_rows
from modalign.losses.base import ScaledLoss, ScaleOptions
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_positive

MV_TEMPERATURE = 0.5
"""tau of the reference CIFAR / ImageNet-100 configs."""


def view_similarity(
    views: Sequence[Tensor], logit_scale: Tensor | float, *,
    gather: GatherGrad | None = None, process_group: ProcessGroup | None = None,
) -> tuple[Tensor, Gathered]:
    """Scaled cosines ``S[l, i, m, j]`` (N, M_local, N, M) of local instances i against all j.

    Returns the similarities and the gather record of the instances (offset of the local rows).
    """
    at_least_two(views, "views")
    first = unit_rows(views[0], "views[0]")
    units = [first] + [
        unit_rows(v, f"views[{k}]", rows=first.shape[0], dim=first.shape[1])
        for k, v in enumerate(views[1:], start=1)
    ]
    check_positive("logit_scale", logit_scale)
    local = torch.stack(units)  # (N, M_local, d)
    gathered = [gather_rows(u, gather, process_group) for u in units]
    columns = torch.stack([g.tensor for g in gathered])  # (N, M, d)
    return logit_scale * torch.einsum("lid,mjd->limj", local, columns), gathered[0]


def _self_mask(sim: Tensor, offset: int) -> Tensor:
    """(M_local, M) boolean: True where column j is the local instance i itself."""
    rows = torch.arange(sim.shape[1], device=sim.device) + offset
    return rows.unsqueeze(1) == torch.arange(sim.shape[3], device=sim.device).unsqueeze(0)


def _positive_lse(sim: Tensor, offset: int) -> Tensor:
    """Per local instance: ``LSE_{l != l'} S[l, i, l', i]`` -> (M_local,)."""
    n, m_local = sim.shape[0], sim.shape[1]
    rows = torch.arange(m_local, device=sim.device)
    same_instance = sim[:, rows, :, rows + offset]  # (M_local, N, N): [i, l, l']
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return same_instance[:, off].logsumexp(dim=1)


def mv_infonce_from_similarity(
    sim: Tensor, *, same_view_negatives: bool = True, offset: int = 0
) -> Tensor:
    """MV-InfoNCE per local instance from ``S[l, i, m, j]``: ``LSE(negatives) - LSE(positives)``.

    The denominator sums over every anchor view l and every ``(j, m) != (i, l)`` (reference code,
    ``same_view_negatives=True``) or over ``m != l`` only (the paper's formula). ``offset`` is the
    column of local instance 0 (0 in one process).
    """
    n = sim.shape[0]
    same_view = torch.eye(n, dtype=torch.bool, device=sim.device).view(n, 1, n, 1)
    if same_view_negatives:
        excluded = same_view & _self_mask(sim, offset).view(1, sim.shape[1], 1, sim.shape[3])
    else:
        excluded = same_view.expand(sim.shape)
    masked = sim.masked_fill(excluded, float("-inf")).permute(1, 0, 2, 3).reshape(sim.shape[1], -1)
    return masked.logsumexp(dim=1) - _positive_lse(sim, offset)


def mv_dhel_from_similarity(sim: Tensor, *, include_self: bool = False, offset: int = 0) -> Tensor:
    """MV-DHEL per local instance: ``sum_l LSE_j S[l, i, l, j] - LSE(positives)``.

    The uniformity sums use same-view pairs only; ``include_self`` adds ``j = i`` (the paper's
    formula) while the reference code leaves it out (the default here).
    """
    same_view = sim.diagonal(dim1=0, dim2=2)  # (M_local, M, N): [i, j, l]
    if not include_self:
        same_view = same_view.masked_fill(_self_mask(sim, offset).unsqueeze(-1), float("-inf"))
    return same_view.logsumexp(dim=1).sum(dim=1) - _positive_lse(sim, offset)


def mv_infonce_loss(
    views: Sequence[Tensor], logit_scale: Tensor | float, *, same_view_negatives: bool = True,
    gather: GatherGrad | None = GatherGrad.GLOBAL, process_group: ProcessGroup | None = None,
) -> LossOutput:
    """MV-InfoNCE: ``(1/M) sum_i [LSE_{l, (j,m) in neg(i,l)} S_il,jm - LSE_{l != l'} S_il,il']``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> views = [torch.randn(5, 8, generator=g) for _ in range(3)]
        >>> mv_infonce_loss(views, 2.0).loss.ndim
        0
    """
    sim, rows = view_similarity(views, logit_scale, gather=gather, process_group=process_group)
    per_instance = mv_infonce_from_similarity(
        sim, same_view_negatives=same_view_negatives, offset=rows.offset
    )
    return LossOutput(per_instance.sum() * rows.world_size / rows.total, {})


def mv_dhel_loss(
    views: Sequence[Tensor], logit_scale: Tensor | float, *, include_self: bool = False,
    gather: GatherGrad | None = GatherGrad.GLOBAL, process_group: ProcessGroup | None = None,
) -> LossOutput:
    """MV-DHEL: ``-(1/M) sum_i [LSE_{l != l'} S_il,il' - sum_l LSE_j S_il,jl]`` (j != i by default).

    A batch of one instance raises a ``ModalignError`` (without ``include_self`` there is nothing
    to sum over, and the loss would be ``-inf``).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> views = [torch.randn(5, 8, generator=g) for _ in range(2)]
        >>> mv_dhel_loss(views, 2.0).loss.ndim
        0
    """
    sim, rows = view_similarity(views, logit_scale, gather=gather, process_group=process_group)
    if rows.total < 2 and not include_self:
        raise ModalignError(
            f"MV-DHEL needs at least 2 instances in the batch (its uniformity term compares each "
            f"instance with the others), got {rows.total}; use a batch of 2 or more, or "
            "include_self=True")
    per_instance = mv_dhel_from_similarity(sim, include_self=include_self, offset=rows.offset)
    return LossOutput(per_instance.sum() * rows.world_size / rows.total, {})


class _MultiViewLoss(ScaledLoss):
    """What the multi-view losses share: N >= 2 views, tau = 0.5 (fixed by default, as in the
    reference configs), the gather mode, and one ``compute``: :attr:`view_loss` on the views
    with the subclass's :attr:`view_options`."""

    max_modalities = None
    distributed = True
    scale_defaults = ScaleOptions(temperature=MV_TEMPERATURE, learnable_temperature=False)
    view_loss: Callable[..., LossOutput]
    view_options: dict[str, bool]

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        return self.view_loss(pick(embeddings, self.modalities), self.logit_scale(),
                              gather=self.gather, **self.view_options)


@register_loss("mv_infonce")
class MVInfoNCELoss(_MultiViewLoss):
    """MV-InfoNCE over the views named in ``modalities`` (tau = 0.5, fixed unless learnable).

    Examples:
        >>> loss = MVInfoNCELoss(["view0", "view1", "view2"])
        >>> emb = {k: torch.randn(4, 8) for k in ["view0", "view1", "view2"]}
        >>> loss(emb).loss.ndim
        0
    """

    view_loss = staticmethod(mv_infonce_loss)

    def __init__(self, modalities: Sequence[str], *, same_view_negatives: bool = True,
                 **options: Any) -> None:
        super().__init__(modalities, **options)
        self.view_options = {"same_view_negatives": bool(same_view_negatives)}


@register_loss("mv_dhel")
class MVDHELLoss(_MultiViewLoss):
    """MV-DHEL over the views named in ``modalities`` (tau = 0.5, fixed unless learnable).

    Examples:
        >>> loss = MVDHELLoss(["view0", "view1"])
        >>> emb = {k: torch.randn(4, 8) for k in ["view0", "view1"]}
        >>> loss(emb).loss.ndim
        0
    """

    view_loss = staticmethod(mv_dhel_loss)

    def __init__(self, modalities: Sequence[str], *, include_self: bool = False,
                 **options: Any) -> None:
        super().__init__(modalities, **options)
        self.view_options = {"include_self": bool(include_self)}
