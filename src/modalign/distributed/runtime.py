"""The process runtime: device, process group, rank and shard helpers, DDP and autocast.

``torchrun --nproc-per-node N -m modalign train ...`` (or ``reproduce ...``) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` then picks the device and joins the process
group (NCCL on GPUs, gloo on CPU). Training takes each rank's contiguous shard of every global
batch, the objectives gather embeddings across ranks with ``GatherGrad.GLOBAL``
(:mod:`modalign.distributed.gather`), and DDP (:func:`wrap`) averages the heads' gradients; the
objectives' own parameters (temperatures) sit outside the DDP module and are averaged by
:func:`average_gradients`. The result is the single-process update on the global batch.
Extraction and inversion split rows with :func:`shard_bounds` and meet at :func:`barrier`.

Examples:
    >>> ctx = setup("cpu")
    >>> (ctx.rank, ctx.world_size, ctx.is_main, str(ctx.device))
    (0, 1, True, 'cpu')
    >>> shard_bounds(10, 1, 3)
    (4, 7)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modalign.errors import ModalignError

__all__ = ["DistContext", "autocast", "average_gradients", "barrier", "mean_over_ranks",
           "process_rank", "resolve_device", "setup", "shard_bounds", "teardown", "wrap"]


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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ModalignError(f"environment variable {name}={value!r}: expected an integer (torchrun "
                            "sets it)") from None


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the process group, else from ``RANK``/``WORLD_SIZE``, else (0, 1).

    Examples:
        >>> process_rank() if "WORLD_SIZE" not in os.environ else (0, 1)
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def resolve_device(spec: str | torch.device, local_rank: int | None = None, *,
                   argument: str = "device") -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; or the given device.

    ``local_rank`` defaults to ``LOCAL_RANK`` (0 when unset); a bare ``"cuda"`` becomes
    ``cuda:<local_rank>``. ``argument`` names the setting in errors (``"--device"``).

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    local_rank = _env_int("LOCAL_RANK", 0) if local_rank is None else local_rank
    if isinstance(spec, str) and spec.strip() == "auto":
        cuda = torch.cuda.is_available()
        return torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ModalignError(f"{argument}={spec!r} is not a device; expected 'auto', 'cpu', "
                            "'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModalignError(f"{argument}={spec!r} but CUDA is not available here; use 'cpu'")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def setup(device_spec: str | torch.device = "auto", *, argument: str = "device",
          timeout: timedelta | None = None) -> DistContext:
    """Pick the device and join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    ``timeout``: how long a collective may wait (e.g. hours where rank 0 alone inverts while the
    others wait at a barrier); torch's default when None.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_spec, local_rank, argument=argument)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timeout)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistContext(rank, world, local_rank, device)


def teardown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext | None = None) -> None:
    """Wait for every rank; a no-op in one process (or when no process group is up)."""
    if ctx is not None and ctx.world_size == 1:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Start and stop of shard ``rank`` of ``n`` rows split into ``world_size`` contiguous shards
    (the first ``n % world_size`` shards hold one row more).

    Examples:
        >>> [shard_bounds(10, r, 3) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ModalignError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < "
                            "world_size")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def autocast(device: str | torch.device, dtype: torch.dtype | None = torch.float16
             ) -> AbstractContextManager[object]:
    """Autocast to ``dtype`` on CUDA; a no-op on the CPU or with ``dtype=None`` (full precision).

    The returned context manager can be entered again for every step.

    Examples:
        >>> with autocast("cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if dtype is None or torch.device(device).type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype)


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
