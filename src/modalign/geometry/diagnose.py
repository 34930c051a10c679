"""``diagnose``: every geometry metric of a joint embedding space, as one JSON-ready record.

Input: embeddings per modality (``{"image": (n_i, d), "text": (n_t, d)}``, numpy, memory-mapped or
torch) and, optionally, integer group ids per modality (rows with the same id are positives).
Without group ids, the modalities must have the same number of rows and row i of each is a
positive pair. With group ids, paired metrics use one pair per group present in both modalities
(the first row of the group in each; those rows are read into memory unless they already are the
rows in order), and unpaired metrics use every row.

Per modality: cone effect, uniformity, spectrum. Per pair of modalities: gap, linear separability,
alignment, cross-uniformity, hubness both ways, neighbour agreement, MIR (optional), similarity
margins. Joint: the spectrum of all rows pooled. Metrics defined on samples use the seeded
``max_rows`` of :class:`DiagnoseOptions`; the record states which metrics were sampled and how.
The record also keeps small figure data (a 2-D PCA projection of a sample of pairs, similarity
histograms) so reports can be re-rendered and compared from JSON alone.

Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 16)); y = x + 0.5 * rng.normal(size=(300, 16)) + 1.0
    >>> d = diagnose({"image": x, "text": y}, options=DiagnoseOptions(compute_mir=False))
    >>> round(d["pairs"]["image|text"]["gap"]["centroid_distance"], 2) > 0.1
    True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modalign import __version__
from modalign.geometry.agreement import neighbour_agreement
from modalign.geometry.cone import cone_from_sum, paired_sums
from modalign.geometry.gap import gap_from_centroids
from modalign.geometry.hubness import hubness
from modalign.geometry.inputs import ArrayLike, as_matrices, sample_indices, take_rows
from modalign.geometry.mir import modality_integration_rate
from modalign.geometry.separability import linear_separability
from modalign.geometry.spectrum import Moments, moments, spectrum_from_moments
from modalign.geometry.temperature import temperature_health
from modalign.geometry.uniformity import cross_uniformity, uniformity

__all__ = ["DiagnoseOptions", "diagnose", "pair_key", "pair_rows_by_group"]

HIST_EDGES = np.linspace(-1.0, 1.0, 81)


@dataclass(frozen=True)
class DiagnoseOptions:
    """Sample sizes, neighbourhood size, seed and switches of :func:`diagnose`."""

    seed: int = 0
    k: int = 10
    uniformity_rows: int = 8192
    knn_rows: int = 10000
    separability_rows: int = 20000
    mir_rows: int = 50000
    compute_mir: bool = True
    projection_pairs: int = 400
    projection_lines: int = 40
    histogram_pairs: int = 20000
    max_scale: float = 100.0

    def __post_init__(self) -> None:
        for name in ("k", "uniformity_rows", "knn_rows", "separability_rows", "mir_rows",
                     "projection_pairs", "histogram_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")


def pair_key(a: str, b: str) -> str:
    """The key of a modality pair in the record: ``"a|b"``."""
    return f"{a}|{b}"


def pair_rows_by_group(groups_a: ArrayLike, groups_b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """One positive pair per group present in both: the first row of the group on each side.

    Examples:
        >>> [v.tolist() for v in pair_rows_by_group(np.array([5, 7, 7]), np.array([7, 9, 5]))]
        [[0, 1], [2, 0]]
    """
    ga, gb = np.asarray(groups_a).reshape(-1), np.asarray(groups_b).reshape(-1)
    first_a: dict[int, int] = {}
    for i, g in enumerate(ga.tolist()):
        first_a.setdefault(g, i)
    first_b: dict[int, int] = {}
    for j, g in enumerate(gb.tolist()):
        first_b.setdefault(g, j)
    shared = [g for g in first_a if g in first_b]
    ia = np.array([first_a[g] for g in shared], dtype=np.int64)
    ib = np.array([first_b[g] for g in shared], dtype=np.int64)
    order = np.argsort(ia, kind="stable")
    return ia[order], ib[order]


def _rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    if len(idx) == x.shape[0] and np.array_equal(idx, np.arange(x.shape[0])):
        return x
    return np.asarray(x[idx])


def _histogram(values: torch.Tensor) -> list[float]:
    counts, _ = np.histogram(values.clamp(-1, 1).numpy(), bins=HIST_EDGES, density=True)
    return [round(float(c), 5) for c in counts]


def _pair_figures(xa: np.ndarray, xb: np.ndarray, opts: DiagnoseOptions, a: str, b: str
                  ) -> dict[str, Any]:
    """Projection and histogram data for paired rows ``xa``, ``xb`` (row i with row i)."""
    rng = np.random.default_rng(opts.seed)
    idx = sample_indices(xa.shape[0], opts.projection_pairs, opts.seed)
    pa = take_rows(xa, idx, a, normalize=True)
    pb = take_rows(xb, idx, b, normalize=True)
    both = torch.cat([pa, pb])
    centred = both - both.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    coords = (centred @ vh[:2].T).numpy()
    var = (s**2).numpy()
    projection = {
        "points": {a: np.round(coords[: len(idx)], 4).tolist(),
                   b: np.round(coords[len(idx):], 4).tolist()},
        "lines": min(opts.projection_lines, len(idx)),
        "explained": [float(v) for v in var[:2] / var.sum()] if var.sum() > 0 else [0.0, 0.0],
    }
    m = opts.histogram_pairs
    hidx = sample_indices(xa.shape[0], m, opts.seed + 7)
    ha, hb = take_rows(xa, hidx, a, normalize=True), take_rows(xb, hidx, b, normalize=True)
    n = len(hidx)
    i = torch.as_tensor(rng.integers(0, n, size=m))
    j = torch.as_tensor((i.numpy() + rng.integers(1, n, size=m)) % n)  # j != i
    series = {
        f"{a}-{b} positive": _histogram((ha * hb).sum(1)),
        f"{a}-{b} negative": _histogram((ha[i] * hb[j]).sum(1)),
        f"{a}-{a} random": _histogram((ha[i] * ha[j]).sum(1)),
        f"{b}-{b} random": _histogram((hb[i] * hb[j]).sum(1)),
    }
    return {"projection": projection,
            "histograms": {"edges": [float(e) for e in HIST_EDGES], "series": series}}


def _intra_positive_histogram(x: np.ndarray, groups: np.ndarray, name: str,
                              opts: DiagnoseOptions) -> list[float] | None:
    """Histogram of cosines of same-group pairs within one modality (None if there are none)."""
    same = _same_group_pairs(groups, opts.histogram_pairs, np.random.default_rng(opts.seed + 11))
    if len(same) == 0:
        return None
    rows = np.unique(same)
    emb = take_rows(x, rows, name, normalize=True)
    left = torch.as_tensor(np.searchsorted(rows, same[:, 0]))
    right = torch.as_tensor(np.searchsorted(rows, same[:, 1]))
    return _histogram((emb[left] * emb[right]).sum(1))


def _same_group_pairs(groups: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``m`` distinct-row pairs sharing a group id (intra-modal positives), seeded."""
    order = np.argsort(groups, kind="stable")
    sorted_g = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_g[1:] != sorted_g[:-1]])
    sizes = np.diff(np.r_[starts, len(groups)])
    multi = np.flatnonzero(sizes >= 2)
    if len(multi) == 0:
        return np.empty((0, 2), dtype=np.int64)
    pick = rng.choice(multi, size=m, replace=True)
    first = rng.integers(0, sizes[pick])
    second = (first + rng.integers(1, sizes[pick])) % sizes[pick]
    return np.stack([order[starts[pick] + first], order[starts[pick] + second]], axis=1)


def diagnose(
    embeddings: Mapping[str, ArrayLike],
    *,
    groups: Mapping[str, ArrayLike] | None = None,
    logit_scale: float | None = None,
    logit_scale_history: Sequence[float] | None = None,
    options: DiagnoseOptions | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every geometry metric of ``embeddings`` (see the module docstring); a JSON-ready dict.

    Non-finite values in the result (e.g. MIR of identical sets, ``log10(0)``) are ``None``.
    """
    opts = options or DiagnoseOptions()
    if len(embeddings) < 2:
        raise ValueError(f"embeddings: expected at least two modalities, got {list(embeddings)}")
    names = list(embeddings)
    mats = dict(zip(names, as_matrices({f"embeddings[{m!r}]": embeddings[m] for m in names},
                                       min_rows=2), strict=True))
    gid: dict[str, np.ndarray] | None = None
    if groups is not None:
        missing = [m for m in names if m not in groups]
        if missing:
            raise ValueError(f"groups: no group ids for modalities {missing}")
        gid = {m: np.asarray(groups[m]).reshape(-1) for m in names}
        for m in names:
            if len(gid[m]) != mats[m].shape[0]:
                raise ValueError(f"groups[{m!r}]: expected {mats[m].shape[0]} ids (one per row), "
                                 f"got {len(gid[m])}")
    else:
        counts = {m: mats[m].shape[0] for m in names}
        if len(set(counts.values())) != 1:
            raise ValueError(f"embeddings: without groups, modalities must have the same number "
                             f"of rows (row i of each is one positive pair), got {counts}")

    pairs = list(combinations(names, 2))
    steps: list[tuple[str, Callable[[], None]]] = []
    record: dict[str, Any] = {
        "version": __version__,
        "modalities": {m: {"n": int(mats[m].shape[0]), "dim": int(mats[m].shape[1])}
                       for m in names},
        "pairs": {}, "joint": {}, "figures": {},
        "options": asdict(opts),
    }

    stats: dict[str, Moments] = {}

    def per_modality(m: str) -> None:
        x = mats[m]
        stats[m] = moments(x, name=f"embeddings[{m!r}]")  # one streamed pass
        record["modalities"][m].update({
            "cone": cone_from_sum(stats[m].total, stats[m].n),
            "uniformity": uniformity(x, max_rows=opts.uniformity_rows, seed=opts.seed),
            "uniformity_rows": min(x.shape[0], opts.uniformity_rows),
            "spectrum": spectrum_from_moments(stats[m]).to_dict(),
        })

    for m in names:
        steps.append((f"{m}: cone, uniformity, spectrum", functools.partial(per_modality, m)))

    def per_pair(a: str, b: str) -> None:
        xa, xb = mats[a], mats[b]
        gap = gap_from_centroids(stats[a].mean.numpy(), stats[b].mean.numpy())
        out: dict[str, Any] = {"gap": gap.to_dict()}
        out["separability"] = linear_separability(xa, xb, max_rows=opts.separability_rows,
                                                  seed=opts.seed)
        if gid is not None:
            ia, ib = pair_rows_by_group(gid[a], gid[b])
            if len(ia) < opts.k + 2:
                raise ValueError(f"groups: modalities {a!r} and {b!r} share {len(ia)} groups; "
                                 f"paired metrics need at least k + 2 = {opts.k + 2}")
            pa, pb = _rows(xa, ia), _rows(xb, ib)
        else:
            pa, pb = xa, xb
        n_pairs = pa.shape[0]
        out["n_pairs"] = int(n_pairs)
        sums = paired_sums(pa, pb)  # one streamed pass over the pairs
        # for unit rows, ||x - y||^2 = 2 - 2 x.y, so alignment (alpha = 2) is exact from the sums
        out["alignment"] = 2.0 - 2.0 * sums.mean_positive
        out["cross_uniformity"] = cross_uniformity(pa, pb, max_rows=opts.uniformity_rows,
                                                   seed=opts.seed)
        out["hubness"] = {
            f"{a}->{b}": hubness(xa, xb, k=opts.k, max_rows=opts.knn_rows, seed=opts.seed),
            f"{b}->{a}": hubness(xb, xa, k=opts.k, max_rows=opts.knn_rows, seed=opts.seed),
        }
        out["agreement"] = neighbour_agreement(pa, pb, k=opts.k, max_rows=opts.knn_rows,
                                               seed=opts.seed)
        out["temperature"] = temperature_health(
            pa, pb, logit_scale=logit_scale, history=logit_scale_history,
            max_scale=opts.max_scale, max_rows=opts.knn_rows, seed=opts.seed, sums=sums)
        if opts.compute_mir:
            ref_first = b == "text" or a != "text"
            vis, txt = (xa, xb) if ref_first else (xb, xa)
            out["mir"] = {"reference": b if ref_first else a,
                          **modality_integration_rate([vis], [txt], max_rows=opts.mir_rows,
                                                      seed=opts.seed).to_dict()}
        record["pairs"][pair_key(a, b)] = out
        figures = _pair_figures(pa, pb, opts, a, b)
        if gid is not None:  # intra-modal positives: same-group rows within one modality
            for m in (a, b):
                hist = _intra_positive_histogram(mats[m], gid[m], m, opts)
                if hist is not None:
                    figures["histograms"]["series"][f"{m}-{m} positive"] = hist
        record["figures"][pair_key(a, b)] = figures

    for a, b in pairs:
        steps.append((f"{a}|{b}: gap, separability, neighbours, margins",
                      functools.partial(per_pair, a, b)))

    def joint() -> None:
        pooled = stats[names[0]]
        for m in names[1:]:
            pooled = pooled + stats[m]
        record["joint"]["spectrum"] = spectrum_from_moments(pooled).to_dict()

    steps.append(("joint spectrum", joint))
    bar = tqdm(steps, desc="diagnose", unit="step", disable=(not progress) or None)
    for label, fn in bar:
        bar.set_postfix_str(label)
        fn()
    record["sampling"] = {
        "seed": opts.seed,
        "uniformity": f"U-statistic over all distinct pairs up to {opts.uniformity_rows} rows, "
                      "else over a seeded sample of that many rows",
        "separability": f"{opts.separability_rows} rows per modality at most; seeded 80/20 split",
        "hubness_agreement_margins": f"exact k-NN; seeded sample of {opts.knn_rows} rows above it",
        "mir": f"seeded sample of {opts.mir_rows} rows per modality above it",
        "exact_streamed": ["gap", "alignment", "cone", "spectrum", "mean_positive",
                           "mean_negative"],
    }
    return _finite_or_none(record)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj
