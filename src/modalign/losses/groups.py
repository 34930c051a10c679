"""Positives by group id: per-row sums of the columns that share the row's group, in O(n d).

A sample may have several positives (the captions of one image, the styles of one concept). With
integer group ids, row ``i`` and column ``j`` are positives iff ``row_groups[i] == col_groups[j]``;
losses need the sum (or mean) of the positive logits of each row, which is linear in the columns:
``sum_{j: g_j = g_i} x_i . y_j = x_i . (sum_{j: g_j = g_i} y_j)``.

Examples:
    >>> import torch
    >>> cols = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> sums, counts = same_group_sums(torch.tensor([7, 3]), cols, torch.tensor([7, 3, 7]))
    >>> sums.tolist(), counts.tolist()
    ([[2.0, 1.0], [0.0, 1.0]], [2, 1])
"""

from __future__ import annotations

import torch
from torch import Tensor


def same_group_sums(row_groups: Tensor, cols: Tensor, col_groups: Tensor) -> tuple[Tensor, Tensor]:
    """For each row group id, the sum of ``cols`` rows with that id, and how many there are.

    Raises ValueError if a row's group has no column (the row would have no positive).
    """
    uniq, inverse = torch.unique(col_groups, return_inverse=True)
    sums = cols.new_zeros((uniq.shape[0], cols.shape[1])).index_add(0, inverse, cols)
    counts = torch.bincount(inverse, minlength=uniq.shape[0])
    where = torch.searchsorted(uniq, row_groups).clamp_(max=max(uniq.shape[0] - 1, 0))
    if uniq.numel() == 0 or not bool((uniq[where] == row_groups).all()):
        raise ValueError("groups must give every row at least one positive among the columns")
    return sums[where], counts[where]
