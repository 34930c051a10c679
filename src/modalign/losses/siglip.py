"""SigLIP: pairwise sigmoid loss (Zhai et al., 2023).

With ``l_ij = t x_i . y_j + b`` and ``z_ij = +1`` for positives (the diagonal, or same group id),
``-1`` otherwise::

    L = -1/B sum_ij log sigmoid(z_ij l_ij) = 1/B [ sum_ij softplus(l_ij) - sum_{ij: z_ij=+1} l_ij ]

The right-hand form (``softplus(-l) = softplus(l) - l``) is what both paths compute: the softplus
sum over the whole matrix (full, or tiled in O(tile_size x B) memory) plus an O(B d) positive term.
Defaults follow the paper: ``t = 10`` (tau = 0.1), ``b = -10``, both learnable.

Across processes each rank scores its rows against the gathered columns (the same scaling
convention as :func:`modalign.losses.clip.clip_loss`: the mean over ranks is the single-process
loss on the concatenated batch).

Examples:
    >>> import math, torch
    >>> x = torch.randn(6, 4)
    >>> out = siglip_loss(x, x, logit_scale=torch.tensor(1e-9), logit_bias=0.0)
    >>> round(float(out.loss), 4) == round(6 * math.log(2), 4)  # B log 2 at zero logits
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from modalign.distributed.gather import GatherGrad, ProcessGroup
from modalign.losses.base import ScaleOptions
from modalign.losses.clip import Impl, PairLogitLoss, gather_columns, logit_inputs, use_tiled
from modalign.losses.groups import same_group_sums
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.tiled import SOFTPLUS_THRESHOLD, tiled_softplus_sum


def siglip_loss(
    x: Tensor,
    y: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = -10.0,
    *,
    groups: Tensor | None = None,
    negative_only: bool = False,
    normalize: bool = True,
    impl: Impl = "auto",
    tile_size: int | None = None,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
    names: Sequence[str] = ("x", "y"),
) -> LossOutput:
    """Sigmoid loss over all pairs of rows of ``x`` and ``y``, divided by the batch size.

    Args:
        x, y: (B, d) embeddings; row i of x and row i of y are a positive pair.
        logit_scale: t > 0 (pass ``log_logit_scale.exp()``). logit_bias: b (None: 0).
        groups: optional (B,) integer ids; every pair within a group is a positive.
        negative_only: score every pair as a negative (``sum softplus(l) / B``), as for blocks of
            columns that hold no positive of these rows.
        normalize, impl, tile_size, gather, process_group, names: as in
            :func:`modalign.losses.clip.clip_loss`.

    Returns:
        ``LossOutput(loss, {})``.

    Examples:
        >>> import torch
        >>> x, y = torch.randn(5, 3), torch.randn(5, 3)
        >>> full = siglip_loss(x, y, 10.0, -10.0, impl="full").loss
        >>> torch.allclose(full, siglip_loss(x, y, 10.0, -10.0, impl="tiled", tile_size=2).loss)
        True
    """
    x, y, scale, bias = logit_inputs(x, y, logit_scale, logit_bias, groups, names,
                                     normalize=normalize)
    gathered, col_groups = gather_columns(y, groups, gather, process_group)
    cols, factor = gathered.tensor, gathered.world_size / gathered.total

    if use_tiled(impl, x.shape[0], cols.shape[0]):
        negatives = tiled_softplus_sum(x, cols, scale, bias, tile_size=tile_size)
    else:
        logits = scale * x @ cols.T
        if bias is not None:
            logits = logits + bias
        negatives = F.softplus(logits, threshold=SOFTPLUS_THRESHOLD).sum()
    if negative_only:
        return LossOutput(negatives * factor, {})
    if groups is None:
        positives = scale * (x * y).sum()
        n_pos = x.shape[0]
    else:
        assert col_groups is not None
        sums, counts = same_group_sums(groups, cols, col_groups)
        positives = scale * (x * sums).sum()
        n_pos = int(counts.sum())
    if bias is not None:
        positives = positives + bias * n_pos
    return LossOutput((negatives - positives) * factor, {})


@register_loss("siglip")
class SigLipLoss(PairLogitLoss):
    """SigLIP sigmoid loss: tau = 0.1 (logit scale 10) and bias -10, both learnable (the paper's).

    Takes the arguments of :class:`modalign.losses.clip.PairLogitLoss`.

    Examples:
        >>> import torch
        >>> loss = SigLipLoss(["image", "text"])
        >>> float(loss.logit_bias.detach()), round(float(loss.logit_scale().detach()), 3)
        (-10.0, 10.0)
    """

    pair_loss = staticmethod(siglip_loss)
    scale_defaults = ScaleOptions(temperature=0.1, init_logit_bias=-10.0)
