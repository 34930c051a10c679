"""1-to-K multi-positive InfoNCE (Nie et al., KDD 2024): one anchor, K positive candidates.

Typical use: one image and its K captions (one per language). ``anchor_rows[t]`` is the row of
the anchor that candidate ``t`` belongs to, so the candidates may come in any order.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.distributed.gather import GatherGrad, ProcessGroup
from modalign.errors import ModalignError
from modalign.losses._support import gather_rows, local_labels, pick, unit_rows
from modalign.losses.base import ScaledLoss, ScaleOptions, caller_stacklevel
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_groups, check_positive, validation_enabled
from modalign.vocabulary import direction_name

ONE_TO_K_TEMPERATURE_BOUNDS = (0.001, 0.5)
"""The official range of the learnable temperature."""


def check_anchor_rows(anchor_rows: Tensor, n_candidates: int, n_anchors: int) -> Tensor:
    """Validate ``anchor_rows``: an anchor row in ``[0, n_anchors)`` per candidate, every anchor
    used."""
    check_groups("anchor_rows", anchor_rows, n_candidates)
    if not validation_enabled():  # the value checks below read the rows on the host
        return anchor_rows.long()
    if bool(((anchor_rows < 0) | (anchor_rows >= n_anchors)).any()):
        raise ValueError(
            f"anchor_rows must hold anchor rows in [0, {n_anchors}), got out-of-range values"
        )
    if bool((torch.bincount(anchor_rows.long(), minlength=n_anchors) == 0).any()):
        raise ValueError("anchor_rows must give every anchor row at least one candidate")
    return anchor_rows.long()


def one_to_k_loss(
    anchors: Tensor,
    candidates: Tensor,
    anchor_rows: Tensor,
    logit_scale: Tensor | float,
    *,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
    names: Sequence[str] = ("anchors", "candidates"),
) -> LossOutput:
    """1-to-K InfoNCE between B anchors and N candidates; ``anchor_rows[t]`` = anchor row of
    candidate t.

    With ``K = N / B`` positives per anchor (the mean when it varies):
    ``a2c = (1/B) sum_i sum_{t in G_i} -log softmax_t(s a_i.c_t) / K`` over all N candidates and
    ``c2a = (1/N) sum_t -log softmax_{g(t)}(s c_t.a_j) / K`` over the B anchors; the loss is their
    mean. With K = 1 it is the CLIP loss; with equal K it is the official ``(i2t + t2i) / 2 / K``.
    Across processes ``anchor_rows`` index this rank's anchors; each rank scores its anchors
    against every candidate and its candidates against every anchor. Parts: ``A-to-C`` and
    ``C-to-A`` with ``names = (A, C)``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> a, c = torch.randn(2, 8, generator=g), torch.randn(6, 8, generator=g)
        >>> out = one_to_k_loss(a, c, torch.tensor([0, 0, 0, 1, 1, 1]), 10.0)
        >>> sorted(out.parts)
        ['anchors-to-candidates', 'candidates-to-anchors']
    """
    a = unit_rows(anchors, "anchors")
    c = unit_rows(candidates, "candidates", dim=a.shape[1])
    g = check_anchor_rows(anchor_rows, c.shape[0], a.shape[0])
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
    parts = {direction_name(*names): a2c, direction_name(names[1], names[0]): c2a}
    return LossOutput((a2c + c2a) / 2, parts)


@register_loss("one_to_k")
class OneToKLoss(ScaledLoss):
    """1-to-K InfoNCE; ``modalities = (anchor, candidate)``; ``anchor_rows`` maps candidates to
    anchors (``groups=`` is its older, deprecated name).

    The temperature starts at 0.07 and :meth:`clamp_` keeps it in the official range
    ``temperature_bounds = (0.001, 0.5)``.

    Examples:
        >>> loss = OneToKLoss(["image", "text"])
        >>> emb = {"image": torch.randn(2, 8), "text": torch.randn(4, 8)}
        >>> sorted(loss(emb, anchor_rows=torch.tensor([0, 1, 0, 1])).parts)
        ['image-to-text', 'text-to-image']
    """

    needs_anchor_rows = True
    distributed = True
    scale_defaults = ScaleOptions(temperature=0.07, temperature_bounds=ONE_TO_K_TEMPERATURE_BOUNDS)

    def forward(
        self,
        embeddings: Mapping[str, Tensor],
        *,
        groups: Tensor | None = None,
        indices: Tensor | None = None,
        anchor_rows: Tensor | None = None,
    ) -> LossOutput:
        if groups is not None:
            if anchor_rows is not None:
                raise ModalignError("one_to_k: pass anchor_rows only (groups is its older name)")
            warnings.warn("one_to_k: groups= is deprecated; pass anchor_rows= (the anchor row of "
                          "every candidate)", FutureWarning, stacklevel=caller_stacklevel())
            anchor_rows = groups
        anchors, candidates = pick(embeddings, self.modalities, same_batch=False)
        if anchor_rows is None:
            raise ValueError(
                "anchor_rows is required by one_to_k: the anchor row of every candidate")
        return one_to_k_loss(anchors, candidates, anchor_rows, self.logit_scale(),
                             gather=self.gather, names=self.modalities)
