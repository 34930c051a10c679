"""Running ``modalign train`` under ``torchrun``: process group, device, DDP and small collectives.

``torchrun --nproc_per_node N -m modalign train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on GPUs, gloo on CPU). Each rank
takes its contiguous shard of every global batch (``modalign.train.data.shard``), the objectives
gather embeddings across ranks with ``GatherGrad.GLOBAL`` (``modalign.distributed``), and DDP
averages the heads' gradients; the objectives' own parameters (temperatures) sit outside the DDP
module and are averaged by :func:`average_gradients`. The result is the single-process update on
the global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and shows the progress bar."""
        return self.rank == 0


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; or the given device.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if spec == "auto":
        cuda = torch.cuda.is_available()
        return torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"train.device={spec!r} is not a device; expected 'auto', 'cpu', "
                         "'cuda' or 'cuda:N'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={spec!r} but CUDA is not available; use 'cpu'")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def setup(device_spec: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistContext(rank, world, local_rank, device)


def teardown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` on its device, inside DDP when there are several processes."""
    model = model.to(ctx.device)
    if ctx.world_size == 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def average_gradients(params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    """Average the gradients of replicated parameters over ranks (in place, one all-reduce)."""
    if ctx.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    """The mean of a float over ranks (the same float on every rank)."""
    if ctx.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in one process)."""
    if ctx.world_size > 1:
        dist.barrier()
