"""Gather embeddings across processes with an explicit choice of how gradients flow back.

Rank and world size are read from the default (or given) process group; without an initialised
group the rank is 0 and the world size 1, and every function here is the identity.

How gradients cross the gather (:class:`GatherGrad`), for a rank ``r`` holding rows ``x_r`` and a
per-rank loss ``L_r`` computed from the gathered ``X = [x_0; ...; x_{W-1}]``:

* ``GLOBAL``: the backward pass sums the gradient of ``X`` over all ranks and hands each rank its
  slice, so ``x_r`` receives ``sum_q dL_q/dx_r``: the gradient of the *sum of every rank's loss*.
  This is the one that reproduces single-process training (see below).
* ``LOCAL``: the other ranks' rows are constants; ``x_r`` is re-inserted in its own slot, so it
  receives ``dL_r/dx_r`` only (open_clip without ``gather_with_grad``). The gradient of ``x_r``
  through other ranks' losses is lost.
* ``NONE``: the gathered tensor is a constant, even in the local slot; use it when the local rows
  enter the loss separately (e.g. as the query side) and the gathered ones are only candidates.

The losses of :mod:`modalign.losses` compute this rank's rows against the gathered columns and
scale the per-rank loss so that the **mean over ranks equals the single-process loss** on the
concatenated batch, whatever the per-rank batch sizes. With ``GLOBAL`` every local input then
receives ``world_size`` times its single-process gradient, which DDP's gradient averaging over
ranks divides back out: parameter gradients equal single-process training exactly. The logit
scale (a replicated parameter) gets its share on each rank and the DDP average is again exact.

Examples:
    >>> import torch
    >>> g = gather_with_grad(torch.ones(3, 2))  # no process group: the identity
    >>> g.tensor.shape, g.offset, g.total, g.world_size
    (torch.Size([3, 2]), 0, 3, 1)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = Any
"""A ``torch.distributed`` process group, or None for the default group."""


class GatherGrad(enum.Enum):
    """How gradients flow back through :func:`gather_with_grad` (see the module docstring)."""

    NONE = "none"
    LOCAL = "local"
    GLOBAL = "global"


def parse_gather(value: GatherGrad | str | None) -> GatherGrad | None:
    """Read a :class:`GatherGrad` from a config value (the enum, its name or value, or None).

    Examples:
        >>> parse_gather("global")
        <GatherGrad.GLOBAL: 'global'>
    """
    if value is None or isinstance(value, GatherGrad):
        return value
    if isinstance(value, str):
        for member in GatherGrad:
            if value.lower() in (member.value, member.name.lower()):
                return member
    raise ValueError(
        f"gather must be one of {[m.value for m in GatherGrad]} or None, got {value!r}"
    )


def get_world_size(group: ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def get_rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def all_sizes(
    n: int, group: ProcessGroup | None = None, device: torch.device | None = None
) -> list[int]:
    """The per-rank values of an integer ``n`` (e.g. local batch sizes), in rank order."""
    world = get_world_size(group)
    if world == 1:
        return [int(n)]
    t = torch.tensor([int(n)], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [int(v) for v in out]


@dataclass(frozen=True)
class Gathered:
    """The rows of every rank concatenated in rank order, and where this rank's rows sit.

    Attributes:
        tensor: the concatenation, shape ``(sum(sizes), ...)``.
        sizes: rows contributed by each rank.
        rank: this process's rank.
    """

    tensor: Tensor
    sizes: tuple[int, ...]
    rank: int

    @property
    def offset(self) -> int:
        """Index of this rank's first row in :attr:`tensor`."""
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        """Rows over all ranks."""
        return sum(self.sizes)

    @property
    def world_size(self) -> int:
        return len(self.sizes)


def gather_with_grad(
    x: Tensor,
    mode: GatherGrad = GatherGrad.GLOBAL,
    group: ProcessGroup | None = None,
    sizes: list[int] | None = None,
) -> Gathered:
    """All-gather ``x`` along dim 0 (per-rank row counts may differ); gradients per ``mode``.

    Args:
        x: this rank's rows, shape ``(n_r, ...)``; the trailing shape must agree across ranks.
        mode: how gradients flow back (:class:`GatherGrad`).
        group: the process group (default group if None).
        sizes: the per-rank row counts if already known (saves one collective).

    Examples:
        >>> import torch
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> gather_with_grad(x, GatherGrad.LOCAL).tensor.requires_grad
        True
    """
    if not isinstance(mode, GatherGrad):
        raise ValueError(f"mode must be a GatherGrad, got {mode!r}")
    world = get_world_size(group)
    rank = get_rank(group)
    if world == 1:
        tensor = x.detach() if mode is GatherGrad.NONE else x
        return Gathered(tensor, (x.shape[0],), 0)
    if sizes is None:
        sizes = all_sizes(x.shape[0], group, x.device)
    if len(sizes) != world or sizes[rank] != x.shape[0]:
        raise ValueError(f"sizes must list every rank's row count, got {sizes} on rank {rank}")
    if mode is GatherGrad.GLOBAL:
        tensor = _GatherSumGrad.apply(x, tuple(sizes), rank, group)
    else:
        pieces = _all_gather_padded(x.detach(), sizes, group)
        if mode is GatherGrad.LOCAL:
            pieces[rank] = x
        tensor = torch.cat(pieces, dim=0)
    return Gathered(tensor, tuple(sizes), rank)


def _all_gather_padded(x: Tensor, sizes: list[int], group: ProcessGroup | None) -> list[Tensor]:
    """all_gather for unequal row counts: pad to the largest, gather, trim."""
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    buffers = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(buffers, x, group=group)
    return [b[:n] for b, n in zip(buffers, sizes, strict=True)]


class _GatherSumGrad(torch.autograd.Function):
    """Forward: all-gather. Backward: sum the gathered gradient over ranks, return the own slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...], rank: int, group: Any) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat(_all_gather_padded(x, list(sizes), group), dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None
