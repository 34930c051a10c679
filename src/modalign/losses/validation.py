"""Cheap input checks shared by every loss; each raises ``ValueError`` naming the argument.

Validation is on by default. It costs a few reductions over the inputs (and, on an accelerator, one
host synchronisation per check); switch it off globally with :func:`set_validation` or locally with
the :func:`validation` context manager once a pipeline is known to be sound.

Examples:
    >>> import torch
    >>> from modalign.losses.validation import check_embedding, validation
    >>> check_embedding("image", torch.ones(2, 3), normalize=True)  # the row norms, for reuse
    tensor([1.7321, 1.7321])
    >>> try:
    ...     check_embedding("image", torch.zeros(2, 3), normalize=True)
    ... except ValueError as err:
    ...     print(str(err).split(";")[0])
    image has a row of zero norm (row 0)
    >>> with validation(False):
    ...     check_embedding("image", torch.zeros(2, 3), normalize=True)  # skipped
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

_ENABLED = True

NORM_EPS = 1e-12
"""Rows whose norm is at or below this are rejected where losses normalise their inputs."""


def validation_enabled() -> bool:
    """Whether the checks in this module currently run."""
    return _ENABLED


def set_validation(enabled: bool) -> None:
    """Switch every check of this module on or off for the whole process."""
    global _ENABLED
    _ENABLED = bool(enabled)


@contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Temporarily switch validation on or off (restores the previous state on exit).

    Examples:
        >>> with validation(False):
        ...     validation_enabled()
        False
    """
    previous = _ENABLED
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


def check_embedding(
    name: str, x: Tensor, *, normalize: bool, allow_empty: bool = False
) -> Tensor | None:
    """Check one embedding matrix: a floating (batch, dim) tensor, finite, non-empty.

    The finiteness check is one reduction: where ``normalize`` the row norms (a row norm is
    finite exactly when the row is, short of overflow), else the sum of all entries; only where
    that is not finite are the entries checked one by one (to name the row, or to pass a matrix
    whose sum overflowed).

    Args:
        name: the argument name used in the error message (e.g. the modality).
        x: the tensor to check.
        normalize: whether the loss will L2-normalise ``x``; if so, zero rows are rejected.
        allow_empty: accept a batch of zero rows (a rank with no samples in a distributed run).

    Returns:
        The row norms of ``x`` (no gradient) where ``normalize`` and the checks ran, for the
        normalisation to reuse (:func:`modalign.losses.normalize.normalize_rows`); else None.
    """
    if not _ENABLED:
        return None
    if not isinstance(x, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape (batch, dim), got {type(x).__name__}"
        )
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has dim 0; expected at least one feature per row")
    if x.shape[0] == 0:
        if allow_empty:
            return None
        raise ValueError(f"{name} is an empty batch (0 rows); expected at least one row")
    norms = torch.linalg.vector_norm(x.detach(), dim=1) if normalize else None
    summary = x.detach().sum() if norms is None else norms
    if not bool(torch.isfinite(summary).all()):
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"{name} contains NaN or inf (first in row {row}); expected finite values"
            )
    if norms is not None:
        small = norms <= NORM_EPS
        if bool(small.any()):
            row = int(small.nonzero()[0, 0])
            raise ValueError(
                f"{name} has a row of zero norm (row {row}); the loss L2-normalises its inputs, "
                "so every row needs a non-zero norm (or pass normalize=False)"
            )
    return norms


def check_pair(
    names: Sequence[str],
    tensors: Sequence[Tensor],
    *,
    same_batch: bool = True,
    same_dim: bool = True,
) -> None:
    """Check that several embedding matrices agree in batch size and/or dimension."""
    if not _ENABLED or len(tensors) < 2:
        return
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if same_batch and t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name} has batch size {t.shape[0]} but {first_name} has {first.shape[0]}; "
                "paired embeddings need the same number of rows"
            )
        if same_dim and t.shape[-1] != first.shape[-1]:
            raise ValueError(
                f"{name} has dim {t.shape[-1]} but {first_name} has {first.shape[-1]}; "
                "embeddings compared by inner product need the same dim"
            )
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def check_positive(name: str, value: float | Tensor) -> None:
    """Check that a scalar (temperature, logit scale, weight...) is finite and > 0."""
    if not _ENABLED:
        return
    v = _as_number(name, value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v}")


def check_finite_scalar(name: str, value: float | Tensor) -> None:
    """Check that a scalar (a bias, an offset) is finite."""
    if not _ENABLED:
        return
    v = _as_number(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")


def check_groups(name: str, groups: Tensor, batch: int) -> None:
    """Check a group-id tensor: integer, one-dimensional, one id per row of the batch."""
    if not _ENABLED:
        return
    if not isinstance(groups, Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor of shape (batch,)")
    if groups.dim() != 1 or groups.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},) (one group id per row), got {tuple(groups.shape)}"
        )
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer group ids, got dtype {groups.dtype}")


def check_modalities(name: str, embeddings: Mapping[str, Tensor], required: Sequence[str]) -> None:
    """Check that ``embeddings`` holds every key in ``required`` (always on: a config error)."""
    missing = [m for m in required if m not in embeddings]
    if missing:
        raise ValueError(
            f"{name} is missing modalities {missing}; got keys {sorted(embeddings)}, "
            f"expected {list(required)}"
        )


def scalar_tensor(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor: a tensor reshaped to ``()`` (its graph kept), a number made on
    ``like``'s dtype and device.

    Examples:
        >>> import torch
        >>> scalar_tensor(2, torch.zeros(3, dtype=torch.float64))
        tensor(2., dtype=torch.float64)
        >>> scalar_tensor(torch.tensor([0.5]), torch.zeros(3)).shape
        torch.Size([])
    """
    if isinstance(value, Tensor):
        return value.reshape(())
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _as_number(name: str, value: float | Tensor) -> float:
    """A checked setting as a Python float for the checks and their messages (a one-element
    tensor is read detached); what computes with it takes :func:`scalar_tensor`."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        return float(value.detach())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
