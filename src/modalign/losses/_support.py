"""Pieces shared by several objectives: checked normalisation, soft-target CE, picking keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from modalign.distributed.gather import Gathered, GatherGrad, ProcessGroup, gather_with_grad
from modalign.losses.normalize import normalize_rows
from modalign.losses.validation import (
    check_embedding,
    check_modalities,
    check_pair,
    validation_enabled,
)


def checked(
    x: Tensor,
    name: str,
    *,
    rows: int | None = None,
    dim: int | None = None,
    normalize: bool = False,
) -> Tensor:
    """Validate an embedding matrix (and its batch size / dim when given); return it unchanged."""
    check_embedding(name, x, normalize=normalize)
    _check_shape(x, name, rows, dim)
    return x


def _check_shape(x: Tensor, name: str, rows: int | None, dim: int | None) -> None:
    if validation_enabled():
        if rows is not None and x.shape[0] != rows:
            raise ValueError(
                f"{name} has batch size {x.shape[0]}; expected {rows} rows like the others"
            )
        if dim is not None and x.shape[1] != dim:
            raise ValueError(f"{name} has dim {x.shape[1]}; expected {dim} like the others")


def unit_rows(x: Tensor, name: str, *, rows: int | None = None, dim: int | None = None) -> Tensor:
    """Validate ``x`` (no zero rows) and return its rows L2-normalised."""
    norms = check_embedding(name, x, normalize=True)
    _check_shape(x, name, rows, dim)
    return normalize_rows(x, norms)


def check_fraction(value: float, name: str) -> None:
    """Raise ValueError unless ``0 <= value <= 1``."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def at_least_two(modalities: Sequence[object], name: str = "modalities") -> None:
    """Raise ValueError unless ``modalities`` names at least two keys."""
    if len(modalities) < 2:
        raise ValueError(f"{name} must name at least 2 embedding keys, got {list(modalities)}")


def pick(
    embeddings: Mapping[str, Tensor], keys: Sequence[str], *, normalize: bool = True,
    same_batch: bool = True, same_dim: bool = True,
) -> list[Tensor]:
    """The tensors of ``keys`` in order, checked under their own names (the user's modalities).

    ValueError names a missing key, a bad tensor (NaN/inf, empty, zero rows when ``normalize``)
    or a key whose batch size / dim differs from the first key's.
    """
    check_modalities("embeddings", embeddings, keys)
    tensors = [embeddings[k] for k in keys]
    for key, x in zip(keys, tensors, strict=True):
        check_embedding(key, x, normalize=normalize)
    check_pair(list(keys), tensors, same_batch=same_batch, same_dim=same_dim)
    return tensors


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum_j targets_ij log softmax_j(logits_i)`` (soft targets allowed)."""
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def gather_rows(
    x: Tensor, gather: GatherGrad | None, group: ProcessGroup | None = None,
    sizes: list[int] | None = None,
) -> Gathered:
    """All ranks' rows of ``x`` (``gather=None``: this rank's rows only, as a world of one).

    A loss that sums per-row terms over this rank's rows and multiplies by
    ``world_size / total`` has a mean over ranks equal to the single-process mean.
    """
    if gather is None:
        return Gathered(x, (x.shape[0],), 0)
    return gather_with_grad(x, gather, group, sizes)


def local_labels(g: Gathered, device: torch.device) -> Tensor:
    """Global column index of each local row: ``offset + arange(local rows)``."""
    return torch.arange(g.sizes[g.rank], device=device) + g.offset
