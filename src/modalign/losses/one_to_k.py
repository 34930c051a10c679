"""1-to-K multi-positive InfoNCE (Nie et al., KDD 2024): one anchor, K positive candidates.

Typical use: one image and its K captions (one per language). ``groups[t]`` is the row of the
anchor that candidate ``t`` belongs to, so the candidates may come in any order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.distributed.gather import GatherGrad, ProcessGroup, parse_gather
from modalign.losses._support import gather_rows, local_labels, pick, unit_rows
from modalign.losses.base import ScaledLoss
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_groups, check_positive

ONE_TO_K_INIT_LOG_SCALE = math.log(1 / 0.07)
ONE_TO_K_SCALE_BOUNDS = (math.log(1 / 0.5), math.log(1 / 0.001))  # the official tau in [0.001, 0.5]


def check_anchor_groups(groups: Tensor, n_candidates: int, n_anchors: int) -> Tensor:
    """Validate ``groups``: an anchor row in ``[0, n_anchors)`` per candidate, every anchor used."""
    check_groups("groups", groups, n_candidates)
    if bool(((groups < 0) | (groups >= n_anchors)).any()):
        raise ValueError(
            f"groups must hold anchor rows in [0, {n_anchors}), got out-of-range values"
        )
    if bool((torch.bincount(groups.long(), minlength=n_anchors) == 0).any()):
        raise ValueError("groups must give every anchor row at least one candidate")
    return groups.long()


def one_to_k_loss(
    anchors: Tensor,
    candidates: Tensor,
    groups: Tensor,
    logit_scale: Tensor | float,
    *,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
) -> LossOutput:
    """1-to-K InfoNCE between B anchors and N candidates; ``groups[t]`` = anchor row of candidate t.

    With ``K = N / B`` positives per anchor (the mean when it varies):
    ``a2c = (1/B) sum_i sum_{t in G_i} -log softmax_t(s a_i.c_t) / K`` over all N candidates and
    ``c2a = (1/N) sum_t -log softmax_{g(t)}(s c_t.a_j) / K`` over the B anchors; the loss is their
    mean. With K = 1 it is the CLIP loss; with equal K it is the official ``(i2t + t2i) / 2 / K``.
    Across processes ``groups`` index this rank's anchors; each rank scores its anchors against
    every candidate and its candidates against every anchor.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> a, c = torch.randn(2, 8, generator=g), torch.randn(6, 8, generator=g)
        >>> out = one_to_k_loss(a, c, torch.tensor([0, 0, 0, 1, 1, 1]), 10.0)
        >>> sorted(out.parts)
        ['anchor_to_candidates', 'candidate_to_anchor']
    """
    a = unit_rows(anchors, "anchors")
    c = unit_rows(candidates, "candidates", dim=a.shape[1])
    g = check_anchor_groups(groups, c.shape[0], a.shape[0])
    check_positive("logit_scale", logit_scale)
    all_a = gather_rows(a, gather, process_group)
    all_c = gather_rows(c, gather, process_group)
    frozen = None if gather is None else GatherGrad.NONE
    all_g = gather_rows(g + all_a.offset, frozen, process_group, list(all_c.sizes)).tensor
    k = all_c.total / all_a.total
    own = local_labels(all_a, a.device)
    log_p = (logit_scale * a @ all_c.tensor.T).log_softmax(dim=1)  # (B_local, N)
    positive = own.unsqueeze(1) == all_g.unsqueeze(0)
    a2c = -log_p.masked_fill(~positive, 0.0).sum() * all_a.world_size / all_a.total / k
    c2a = F.cross_entropy(logit_scale * c @ all_a.tensor.T, g + all_a.offset, reduction="sum")
    c2a = c2a * all_c.world_size / all_c.total / k
    return LossOutput((a2c + c2a) / 2, {"anchor_to_candidates": a2c, "candidate_to_anchor": c2a})


@register_loss("one_to_k")
class OneToKLoss(ScaledLoss):
    """1-to-K InfoNCE; ``modalities = (anchor, candidate)``; ``groups`` maps candidates to anchors.

    The temperature starts at 0.07 and :meth:`clamp_` keeps it in the official range
    ``[0.001, 0.5]`` (``scale_bounds = (log 2, log 1000)``).

    Examples:
        >>> loss = OneToKLoss(["image", "text"])
        >>> emb = {"image": torch.randn(2, 8), "text": torch.randn(4, 8)}
        >>> loss(emb, groups=torch.tensor([0, 1, 0, 1])).loss.ndim
        0
    """

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        init_logit_scale: float = ONE_TO_K_INIT_LOG_SCALE,
        learnable_scale: bool = True,
        scale_bounds: tuple[float, float] = ONE_TO_K_SCALE_BOUNDS,
        gather: GatherGrad | str | None = GatherGrad.GLOBAL,
    ) -> None:
        super().__init__(
            modalities,
            n_modalities=2,
            init_logit_scale=init_logit_scale,
            learnable_scale=learnable_scale,
            scale_bounds=scale_bounds,
        )
        self.gather = parse_gather(gather)

    def forward(
        self,
        embeddings: Mapping[str, Tensor],
        *,
        groups: Tensor | None = None,
        indices: Tensor | None = None,
    ) -> LossOutput:
        anchors, candidates = pick(embeddings, self.modalities, same_batch=False)
        if groups is None:
            raise ValueError("groups is required by one_to_k: the anchor row of every candidate")
        return one_to_k_loss(anchors, candidates, groups, self.logit_scale(), gather=self.gather)
