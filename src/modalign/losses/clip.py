"""CLIP: symmetric InfoNCE with a learnable logit scale (Radford et al., 2021).

With ``S = X Y^T / tau + b`` (rows L2-normalised; the module passes ``t = 1 / tau =
exp(log_logit_scale)``)::

    L = 1/2 [ 1/B sum_i (LSE_j S_ij - S_ii) + 1/B sum_j (LSE_i S_ij - S_jj) ]

With group ids, the target of a row is uniform over the columns of its group (multi-positive
InfoNCE); ``S_ii`` becomes the mean of the row's positive logits. The bias cancels in a softmax; it
is accepted so that checkpoints with a bias load and DDP sees the parameter used. Its gradient is
exactly 0 on the tiled path (set so in the backward pass); on the full-matrix path it is the
rounding noise of a sum that is 0 in exact arithmetic (about 1e-8 in float32, 1e-16 in float64).

Two implementations give the same values and gradients: ``"full"`` builds the B x B logits;
``"tiled"`` (:mod:`modalign.losses.tiled`) never holds more than ``tile_size x B`` of them.
``"auto"`` picks tiled from :data:`AUTO_TILED_MIN_ELEMENTS` logits on.

Across processes (a process group with more than one rank and ``gather`` not None) each rank scores
its own rows against the gathered columns, both directions, and scales its loss so that the mean
over ranks is the single-process loss on the concatenated batch (see :mod:`modalign.distributed`).

Examples:
    >>> import torch
    >>> x, y = torch.randn(8, 16), torch.randn(8, 16)
    >>> out = clip_loss(x, y, logit_scale=torch.tensor(1 / 0.07))
    >>> sorted(out.parts)
    ['x-to-y', 'y-to-x']
    >>> loss = ClipLoss(["image", "text"])
    >>> out = loss({"image": x, "text": y})
    >>> out.loss.backward(); loss.clamp_()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.distributed.gather import Gathered, GatherGrad, ProcessGroup, get_world_size
from modalign.losses._support import gather_rows
from modalign.losses.base import ScaledLoss, ScaleOptions
from modalign.losses.groups import same_group_sums
from modalign.losses.normalize import normalize_rows
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.tiled import tiled_logsumexp
from modalign.losses.validation import (
    check_embedding,
    check_finite_scalar,
    check_groups,
    check_pair,
    check_positive,
    scalar_tensor,
)
from modalign.vocabulary import direction_name

Impl = Literal["auto", "full", "tiled"]

AUTO_TILED_MIN_ELEMENTS = 4096 * 4096
"""``impl="auto"`` uses the tiled path when the logit matrix has at least this many entries."""


def prepare_pair(
    x: Tensor, y: Tensor, names: Sequence[str], *, normalize: bool, same_batch: bool = True,
    defer_normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Validate two embedding matrices and L2-normalise them if asked (``defer_normalize``:
    check them for normalisation but return them as given; the caller normalises)."""
    x_norms = check_embedding(names[0], x, normalize=normalize)
    y_norms = check_embedding(names[1], y, normalize=normalize)
    check_pair(names, [x, y], same_batch=same_batch)
    if normalize and not defer_normalize:
        x, y = normalize_rows(x, x_norms), normalize_rows(y, y_norms)
    return x, y


def logit_inputs(
    x: Tensor,
    y: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None,
    groups: Tensor | None,
    names: Sequence[str],
    *,
    normalize: bool,
    defer_normalize: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The checked inputs of a loss on the logits ``t X Y^T + b``: ``x`` and ``y`` (normalised if
    asked, unless ``defer_normalize``: see :func:`prepare_pair`), the scale ``t`` and the bias
    ``b`` (or None) as 0-d tensors of ``x``'s dtype.

    Examples:
        >>> import torch
        >>> x, y, t, b = logit_inputs(torch.ones(2, 3), torch.ones(2, 3), 10.0, None, None,
        ...                           ("x", "y"), normalize=False)
        >>> t, b
        (tensor(10.), None)
    """
    x, y = prepare_pair(x, y, names, normalize=normalize, defer_normalize=defer_normalize)
    check_positive("logit_scale", logit_scale)
    if logit_bias is not None:
        check_finite_scalar("logit_bias", logit_bias)
    if groups is not None:
        check_groups("groups", groups, x.shape[0])
    scale = scalar_tensor(logit_scale, x).to(x.dtype)
    bias = None if logit_bias is None else scalar_tensor(logit_bias, x).to(x.dtype)
    return x, y, scale, bias


def gather_columns(
    y: Tensor,
    groups: Tensor | None,
    gather: GatherGrad | None,
    process_group: ProcessGroup | None,
    sizes: list[int] | None = None,
) -> tuple[Gathered, Tensor | None]:
    """Every rank's rows of ``y`` (the columns a rank scores its own rows against) and their
    group ids (no gradient); ``gather=None`` or one process: this rank's rows, a world of one.
    ``sizes``: the per-rank row counts if known (saves one collective)."""
    cols = gather_rows(y, gather, process_group, sizes)
    if groups is None:
        return cols, None
    frozen = None if gather is None else GatherGrad.NONE
    return cols, gather_rows(groups, frozen, process_group, list(cols.sizes)).tensor


def use_tiled(impl: Impl, n: int, m: int) -> bool:
    """Resolve ``impl`` for an n x m logit matrix."""
    if impl not in ("auto", "full", "tiled"):
        raise ValueError(f"impl must be 'auto', 'full' or 'tiled', got {impl!r}")
    return impl == "tiled" or (impl == "auto" and n * m >= AUTO_TILED_MIN_ELEMENTS)


def _mean_positive_logits(
    q: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    q_groups: Tensor,
    k_all: Tensor,
    k_groups: Tensor,
) -> Tensor:
    """Mean logit of each query row over the columns of its group (multi-positive targets)."""
    sums, counts = same_group_sums(q_groups, k_all, k_groups)
    pos = scale * (q * sums).sum(dim=1) / counts.to(q.dtype)
    return pos if bias is None else pos + bias


def _row_cross_entropy(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    offset: int,
    q_groups: Tensor | None,
    k_groups: Tensor | None,
    tiled: bool,
    tile_size: int | None,
) -> Tensor:
    """Per-row InfoNCE of queries ``q`` against all columns ``k``.

    The positive of row i is column ``offset + i``, or (with groups) the uniform target over the
    columns of its group.
    """
    n = q.shape[0]
    if q_groups is None:
        targets = torch.arange(offset, offset + n, device=q.device)
        if tiled:
            ce, _ = tiled_logsumexp(
                q, k, scale, bias, cols=False, row_targets=targets, tile_size=tile_size
            )
            assert ce is not None
            return ce
        logits = scale * q @ k.T
        if bias is not None:
            logits = logits + bias
        return F.cross_entropy(logits, targets, reduction="none")
    assert k_groups is not None
    if tiled:
        lse, _ = tiled_logsumexp(q, k, scale, bias, cols=False, tile_size=tile_size)
        assert lse is not None
    else:
        logits = scale * q @ k.T
        lse = (logits if bias is None else logits + bias).logsumexp(dim=1)
    return lse - _mean_positive_logits(q, scale, bias, q_groups, k, k_groups)


def clip_loss(
    x: Tensor,
    y: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    *,
    groups: Tensor | None = None,
    normalize: bool = True,
    impl: Impl = "auto",
    tile_size: int | None = None,
    gather: GatherGrad | None = GatherGrad.GLOBAL,
    process_group: ProcessGroup | None = None,
    names: Sequence[str] = ("x", "y"),
) -> LossOutput:
    """Symmetric InfoNCE between paired rows of ``x`` and ``y``.

    Args:
        x, y: (B, d) embeddings; row i of x and row i of y are a positive pair.
        logit_scale: the inverse temperature t > 0 (pass ``log_logit_scale.exp()``).
        logit_bias: optional scalar added to every logit (cancels in the softmax).
        groups: optional (B,) integer ids; rows sharing an id are all positives of each other.
        normalize: L2-normalise x and y first (False: use them as given).
        impl: ``"full"`` matrix, memory-bounded ``"tiled"``, or ``"auto"``.
        tile_size: rows per tile of the tiled path (None: as many as fit 4M logits).
        gather: how gradients cross the all-gather when a process group with several ranks is
            initialised; None computes on the local batch only.
        process_group: the group to gather over (default group if None).
        names: the names of x and y in error messages and part names.

    Returns:
        ``LossOutput(loss, {"x-to-y": ..., "y-to-x": ...})``, ``loss`` the mean of the two parts.

    Examples:
        >>> import math, torch
        >>> x = torch.randn(4, 8)
        >>> round(float(clip_loss(x, x, 1e-6).loss), 4) == round(math.log(4), 4)
        True
    """
    n = x.shape[0] if isinstance(x, Tensor) and x.dim() == 2 else 0
    tiled = use_tiled(impl, n, n)
    # one process, no groups, tiled: both directions from one pass over the tiles, which also
    # normalise the rows (no normalised copies)
    walk = tiled and groups is None and (gather is None or get_world_size(process_group) == 1)
    x, y, scale, bias = logit_inputs(x, y, logit_scale, logit_bias, groups, names,
                                     normalize=normalize, defer_normalize=walk)
    if walk:
        targets = torch.arange(n, device=x.device)
        row_ce, col_ce = tiled_logsumexp(x, y, scale, bias, row_targets=targets,
                                         col_targets=targets, tile_size=tile_size,
                                         normalize=normalize)
        assert row_ce is not None and col_ce is not None
        return _both_directions(names, row_ce.mean(), col_ce.mean())
    xs = gather_rows(x, gather, process_group)
    if xs.world_size == 1:
        if groups is None:
            logits = scale * x @ y.T
            if bias is not None:
                logits = logits + bias
            targets = torch.arange(n, device=x.device)
            row_ce = F.cross_entropy(logits, targets, reduction="none")
            col_ce = F.cross_entropy(logits.T, targets, reduction="none")
        else:
            row_ce = _row_cross_entropy(x, y, scale, bias, 0, groups, groups, tiled, tile_size)
            col_ce = _row_cross_entropy(y, x, scale, bias, 0, groups, groups, tiled, tile_size)
        return _both_directions(names, row_ce.mean(), col_ce.mean())

    ys, all_groups = gather_columns(y, groups, gather, process_group, list(xs.sizes))
    tiled = use_tiled(impl, x.shape[0], xs.total)
    common = (scale, bias, xs.offset, groups, all_groups, tiled, tile_size)
    factor = xs.world_size / xs.total
    x2y = _row_cross_entropy(x, ys.tensor, *common).sum() * factor
    y2x = _row_cross_entropy(y, xs.tensor, *common).sum() * factor
    return _both_directions(names, x2y, y2x)


def _both_directions(names: Sequence[str], x2y: Tensor, y2x: Tensor) -> LossOutput:
    """The mean of the two directions' losses, each a named part."""
    a, b = names[0], names[1]
    return LossOutput((x2y + y2x) / 2, {direction_name(a, b): x2y, direction_name(b, a): y2x})


class PairLogitLoss(ScaledLoss):
    """Two-modality loss module on the logits ``X Y^T / tau + b`` (shared by CLIP and SigLIP).

    It validates ``impl``, keeps the normalisation / implementation settings and calls
    :attr:`pair_loss` (a pure function with the signature of :func:`clip_loss`) on the selected
    pair. Subclasses set :attr:`pair_loss` and their :attr:`scale_defaults`.

    Args:
        modalities: the two embedding keys, e.g. ``["image", "text"]``.
        normalize: L2-normalise the embeddings inside the loss (default True).
        impl: ``"auto"``, ``"full"`` or ``"tiled"``; tile_size: rows per tile.
        gather: :class:`GatherGrad` used when a multi-rank process group is initialised
            (default GLOBAL, the exact one), or None to never gather.
        temperature, learnable_temperature, temperature_bounds, init_logit_bias, learnable_bias:
            the :class:`~modalign.losses.base.ScaleOptions`.
    """

    pair_loss: Callable[..., LossOutput]
    supports_groups = True
    distributed = True

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        normalize: bool = True,
        impl: Impl = "auto",
        tile_size: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(modalities, **options)
        use_tiled(impl, 0, 0)  # validates impl
        self.normalize = normalize
        self.impl: Impl = impl
        self.tile_size = tile_size

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        x, y = self.select(embeddings)
        return self.pair_loss(
            x,
            y,
            self.logit_scale(),
            self.logit_bias,
            groups=groups,
            normalize=self.normalize,
            impl=self.impl,
            tile_size=self.tile_size,
            gather=self.gather,
            names=self.modalities,
        )


@register_loss("clip")
class ClipLoss(PairLogitLoss):
    """CLIP symmetric InfoNCE on two modalities; tau = 0.07, learnable, kept in [0.01, 1].

    Takes the arguments of :class:`PairLogitLoss`; no bias by default (``init_logit_bias=x``
    adds one).

    Examples:
        >>> import torch
        >>> loss = ClipLoss(["image", "text"], impl="tiled", tile_size=3)
        >>> out = loss({"image": torch.randn(5, 4), "text": torch.randn(5, 4)})
        >>> sorted(out.parts)
        ['image-to-text', 'text-to-image']
    """

    pair_loss = staticmethod(clip_loss)
    scale_defaults = ScaleOptions(temperature=0.07)
