"""Checked access to embedding matrices: validation, streaming row chunks, seeded row samples.

Every geometry metric accepts a ``numpy`` array (memory-mapped float32 included) or a ``torch``
tensor of shape ``(n, d)``. Nothing here loads a whole memory-mapped matrix: metrics stream it in
row chunks (:func:`iter_chunks`) or read a seeded sample of rows (:func:`sample_indices`,
:func:`take_rows`). Chunks come back as tensors checked for NaN/inf, optionally L2-normalised (the
joint space of a contrastive model is the unit sphere).

Precision follows the input (:func:`working_dtype`): float64 inputs are computed in float64
throughout; float32 and lower inputs use float32 for the large products (similarity blocks,
outer products and sums within a chunk) while every running sum across chunks is float64.

Examples:
    >>> import numpy as np
    >>> x = as_matrix(np.ones((3, 2), np.float32), "x")
    >>> [tuple(c.shape) for _, c in iter_chunks(x, "x", chunk_rows=2)]
    [(2, 2), (1, 2)]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypeAlias

import numpy as np
import torch

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "ArrayLike",
    "as_matrix",
    "check_paired",
    "iter_chunks",
    "prepare",
    "sample_indices",
    "take_rows",
    "working_dtype",
]

ArrayLike: TypeAlias = "np.ndarray | torch.Tensor"

#: Rows per streamed chunk: 65,536 x 256 float64 is 128 MiB.
DEFAULT_CHUNK_ROWS = 65536


def as_matrix(x: Any, name: str, *, min_rows: int = 1) -> np.ndarray:
    """Return ``x`` as a 2-D floating numpy array without copying (memory maps stay mapped).

    Raises ``ValueError`` naming ``name`` when ``x`` is not 2-D, not floating point, or has fewer
    than ``min_rows`` rows or no columns.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        x = t.numpy()
    elif not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array or torch tensor of shape (n, d), "
                         f"got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n, d), got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected floating point values, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: embeddings have zero columns")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got {x.shape[0]}"
                         + (" (this modality is empty)" if x.shape[0] == 0 else ""))
    return x


def as_matrices(named: Mapping[str, Any], *, min_rows: int = 1) -> list[np.ndarray]:
    """:func:`as_matrix` of every value (named by its key in errors), in order, checked to share
    the first one's embedding dimension.

    Examples:
        >>> import numpy as np
        >>> x, y = as_matrices({"x": np.zeros((3, 2)), "y": np.ones((4, 2))}, min_rows=2)
        >>> x.shape, y.shape
        ((3, 2), (4, 2))
    """
    mats = [as_matrix(x, name, min_rows=min_rows) for name, x in named.items()]
    names = list(named)
    for name, m in zip(names[1:], mats[1:], strict=True):
        check_same_dim(mats[0], m, (names[0], name))
    return mats


def check_paired(x: np.ndarray, y: np.ndarray, names: tuple[str, str] = ("x", "y")) -> None:
    """Raise ``ValueError`` unless ``x`` and ``y`` have the same number of rows and columns."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]}: paired metrics need the same number of rows "
                         f"(row i of one is the positive of row i of the other), got "
                         f"{x.shape[0]} and {y.shape[0]}")
    check_same_dim(x, y, names)


def check_same_dim(x: np.ndarray, y: np.ndarray, names: tuple[str, str] = ("x", "y")) -> None:
    """Raise ``ValueError`` unless ``x`` and ``y`` have the same number of columns."""
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]}: expected the same embedding dimension, got "
                         f"{x.shape[1]} and {y.shape[1]}")


def working_dtype(x: np.ndarray) -> torch.dtype:
    """float64 for float64 input, float32 otherwise (see the module docstring)."""
    return torch.float64 if x.dtype == np.float64 else torch.float32


def prepare(block: np.ndarray | torch.Tensor, name: str, *, normalize: bool,
            offset: int = 0, dtype: torch.dtype = torch.float64,
            rows: np.ndarray | None = None) -> torch.Tensor:
    """A ``dtype`` tensor copy of ``block``; raises on NaN/inf and, if normalising, on zero rows.

    Errors name the row of the whole array: ``offset + i``, or ``rows[i]`` when ``block`` holds
    the rows ``rows`` of it (a sample).
    """

    def where(i: int) -> int:
        return int(rows[i]) if rows is not None else i + offset

    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    t = torch.from_numpy(np.array(block, dtype=np_dtype, order="C", copy=True))
    # one reduction checks finiteness: a row's norm is NaN/inf iff the row holds NaN/inf (or is
    # too large to square in this precision, which is reported as well)
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        row = int(torch.nonzero(~torch.isfinite(norms[:, 0]))[0, 0])
        what = "contains NaN or inf" if not bool(torch.isfinite(t[row]).all()) else \
            "is too large to normalise in this precision"
        raise ValueError(f"{name}: row {where(row)} {what}")
    if normalize:
        if bool((norms == 0).any()):
            row = where(int(torch.nonzero(norms[:, 0] == 0)[0, 0]))
            raise ValueError(f"{name}: row {row} is a zero vector, which cannot be L2-normalised")
        t = t / norms
    return t


def iter_chunks(x: np.ndarray, name: str, *, normalize: bool = False,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, dtype: torch.dtype | None = None
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start_row, chunk)`` over ``x`` in row order, chunks checked and in ``dtype``.

    ``dtype`` defaults to :func:`working_dtype` of ``x``.
    """
    dtype = dtype or working_dtype(x)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected a positive integer, got {chunk_rows}")
    for start in range(0, x.shape[0], chunk_rows):
        yield start, prepare(x[start:start + chunk_rows], name, normalize=normalize, offset=start,
                             dtype=dtype)


def sample_indices(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """All row indices when ``n <= max_rows`` (or ``max_rows`` is None), else a seeded sample.

    The sample is sorted, so reading it from a memory map is sequential.

    Examples:
        >>> sample_indices(5, None, 0).tolist(), len(sample_indices(100, 10, 0))
        ([0, 1, 2, 3, 4], 10)
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows: expected a positive integer or None, got {max_rows}")
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_rows, replace=False))


def take_rows(x: np.ndarray, idx: np.ndarray, name: str, *, normalize: bool,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``idx`` of ``x`` as a checked tensor (``dtype`` defaults to :func:`working_dtype`)."""
    dtype = dtype or working_dtype(x)
    if len(idx) == x.shape[0]:
        return prepare(x, name, normalize=normalize, dtype=dtype)
    return prepare(x[idx], name, normalize=normalize, dtype=dtype, rows=idx)


def sample_rows(x: np.ndarray, max_rows: int | None, seed: int, name: str, *,
                normalize: bool) -> torch.Tensor:
    """A seeded sample of at most ``max_rows`` rows of ``x`` (:func:`sample_indices`) as a checked
    tensor (:func:`take_rows`).

    Examples:
        >>> import numpy as np
        >>> tuple(sample_rows(np.ones((100, 3)), 10, 0, "x", normalize=True).shape)
        (10, 3)
    """
    return take_rows(x, sample_indices(x.shape[0], max_rows, seed), name, normalize=normalize)
