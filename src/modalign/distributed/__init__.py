"""Cross-process pieces: the process runtime (:mod:`modalign.distributed.runtime`: device,
process group, rank and shard helpers, DDP, autocast), gather with gradients, rank and world size,
the N-rank == 1-rank check."""

from modalign.distributed.gather import (
    Gathered,
    GatherGrad,
    all_sizes,
    gather_with_grad,
    get_rank,
    get_world_size,
    parse_gather,
)

__all__ = [
    "GatherGrad",
    "Gathered",
    "all_sizes",
    "check_distributed",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "parse_gather",
]


def __getattr__(name: str) -> object:
    # check.py pulls in multiprocessing machinery; import it only when asked for.
    if name in (
        "check_distributed",
        "check_distributed_cases",
        "DistributedCase",
        "DistributedCheckReport",
        "DistributedMismatchError",
    ):
        from modalign.distributed import check

        return getattr(check, name)
    raise AttributeError(name)
