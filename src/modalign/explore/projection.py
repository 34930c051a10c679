"""2-d maps of a joint space: PCA (built in) or UMAP (the ``explore-umap`` extra).

A projection is fitted once on the shown native rows and then *applies* to other vectors (rows
shifted along the gap vector, inverted twins, a served query), so every state is drawn in the
same coordinates and motion on the map is motion in the space.

Examples:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 6))
    >>> pca = PCA2().fit(x)
    >>> pca.transform(x).shape, round(float(pca.transform(x)[:, 0].mean()), 6)
    ((50, 2), 0.0)
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Protocol

import numpy as np

from modalign.errors import ModalignError

__all__ = ["PCA2", "PROJECTIONS", "UMAP2", "Projection", "make_projection", "umap_available"]

PROJECTIONS: tuple[str, ...] = ("pca", "umap")


class Projection(Protocol):
    """Fitted once, applied to any ``(n, d)`` array of the same space."""

    name: str

    def fit(self, x: np.ndarray) -> Projection: ...

    def transform(self, x: np.ndarray) -> np.ndarray: ...


class PCA2:
    """The two leading principal axes of the fitted rows (float64 SVD of the centred rows).

    ``transform(x) = (x - mean) @ components.T``; ``explained`` is the share of variance of each
    axis. Signs are fixed so each axis' largest-magnitude loading is positive (deterministic).
    """

    name = "pca"

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None
        self.explained: list[float] = [0.0, 0.0]

    def fit(self, x: np.ndarray) -> PCA2:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ModalignError(f"projection: expected at least 2 rows of shape (n, d), got "
                                f"{tuple(x.shape)}")
        self.mean = x.mean(0)
        _, s, vh = np.linalg.svd(x - self.mean, full_matrices=False)
        comps = np.zeros((2, x.shape[1]))
        comps[: min(2, len(vh))] = vh[:2]
        for i in range(2):
            j = int(np.argmax(np.abs(comps[i])))
            if comps[i, j] < 0:
                comps[i] = -comps[i]
        self.components = comps
        var = s**2
        total = float(var.sum())
        self.explained = [float(v / total) if total > 0 else 0.0 for v in
                          np.pad(var[:2], (0, max(0, 2 - len(var))))]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self.mean is None or self.components is None:
            raise ModalignError("projection: call fit() before transform()")
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


class UMAP2:
    """UMAP (McInnes et al., 2018) from ``umap-learn``, cosine metric, seeded.

    Needs ``pip install 'modalign[explore-umap]'``; rows added later use ``umap``'s
    ``transform`` (an out-of-sample embedding, not a refit).
    """

    name = "umap"

    def __init__(self, seed: int = 0, n_neighbors: int = 15) -> None:
        if not umap_available():
            raise ModalignError("--projection umap needs the umap-learn package: "
                                "pip install 'modalign[explore-umap]' (or use --projection pca)")
        self.seed, self.n_neighbors = seed, n_neighbors
        self.explained: list[float] = []
        self._model: Any = None  # a umap.UMAP once fitted (umap-learn has no type information)

    def fit(self, x: np.ndarray) -> UMAP2:
        umap = importlib.import_module("umap")
        n = len(x)
        self._model = umap.UMAP(n_components=2, metric="cosine", random_state=self.seed,
                                n_neighbors=max(2, min(self.n_neighbors, n - 1)))
        self._model.fit(np.asarray(x, dtype=np.float32))
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise ModalignError("projection: call fit() before transform()")
        return np.asarray(self._model.transform(np.asarray(x, dtype=np.float32)), np.float64)


def umap_available() -> bool:
    """Whether ``umap-learn`` is importable."""
    return importlib.util.find_spec("umap") is not None


def make_projection(name: str, seed: int = 0) -> Projection:
    """``"pca"`` or ``"umap"``; raises :class:`ModalignError` for anything else."""
    key = name.strip().lower()
    if key == "pca":
        return PCA2()
    if key == "umap":
        return UMAP2(seed=seed)
    raise ModalignError(f"--projection {name!r}: expected one of {', '.join(PROJECTIONS)}")
