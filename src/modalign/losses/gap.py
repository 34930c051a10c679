"""Uniformity, alignment and cross-uniformity, and the contrastive-gap objectives CUA and CUAXU.

From Wang & Isola (2020) and Fahim, Murphy & Fyshe, "It's Not a Modality Gap" (2024), on
L2-normalised rows:

* uniformity  ``U(X)   = log mean_{i != j} exp(-t ||x_i - x_j||^2)`` (t = 2), computed as an exact
  ``logsumexp - log(n (n - 1))``; the mean over ordered pairs equals the mean over ``i < j``.
* alignment   ``A(X,Y) = mean_i ||x_i - y_i||^alpha`` (alpha = 2).
* cross-uniformity ``XU(X,Y) = log mean_{i != j} exp(-t ||x_i - y_j||^2)``: every off-diagonal
  pair (with group ids: every pair of different groups).
* ``CUA = CLIP(tau = 0.01, fixed) + (U(X) + U(Y)) / 2 + A(X, Y)`` and ``CUAXU = CUA + XU(X, Y)``.

Across processes each rank scores its rows against the gathered columns; the log-sum-exps of the
ranks are combined exactly, and alignment is rescaled like the CLIP loss, so the mean over ranks
equals the single-process value.

Examples:
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> float(uniformity_loss(x).loss)  # two antipodal points: -2 * 4
    -8.0
    >>> float(alignment_loss(x, -x).loss)
    4.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from modalign.distributed.gather import Gathered, GatherGrad, ProcessGroup, all_sizes
from modalign.losses._support import gather_rows
from modalign.losses.base import LossModule, ScaleOptions
from modalign.losses.clip import PairLogitLoss, clip_loss, gather_columns, prepare_pair
from modalign.losses.normalize import normalize_rows
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import (
    check_embedding,
    check_groups,
    check_positive,
)


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j||^2`` by expansion (finite gradient at coincident points), clamped at 0."""
    d2 = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2.0 * a @ b.T
    return d2.clamp_min(0.0)


def _log_mean_exp_off_pairs(
    rows: Tensor,
    cols: Gathered,
    t: float,
    excluded: Tensor,
    n_pairs: int,
    gather: GatherGrad | None,
    process_group: ProcessGroup | None,
) -> Tensor:
    """``log mean exp(-t d^2)`` over the pairs not in ``excluded`` (bool rows x cols), all ranks."""
    logits = (-t * _squared_distances(rows, cols.tensor)).masked_fill(excluded, float("-inf"))
    lse = logits.logsumexp(dim=(0, 1))
    if cols.world_size > 1:
        lse = gather_rows(lse.reshape(1), gather, process_group).tensor.logsumexp(0)
    return lse - math.log(n_pairs)


def _off_pairs(
    x: Tensor,
    y: Tensor,
    t: float,
    groups: Tensor | None,
    gather: GatherGrad | None,
    process_group: ProcessGroup | None,
    too_few: str,
) -> Tensor:
    """``log mean exp(-t ||x_i - y_j||^2)`` over the pairs of different samples (different
    groups with ``groups``), ``y`` gathered from every rank; ValueError ``too_few`` if none."""
    cols, col_groups = gather_columns(y, groups, gather, process_group)
    total = cols.total
    if groups is None:
        rows_idx = torch.arange(x.shape[0], device=x.device) + cols.offset
        excluded = rows_idx[:, None] == torch.arange(total, device=x.device)[None, :]
        n_pairs = total * (total - 1)
    else:
        assert col_groups is not None
        excluded = groups[:, None] == col_groups[None, :]
        n_pairs = total * total - int(torch.unique(col_groups, return_counts=True)[1].pow(2).sum())
    if n_pairs < 1:
        raise ValueError(f"{too_few}, got {total}")
    return _log_mean_exp_off_pairs(x, cols, t, excluded, n_pairs, gather, process_group)


def uniformity_loss(
    x: Tensor,
    *,
    t: float = 2.0,
    normalize: bool = True,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
    name: str = "x",
) -> LossOutput:
    """``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over the rows of ``x`` (at least 2 rows).

    Examples:
        >>> import torch
        >>> float(uniformity_loss(torch.ones(4, 3)).loss)  # all points identical: the maximum, 0
        0.0
    """
    norms = check_embedding(name, x, normalize=normalize)
    check_positive("t", t)
    if normalize:
        x = normalize_rows(x, norms)
    return LossOutput(_off_pairs(x, x, t, None, gather, process_group,
                                 f"{name} needs at least 2 rows for uniformity"))


def cross_uniformity_loss(
    x: Tensor,
    y: Tensor,
    *,
    t: float = 2.0,
    groups: Tensor | None = None,
    normalize: bool = True,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
    names: Sequence[str] = ("x", "y"),
) -> LossOutput:
    """``log mean exp(-t ||x_i - y_j||^2)`` over pairs i != j (or of different groups).

    Examples:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(float(cross_uniformity_loss(x, x).loss), 6)  # off-diagonal pairs at d^2 = 2
        -4.0
    """
    x, y = prepare_pair(x, y, names, normalize=normalize)
    check_positive("t", t)
    if groups is not None:
        check_groups("groups", groups, x.shape[0])
    return LossOutput(_off_pairs(x, y, t, groups, gather, process_group,
                                 "cross-uniformity needs at least one pair of different samples"))


def alignment_loss(
    x: Tensor,
    y: Tensor,
    *,
    alpha: float = 2.0,
    normalize: bool = True,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
    names: Sequence[str] = ("x", "y"),
) -> LossOutput:
    """``mean_i ||x_i - y_i||^alpha`` over paired rows.

    Examples:
        >>> import torch
        >>> x = torch.randn(5, 3)
        >>> float(alignment_loss(x, x).loss)
        0.0
    """
    x, y = prepare_pair(x, y, names, normalize=normalize)
    check_positive("alpha", alpha)
    diff = x - y
    per_row = diff.pow(2).sum(1) if alpha == 2 else diff.norm(dim=1).pow(alpha)
    sizes = [x.shape[0]] if gather is None else all_sizes(x.shape[0], process_group, x.device)
    if len(sizes) == 1:
        return LossOutput(per_row.mean())
    return LossOutput(per_row.sum() * (len(sizes) / sum(sizes)))


class _GapTerm(LossModule):
    """Shared constructor of the geometric terms: modalities, normalize, gather."""

    distributed = True

    def __init__(self, modalities: Sequence[str], *, normalize: bool = True, **options: Any
                 ) -> None:
        super().__init__(modalities, **options)
        self.normalize = normalize


class _KernelTerm(_GapTerm):
    """A geometric term on the kernel ``exp(-t d^2)``: the shared ``t`` (2, as in the paper)."""

    def __init__(self, modalities: Sequence[str], *, t: float = 2.0, **options: Any) -> None:
        super().__init__(modalities, **options)
        check_positive("t", t)
        self.t = float(t)


@register_loss("uniformity")
class UniformityLoss(_KernelTerm):
    """Mean over the given modalities of their uniformity ``U`` (one modality or more).

    Examples:
        >>> import torch
        >>> antipodal, same = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.ones(2, 2)
        >>> out = UniformityLoss(["image", "text"])({"image": antipodal, "text": same})
        >>> {m: float(v) for m, v in out.parts.items()}, float(out.loss)  # -2 * 4, 0; the mean
        ({'image': -8.0, 'text': 0.0}, -4.0)
    """

    min_modalities, max_modalities = 1, None

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        parts = {
            m: uniformity_loss(
                x, t=self.t, normalize=self.normalize, gather=self.gather, name=m
            ).loss
            for m, x in zip(self.modalities, self.select(embeddings), strict=True)
        }
        return LossOutput(torch.stack(list(parts.values())).mean(), parts)


@register_loss("alignment")
class AlignmentLoss(_GapTerm):
    """Alignment ``mean_i ||x_i - y_i||^alpha`` of two modalities (alpha = 2).

    Examples:
        >>> import torch
        >>> x = torch.randn(4, 3)
        >>> float(AlignmentLoss(["a", "b"])({"a": x, "b": x}).loss)
        0.0
    """

    def __init__(self, modalities: Sequence[str], *, alpha: float = 2.0, **options: Any) -> None:
        super().__init__(modalities, **options)
        check_positive("alpha", alpha)
        self.alpha = float(alpha)

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        x, y = self.select(embeddings)
        return alignment_loss(x, y, alpha=self.alpha, normalize=self.normalize,
                              gather=self.gather, names=self.modalities)


@register_loss("cross_uniformity")
class CrossUniformityLoss(_KernelTerm):
    """Cross-modal uniformity ``XU`` of two modalities (positives excluded).

    Examples:
        >>> import torch
        >>> loss = CrossUniformityLoss(["image", "text"])
        >>> float(loss({"image": torch.randn(4, 3), "text": torch.randn(4, 3)}).loss) <= 0
        True
    """

    supports_groups = True

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        x, y = self.select(embeddings)
        return cross_uniformity_loss(x, y, t=self.t, groups=groups, normalize=self.normalize,
                                     gather=self.gather, names=self.modalities)


@register_loss("cua")
class CuaLoss(PairLogitLoss):
    """CUA = CLIP (fixed tau = 0.01) + uniformity (mean of both) + alignment; CUAXU adds XU.

    Args:
        modalities: the two embedding keys.
        cross_uniformity: add the cross-uniformity term (CUAXU).
        weights: weights of (clip, uniformity, alignment, cross_uniformity), default all 1.
        t: the uniformity kernel's t (2). alpha: the alignment exponent (2).
        normalize, impl, tile_size, gather, and the CLIP term's
            :class:`~modalign.losses.base.ScaleOptions` (tau = 0.01, fixed as in the paper): as in
            :class:`modalign.losses.clip.PairLogitLoss`.

    Examples:
        >>> import torch
        >>> emb = {"image": torch.randn(6, 4), "text": torch.randn(6, 4)}
        >>> sorted(CuaLoss(["image", "text"])(emb).parts)
        ['alignment', 'clip', 'clip/image-to-text', 'clip/text-to-image', 'uniformity']
    """

    pair_loss = staticmethod(clip_loss)
    scale_defaults = ScaleOptions(temperature=0.01, learnable_temperature=False)

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        cross_uniformity: bool = False,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        t: float = 2.0,
        alpha: float = 2.0,
        **options: Any,
    ) -> None:
        super().__init__(modalities, **options)
        check_positive("t", t)
        check_positive("alpha", alpha)
        weights = tuple(float(w) for w in weights)
        if len(weights) != 4 or not all(math.isfinite(w) for w in weights):
            raise ValueError(
                f"weights must be 4 finite numbers (clip, unif, align, xunif), got {weights}"
            )
        self.weights = weights
        self.cross_uniformity = cross_uniformity
        self.t, self.alpha = float(t), float(alpha)

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        x, y = self.select(embeddings)
        a, b = self.modalities
        w_clip, w_unif, w_align, w_xunif = self.weights
        clip = super().compute(embeddings, groups, indices)
        unif_x = uniformity_loss(x, t=self.t, name=a, normalize=self.normalize, gather=self.gather)
        unif_y = uniformity_loss(y, t=self.t, name=b, normalize=self.normalize, gather=self.gather)
        unif = (unif_x.loss + unif_y.loss) / 2
        align = alignment_loss(x, y, alpha=self.alpha, names=self.modalities,
                               normalize=self.normalize, gather=self.gather).loss
        parts = {"clip": clip.loss, "uniformity": unif, "alignment": align}
        parts.update({f"clip/{k}": v for k, v in clip.parts.items()})
        total = w_clip * clip.loss + w_unif * unif + w_align * align
        if self.cross_uniformity:
            xunif = cross_uniformity_loss(
                x, y, t=self.t, groups=groups, names=self.modalities,
                normalize=self.normalize, gather=self.gather,
            ).loss
            parts["cross_uniformity"] = xunif
            total = total + w_xunif * xunif
        return LossOutput(total, parts)


@register_loss("cuaxu")
class CuaxuLoss(CuaLoss):
    """CUAXU = CUA + cross-uniformity (see :class:`CuaLoss`).

    Examples:
        >>> import torch
        >>> emb = {"image": torch.randn(6, 4), "text": torch.randn(6, 4)}
        >>> "cross_uniformity" in CuaxuLoss(["image", "text"])(emb).parts
        True
    """

    def __init__(self, modalities: Sequence[str], **options: Any) -> None:
        options.setdefault("cross_uniformity", True)
        super().__init__(modalities, **options)
