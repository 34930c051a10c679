"""Linear separability of two modalities: held-out accuracy of a logistic regression.

A logistic regression (weights and bias, L2 penalty ``||w||^2 / (2 C)`` on the summed loss, as
in the usual ``C = 1`` default, fitted by Newton's method in float64) learns to tell rows of ``x``
(label 0) from rows of ``y`` (label 1). The same number ``m = min(n_x, n_y, max_rows)`` of rows is
drawn from each modality (seeded), so chance level is 0.5; a seeded random 80 % of the 2m rows
trains the model and the other 20 % measures its accuracy. 1.0 means the modalities occupy
disjoint, linearly separable regions (a modality gap); about 0.5 means a linear probe cannot tell
which tower produced an embedding.

Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 8)) + 3.0; y = rng.normal(size=(200, 8)) - 3.0
    >>> linear_separability(x, y)["accuracy"]
    1.0
"""

from __future__ import annotations

from typing import Any

import torch

from modalign.geometry.inputs import (
    ArrayLike,
    as_matrices,
    sample_rows,
)

__all__ = ["fit_logistic_regression", "linear_separability"]

#: Rows per modality above which a seeded sample is used.
DEFAULT_MAX_ROWS = 20000


def linear_separability(
    x: ArrayLike,
    y: ArrayLike,
    *,
    normalize: bool = True,
    train_fraction: float = 0.8,
    c: float = 1.0,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    seed: int = 0,
    max_iter: int = 50,
) -> dict[str, Any]:
    """Held-out accuracy of a logistic regression separating ``x`` from ``y``.

    Returns a dict with ``accuracy`` (held-out), ``train_accuracy``, ``n_train``, ``n_test``,
    ``rows_per_modality`` and ``seed``.

    Args:
        x, y: embeddings (n_x, d) and (n_y, d); each needs at least 5 rows.
        normalize: L2-normalise rows first.
        train_fraction: share of the rows used for training (the rest is held out).
        c: inverse L2 regularisation strength (penalty ``||w||^2 / (2 c)`` on the summed loss).
        max_rows: rows drawn per modality at most (None: all).
        seed: seeds the row sample and the split.
        max_iter: Newton iterations at most.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction: expected a value in (0, 1), got {train_fraction}")
    if c <= 0:
        raise ValueError(f"c: expected a positive regularisation constant, got {c}")
    xm, ym = as_matrices({"x": x, "y": y}, min_rows=5)
    m = min(xm.shape[0], ym.shape[0]) if max_rows is None else min(
        xm.shape[0], ym.shape[0], max_rows)
    xs = sample_rows(xm, m, seed, "x", normalize=normalize)
    ys = sample_rows(ym, m, seed + 1, "y", normalize=normalize)
    feats = torch.cat([xs, ys]).to(torch.float64)
    labels = torch.cat([torch.zeros(m, dtype=torch.float64), torch.ones(m, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(2 * m, generator=gen)
    n_train = round(train_fraction * 2 * m)
    n_train = min(max(n_train, 1), 2 * m - 1)
    tr, te = order[:n_train], order[n_train:]
    w = fit_logistic_regression(feats[tr], labels[tr], c=c, max_iter=max_iter)
    pred = (feats @ w[:-1] + w[-1]) > 0
    correct = pred == labels.bool()
    return {
        "accuracy": float(correct[te].double().mean()),
        "train_accuracy": float(correct[tr].double().mean()),
        "n_train": int(n_train),
        "n_test": len(te),
        "rows_per_modality": int(m),
        "seed": int(seed),
    }


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, *, c: float = 1.0,
                            max_iter: int = 50, tol: float = 1e-10) -> torch.Tensor:
    """Minimise ``sum_i BCE(f_i . w + b, y_i) + ||w||^2 / (2 c)`` by damped Newton steps.

    Returns ``[w, b]`` (float64, length d + 1). The objective is strictly convex, so Newton's
    method with step halving converges to the unique minimum.

    Examples:
        >>> f = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=torch.float64)
        >>> w = fit_logistic_regression(f, torch.tensor([0.0, 0.0, 1.0, 1.0]))
        >>> bool(w[0] > 0)
        True
    """
    f = torch.cat([features.to(torch.float64),
                   torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    y = labels.to(torch.float64)
    reg = torch.full((f.shape[1],), 1.0 / c, dtype=torch.float64)
    reg[-1] = 0.0  # the bias is not penalised

    def objective(w: torch.Tensor) -> float:
        z = f @ w
        return float(torch.nn.functional.softplus(z).sum() - (y * z).sum()
                     + 0.5 * (reg * w * w).sum())

    w = torch.zeros(f.shape[1], dtype=torch.float64)
    current = objective(w)
    for _ in range(max_iter):
        p = torch.sigmoid(f @ w)
        grad = f.T @ (p - y) + reg * w
        hess = (f * (p * (1 - p))[:, None]).T @ f + torch.diag(reg) \
            + 1e-10 * torch.eye(f.shape[1], dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            candidate = w - scale * step
            value = objective(candidate)
            if value <= current:
                break
            scale /= 2
        else:
            break
        w, improvement, current = candidate, current - value, value
        if improvement <= tol * max(1.0, abs(current)):
            break
    return w
