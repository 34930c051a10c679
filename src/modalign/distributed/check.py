"""Check a loss across real processes: N ranks (gloo, CPU) against one process on the whole batch.

:func:`check_distributed` starts ``world_size`` processes on 127.0.0.1, builds the loss on each with
the same seed, runs it on that rank's shard of the inputs and backpropagates; the parent runs the
same loss on the concatenated inputs. Under the convention of :mod:`modalign.distributed` (the
mean over ranks of the per-rank losses is the single-process loss, which is what DDP's gradient
averaging expects) it compares:

* the mean over ranks of the losses with the single-process loss;
* on every rank, the gradient of every input divided by ``world_size`` with the single-process
  gradient of the same rows (DDP divides the encoders' parameter gradients by ``world_size``);
* the mean over ranks of the gradient of every loss parameter (logit scale, bias) with its
  single-process gradient (DDP averages it).

A mismatch raises :class:`DistributedMismatchError` naming the quantity, the rank and the error.

Examples:
    >>> import functools, torch
    >>> from modalign.losses import build_loss
    >>> factory = functools.partial(build_loss, "clip", modalities=["image", "text"])
    >>> shards = [{"image": torch.randn(n, 8, dtype=torch.float64),
    ...            "text": torch.randn(n, 8, dtype=torch.float64)} for n in (3, 5)]
    >>> # not run as a doctest: it starts two processes (tests/test_distributed.py runs it)
    >>> report = check_distributed(factory, shards)  # doctest: +SKIP
    >>> report.passed  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

if TYPE_CHECKING:
    from typing_extensions import Unpack

LossFactory = Callable[[], nn.Module]


class CheckOptions(TypedDict, total=False):
    """How :func:`check_distributed_cases` (and :func:`check_distributed`) run and compare."""

    rtol: float
    atol: float
    seed: int
    timeout: float
    start_method: str
    raise_on_mismatch: bool


@dataclass(frozen=True)
class DistributedCase:
    """One loss and its per-rank inputs (the factory must be picklable: a top-level function or a
    ``functools.partial`` of one)."""

    loss_factory: LossFactory
    inputs_per_rank: Sequence[Mapping[str, Tensor]]
    groups_per_rank: Sequence[Tensor] | None = None
    indices_per_rank: Sequence[Tensor] | None = None
    name: str = ""


@dataclass(frozen=True)
class DistributedCheckReport:
    """The outcome of one check.

    Attributes:
        name: the case name. world_size: number of processes. rank_sizes: rows per rank.
        loss_single: the single-process loss. loss_ranks: each rank's loss.
        errors: ``max |ours - reference|`` relative to ``max |reference|`` for ``"loss"``,
            ``"input:<key>@rank<r>"`` and ``"param:<name>"``.
        failures: the entries of ``errors`` above tolerance.
    """

    name: str
    world_size: int
    rank_sizes: tuple[int, ...]
    loss_single: float
    loss_ranks: tuple[float, ...]
    errors: dict[str, float] = field(default_factory=dict)
    failures: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        """One line per compared quantity, worst first."""
        head = (
            f"{self.name or 'loss'}: {self.world_size} ranks {list(self.rank_sizes)}, "
            f"single-process loss {self.loss_single:.10g}, per-rank {list(self.loss_ranks)}"
        )
        lines = [head] + [
            f"  {'FAIL' if k in self.failures else 'ok  '} {k}: relative error {v:.3g}"
            for k, v in sorted(self.errors.items(), key=lambda kv: -kv[1])
        ]
        return "\n".join(lines)


class DistributedMismatchError(AssertionError):
    """Raised when the N-rank run disagrees with the single-process run."""

    def __init__(self, report: DistributedCheckReport) -> None:
        super().__init__("distributed run differs from single-process run:\n" + report.summary())
        self.report = report


def check_distributed(
    loss_factory: LossFactory,
    inputs_per_rank: Sequence[Mapping[str, Tensor]],
    *,
    groups_per_rank: Sequence[Tensor] | None = None,
    indices_per_rank: Sequence[Tensor] | None = None,
    **options: Unpack[CheckOptions],
) -> DistributedCheckReport:
    """Run ``loss_factory()`` on ``len(inputs_per_rank)`` real processes and on one process.

    Args:
        loss_factory: builds the loss module (called once per process after ``manual_seed(seed)``;
            the module is then cast to the inputs' floating dtype).
        inputs_per_rank: per rank, the embeddings keyed by modality (use float64 for tight checks).
        groups_per_rank: optional per-rank group-id tensors (passed as ``groups=``).
        indices_per_rank: optional per-rank sample indices (passed as ``indices=``).
        **options: ``rtol``, ``atol``, ``seed``, ``timeout``, ``start_method``,
            ``raise_on_mismatch``, as :func:`check_distributed_cases` takes them.

    Returns:
        A :class:`DistributedCheckReport`.
    """
    case = DistributedCase(loss_factory, inputs_per_rank, groups_per_rank, indices_per_rank)
    (report,) = check_distributed_cases([case], **options)
    return report


def check_distributed_cases(
    cases: Sequence[DistributedCase],
    *,
    rtol: float = 1e-7,
    atol: float = 1e-10,
    seed: int = 0,
    timeout: float = 120.0,
    start_method: str = "spawn",
    raise_on_mismatch: bool = True,
) -> list[DistributedCheckReport]:
    """Like :func:`check_distributed` for several cases in one process group (start-up paid once).

    Every case must have the same number of ranks.

    Args:
        cases: the losses and their per-rank inputs.
        rtol: tolerated error relative to the largest reference entry; atol: absolute slack.
        seed: seed set before building the loss and before each forward pass.
        timeout: seconds to wait for the processes.
        start_method: ``"spawn"`` (safe default) or ``"fork"`` (faster, POSIX only).
        raise_on_mismatch: raise :class:`DistributedMismatchError` (else return the reports).
    """
    if not cases:
        raise ValueError("cases must not be empty")
    world = len(cases[0].inputs_per_rank)
    for case in cases:
        _validate_case(case, world)
    port = _free_port()
    ctx = mp.get_context(start_method)
    results: Any = ctx.Queue()
    procs = mp.start_processes(
        _worker,
        args=(world, port, list(cases), results, seed, timeout),
        nprocs=world,
        join=False,
        start_method=start_method,
    )
    references = [_reference(case, seed) for case in cases]
    per_rank: dict[int, list[Any]] = {}
    try:
        while len(per_rank) < world:
            try:
                rank, status, payload = results.get(timeout=timeout)
            except queue_module.Empty:
                raise RuntimeError(f"distributed check: no answer within {timeout} s") from None
            if status != "ok":
                raise RuntimeError(f"distributed check: rank {rank} failed:\n{payload}")
            per_rank[rank] = payload
    finally:
        for p in procs.processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    reports = [
        _compare(case, ref, [per_rank[r][k] for r in range(world)], rtol, atol)
        for k, (case, ref) in enumerate(zip(cases, references, strict=True))
    ]
    if raise_on_mismatch:
        for report in reports:
            if not report.passed:
                raise DistributedMismatchError(report)
    return reports


Result = tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]


def _run_once(
    factory: LossFactory,
    inputs: Mapping[str, Tensor],
    groups: Tensor | None,
    indices: Tensor | None,
    seed: int,
) -> Result:
    torch.manual_seed(seed)
    module = factory()
    dtype = next(iter(inputs.values())).dtype
    if dtype.is_floating_point:
        module = module.to(dtype)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    torch.manual_seed(seed + 1)
    out = module(leaves, groups=groups, indices=indices)
    out.loss.backward()
    grads = {
        k: (v.grad if v.grad is not None else torch.zeros_like(v)).detach().double().numpy()
        for k, v in leaves.items()
    }
    params = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().numpy()
        for name, p in module.named_parameters()
    }
    return float(out.loss.detach()), grads, params


def _worker(
    rank: int,
    world: int,
    port: int,
    cases: list[DistributedCase],
    results: Any,
    seed: int,
    timeout: float,
) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout),
        )
        payload = [
            _run_once(
                case.loss_factory,
                case.inputs_per_rank[rank],
                None if case.groups_per_rank is None else case.groups_per_rank[rank],
                None if case.indices_per_rank is None else case.indices_per_rank[rank],
                seed,
            )
            for case in cases
        ]
        results.put((rank, "ok", payload))
    except BaseException:  # report anything, including a failed rendezvous
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _reference(case: DistributedCase, seed: int) -> Result:
    keys = list(case.inputs_per_rank[0])
    inputs = {k: torch.cat([shard[k] for shard in case.inputs_per_rank]) for k in keys}
    groups = None if case.groups_per_rank is None else torch.cat(list(case.groups_per_rank))
    indices = None if case.indices_per_rank is None else torch.cat(list(case.indices_per_rank))
    return _run_once(case.loss_factory, inputs, groups, indices, seed)


def _rel_error(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = float(np.abs(ours - ref).max()) if ref.size else 0.0
    return err / max(scale, 1e-300), err, scale


def _compare(
    case: DistributedCase, ref: Result, ranks: list[Result], rtol: float, atol: float
) -> DistributedCheckReport:
    world = len(ranks)
    sizes = tuple(next(iter(shard.values())).shape[0] for shard in case.inputs_per_rank)
    errors: dict[str, float] = {}
    failures: dict[str, float] = {}

    def record(name: str, ours: np.ndarray, reference: np.ndarray) -> None:
        rel, err, scale = _rel_error(ours, reference)
        errors[name] = rel
        if err > atol + rtol * scale:
            failures[name] = rel

    ref_loss, ref_grads, ref_params = ref
    record("loss", np.array(np.mean([r[0] for r in ranks])), np.array(ref_loss))
    offsets = np.cumsum((0, *sizes))
    for r, (_, grads, _) in enumerate(ranks):
        for key, g in grads.items():
            rows = ref_grads[key][offsets[r] : offsets[r + 1]]
            record(f"input:{key}@rank{r}", g / world, rows)
    for name, g_ref in ref_params.items():
        mean = np.mean([r[2][name] for r in ranks], axis=0)
        record(f"param:{name}", mean, g_ref)
    return DistributedCheckReport(
        name=case.name,
        world_size=world,
        rank_sizes=sizes,
        loss_single=ref_loss,
        loss_ranks=tuple(r[0] for r in ranks),
        errors=errors,
        failures=failures,
    )


def _validate_case(case: DistributedCase, world: int) -> None:
    if not callable(case.loss_factory):
        raise ValueError("loss_factory must be callable and return a loss module")
    shards = case.inputs_per_rank
    if len(shards) < 2 or len(shards) != world:
        raise ValueError(
            f"inputs_per_rank must hold one mapping per rank (at least 2, the same number for "
            f"every case), got {len(shards)}"
        )
    keys = set(shards[0])
    for r, shard in enumerate(shards):
        if set(shard) != keys:
            raise ValueError(
                f"inputs_per_rank[{r}] has keys {sorted(shard)}, expected {sorted(keys)}"
            )
        sizes = {t.shape[0] for t in shard.values()}
        if len(sizes) != 1:
            raise ValueError(f"inputs_per_rank[{r}] tensors disagree in batch size: {sizes}")
    for name, per_rank in (
        ("groups_per_rank", case.groups_per_rank),
        ("indices_per_rank", case.indices_per_rank),
    ):
        if per_rank is not None and len(per_rank) != world:
            raise ValueError(f"{name} must hold one tensor per rank ({world}), got {len(per_rank)}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
