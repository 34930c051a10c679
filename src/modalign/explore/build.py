"""Everything the explore page shows, computed once in Python: a JSON-ready dict.

Given joint-space embeddings per modality (row metadata included), :func:`build_explore` returns

* ``points``: one entry per shown row, modalities concatenated in order (id, group, modality,
  hover text or image thumbnail) and its 2-d position (:mod:`modalign.explore.projection`);
* ``states``: the native space, the space after a post-hoc bridge (fitted on the bank, see
  :mod:`modalign.bridge.posthoc`) and the space with modality ``b`` moved along the gap vector by
  each amount of the slider (:func:`modalign.geometry.gapshift.shift_along_gap`); for each
  state, the exact top-k of every point in every modality
  (:class:`modalign.evaluate.search.ExactIndex`, cosine, the point itself excluded; cosines in
  thousandths for the native and bridged states)
  and the diagnosis numbers (gap, separability, uniformity, cone; :mod:`modalign.geometry`);
* ``twins``: inverted features (OTI/OVI arrays of the embedding store), each linked to the point
  it was inverted from, with its 2-d position and its top-k in the native space;
* ``sampling``: when there are more than ``max_points`` rows, whole groups are sampled (seeded)
  so positive pairs stay joinable, and the page says so.

Examples:
    >>> from modalign.evaluate.retrieval import toy_embeddings
    >>> data = build_explore(toy_embeddings(), options=ExploreOptions(k=3, bridge=None))
    >>> len(data["points"]["id"]), sorted(data["states"])[:2]
    (48, ['native', 'shift:-0.25'])
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign import __version__
from modalign.embed.store import Embeddings
from modalign.errors import ModalignError
from modalign.evaluate.search import ExactIndex
from modalign.explore.projection import make_projection
from modalign.geometry.cone import mean_pairwise_cosine
from modalign.geometry.gap import modality_gap
from modalign.geometry.gapshift import DEFAULT_SHIFTS, shift_along_gap
from modalign.geometry.separability import linear_separability
from modalign.geometry.uniformity import uniformity

__all__ = ["ExploreOptions", "ExploreSpace", "build_explore", "sample_groups", "top_k_per_modality"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass(frozen=True)
class ExploreOptions:
    """What the page shows and how much of it.

    Attributes:
        k: neighbours listed per modality.
        max_points: rows shown at most; above it whole groups are sampled (seeded).
        bridge: a post-hoc bridge spec (``"centering"``, ``"meanshift"``, ``"invgc"``, ...; see
            :func:`modalign.bridge.posthoc.build_bridge`) or ``None`` for none.
        pair: ``(a, b)``: the gap vector is ``mean(a) - mean(b)`` and the slider moves ``b``;
            default: the first two modalities.
        amounts: slider positions, multiples of the gap vector (0 is added if missing).
        projection: ``"pca"`` or ``"umap"``.
        seed: seeds the sample, the projection and the separability split.
        thumb_size: pixel size of image thumbnails.
        uniformity_rows: uniformity is a U-statistic over all pairs up to this many rows per
            modality, else over a seeded sample of this many rows.
        title: the page title.
    """

    k: int = 5
    max_points: int = 5000
    bridge: str | None = "centering"
    pair: tuple[str, str] | None = None
    amounts: tuple[float, ...] = DEFAULT_SHIFTS
    projection: str = "pca"
    seed: int = 0
    thumb_size: int = 32
    uniformity_rows: int = 2048
    title: str = "modalign explore"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ModalignError(f"--k: expected a positive integer, got {self.k!r}")
        if not isinstance(self.max_points, int) or self.max_points < 4:
            raise ModalignError(f"--max-points: expected an integer >= 4, got "
                                f"{self.max_points!r}")
        if not self.amounts or not all(math.isfinite(float(a)) for a in self.amounts):
            raise ModalignError(f"--shifts: expected finite numbers, got {self.amounts!r}")
        if self.uniformity_rows < 2:
            raise ModalignError(f"uniformity_rows: expected >= 2, got {self.uniformity_rows}")
        if self.thumb_size < 8:
            raise ModalignError(f"thumb_size: expected >= 8 pixels, got {self.thumb_size}")


def sample_groups(groups: Mapping[str, Sequence[str]], max_rows: int, seed: int
                  ) -> tuple[dict[str, np.ndarray], int]:
    """Rows to show per modality: all, or whole groups in seeded order until ``max_rows``.

    Returns ``(rows per modality, number of groups kept)``. A group is kept only if all its rows
    fit, so the positives of every shown row are shown too.

    Examples:
        >>> rows, n = sample_groups({"a": ["x", "y", "z"], "b": ["x", "y", "z"]}, 4, 0)
        >>> n, [len(v) for v in rows.values()]
        (2, [2, 2])
    """
    total = sum(len(g) for g in groups.values())
    all_groups = sorted({g for gs in groups.values() for g in gs})
    if total <= max_rows:
        return {m: np.arange(len(g)) for m, g in groups.items()}, len(all_groups)
    size: dict[str, int] = {}
    for gs in groups.values():
        for g in gs:
            size[g] = size.get(g, 0) + 1
    order = np.random.default_rng(seed).permutation(len(all_groups))
    keep: set[str] = set()
    used = 0
    for i in order.tolist():
        g = all_groups[i]
        if used + size[g] <= max_rows:
            keep.add(g)
            used += size[g]
    return ({m: np.array([i for i, g in enumerate(gs) if g in keep], dtype=np.int64)
             for m, gs in groups.items()}, len(keep))


@dataclass
class ExploreSpace:
    """The shown rows (unit vectors, metadata) and the fitted 2-d projection.

    Built by :meth:`from_embeddings`; :meth:`query` places any joint-space vector on the map and
    lists its top-k per modality (what the served query box does).
    """

    names: list[str]
    vectors: dict[str, Tensor]
    items: dict[str, list[dict[str, Any]]]
    offsets: list[int]
    projection: Any
    xy: np.ndarray
    pair: tuple[str, str]
    k: int
    total_rows: int
    groups_shown: int

    @classmethod
    def from_embeddings(cls, shown: Mapping[str, Embeddings], opts: ExploreOptions
                        ) -> ExploreSpace:
        """Validate, sample (whole groups), normalise and project ``shown``."""
        names = list(shown)
        if len(names) < 2:
            raise ModalignError(f"explore: needs at least two modalities, got {names}")
        dims = {m: shown[m].dim for m in names}
        if len(set(dims.values())) != 1:
            raise ModalignError(f"explore: the modalities have different dimensions {dims}; "
                                "pass joint-space vectors (or --model to project tower features)")
        a, b = opts.pair or (names[0], names[1])
        for m in (a, b):
            if m not in shown:
                raise ModalignError(f"--pair: modality {m!r} is not among {names}")
        if a == b:
            raise ModalignError(f"--pair: expected two different modalities, got {a!r} twice")
        groups = {m: [str(it["group"]) for it in shown[m].items] for m in names}
        rows, n_groups = sample_groups(groups, opts.max_points, opts.seed)
        for m in names:
            if len(rows[m]) < 2:
                raise ModalignError(f"explore: modality {m!r} has {len(rows[m])} rows to show; "
                                    "need at least 2 (a larger --max-points or another --split)")
        vecs = {m: _unit(shown[m].vectors, rows[m], m) for m in names}
        items = {m: [shown[m].items[i] for i in rows[m].tolist()] for m in names}
        offsets = np.cumsum([0] + [len(vecs[m]) for m in names]).tolist()
        proj = make_projection(opts.projection, seed=opts.seed)
        native_all = torch.cat([vecs[m] for m in names]).double().numpy()
        xy = proj.fit(native_all).transform(native_all)
        return cls(names, vecs, items, offsets, proj, xy, (a, b), opts.k,
                   sum(len(shown[m]) for m in names), n_groups)

    def query(self, vector: Tensor | np.ndarray) -> dict[str, Any]:
        """Map position and top-k per modality (native space) of one joint-space vector."""
        v = torch.as_tensor(np.asarray(vector, dtype=np.float32)).reshape(1, -1)
        dim = self.vectors[self.names[0]].shape[1]
        if v.shape[1] != dim:
            raise ModalignError(f"query: expected a {dim}-d joint-space vector, got {v.shape[1]}")
        v = F.normalize(v, dim=1)
        nn: dict[str, list[int]] = {}
        score: dict[str, list[int]] = {}
        for i, m in enumerate(self.names):
            index = ExactIndex()
            index.add(self.vectors[m])
            res = index.search(v, self.k)
            idx = res.indices.numpy()[0]
            nn[m] = [int(j) + self.offsets[i] if j >= 0 else -1 for j in idx]
            score[m] = _permille(res.scores.numpy()[0]).tolist()
        xy = self.projection.transform(v.double().numpy())[0]
        return {"xy": [round(float(xy[0]), 4), round(float(xy[1]), 4)], "nn": nn,
                "score": score}


def top_k_per_modality(vectors: Mapping[str, Tensor], k: int
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact cosine top-k of every row (all modalities, in order) within each modality.

    ``vectors`` are unit rows. Returns modality -> ``(indices, scores)`` of shape
    ``(n_total, k)``; indices are global (modalities concatenated in the mapping's order), a row
    is never its own neighbour, and ``-1`` pads lists of modalities with fewer than k other rows.
    """
    names = list(vectors)
    offsets = np.cumsum([0] + [len(vectors[m]) for m in names])
    queries = torch.cat([vectors[m] for m in names])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, m in enumerate(names):
        index = ExactIndex()
        index.add(vectors[m])
        exclude = torch.full((len(queries),), -1, dtype=torch.int64)
        exclude[offsets[i]:offsets[i + 1]] = torch.arange(len(vectors[m]))
        res = index.search(queries, k, exclude=exclude)
        idx = res.indices.numpy()
        out[m] = (np.where(idx >= 0, idx + offsets[i], -1), res.scores.numpy())
    return out


def build_explore(
    shown: Mapping[str, Embeddings],
    *,
    bank: Mapping[str, Embeddings] | None = None,
    inverted: Mapping[str, Embeddings] | None = None,
    values: Mapping[str, str] | None = None,
    options: ExploreOptions | None = None,
    source: Mapping[str, Any] | None = None,
    space: ExploreSpace | None = None,
) -> dict[str, Any]:
    """The page data (see the module docstring); JSON-ready.

    Args:
        shown: modality -> joint-space embeddings to draw (at least two modalities, one
            dimension).
        bank: modality -> embeddings the bridge and the gap vector are fitted on (the training
            split); ``None`` fits them on ``shown`` and the page says so.
        inverted: array name (``"text.oti.<key>"``) -> inverted features whose rows carry the
            ``id`` of the item they were inverted from.
        values: item id -> its text, or the path of its image (drawn as a thumbnail).
        options: see :class:`ExploreOptions`.
        source: model/data description shown in the page header.
        space: a space already built from ``shown`` with the same options (reused as is).
    """
    opts = options or ExploreOptions()
    space = space or ExploreSpace.from_embeddings(shown, opts)
    names, vecs, items, offsets, xy, proj = (space.names, space.vectors, space.items,
                                             space.offsets, space.xy, space.projection)
    a, b = space.pair
    total, n_groups = space.total_rows, space.groups_shown

    bank_vecs = ({m: _unit(bank[m].vectors, None, f"bank[{m!r}]") for m in names if m in bank}
                 if bank is not None else {})
    fitted_on = "bank" if all(m in bank_vecs and len(bank_vecs[m]) >= 2 for m in names) \
        else "shown"
    if fitted_on == "shown":
        bank_vecs = dict(vecs)

    states: dict[str, dict[str, Any]] = {}
    cache: dict[int, Any] = {}
    states["native"] = _state("native", vecs, names, a, b, opts, cache)
    bridge_info = None
    if opts.bridge:
        from modalign.bridge.posthoc import build_chain

        chain = build_chain([s for s in opts.bridge.split("+") if s.strip()],
                            gallery=a, query=b)
        chain.fit(bank_vecs)
        moved = chain.transform(vecs)
        bridged = {m: F.normalize(moved[m].float(), dim=1) for m in names}
        states["bridge"] = _state(f"after {opts.bridge}", bridged, names, a, b, opts, cache)
        bridge_info = {"spec": opts.bridge, "identity": chain.identity()}

    g = bank_vecs[a].double().mean(0) - bank_vecs[b].double().mean(0)
    amounts = sorted({float(x) for x in opts.amounts} | {0.0})
    shift_xy: dict[str, list[list[float]]] = {}
    for amount in amounts:
        key = _shift_key(amount)
        if amount == 0.0:
            states[key] = {"alias": "native"}
            shift_xy[key] = _round_xy(xy[offsets[names.index(b)]:offsets[names.index(b) + 1]])
            continue
        moved = dict(vecs)
        moved[b] = shift_along_gap(vecs[b].double(), g, amount).float()
        states[key] = _state(f"{b} moved by {amount:g} x gap", moved, names, a, b, opts,
                             cache, scores=False)
        shift_xy[key] = _round_xy(proj.transform(moved[b].double().numpy()))

    index_of = {str(it["id"]): offsets[i] + j for i, m in enumerate(names)
                for j, it in enumerate(items[m])}
    twins = [_twins(name, emb, index_of, vecs, proj, opts.k)
             for name, emb in sorted((inverted or {}).items())]
    twins = [t for t in twins if t is not None]

    values = values or {}
    point_ids = [str(it["id"]) for m in names for it in items[m]]
    texts, thumbs = [], []
    for pid in point_ids:
        text, thumb = _describe(values.get(pid), opts.thumb_size)
        texts.append(text)
        thumbs.append(thumb)

    return {
        "version": __version__,
        "title": opts.title,
        "source": dict(source or {}),
        "options": {**asdict(opts), "pair": [a, b], "amounts": amounts},
        "modalities": names,
        "colors": {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)},
        "offsets": offsets,
        "pair": [a, b],
        "projection": {"name": proj.name, "explained": [round(v, 4) for v in
                                                          getattr(proj, "explained", [])]},
        "points": {
            "id": point_ids,
            "group": [str(it["group"]) for m in names for it in items[m]],
            "modality": [i for i, m in enumerate(names) for _ in items[m]],
            "view": [str(it.get("view", "")) for m in names for it in items[m]],
            "text": texts,
            "thumb": thumbs,
            "xy": _round_xy(xy),
        },
        "pairs": _pair_lines(names, items, offsets),
        "states": states,
        "shift": {"moved": b, "towards": a, "amounts": amounts,
                  "keys": [_shift_key(x) for x in amounts], "xy": shift_xy,
                  "gap_vector_norm": round(float(g.norm()), 6), "fitted_on": fitted_on},
        "bridge": bridge_info,
        "twins": twins,
        "sampling": {"total_rows": total, "shown_rows": offsets[-1], "groups_shown": n_groups,
                     "sampled": offsets[-1] < total, "max_points": opts.max_points,
                     "seed": opts.seed},
    }


# ------------------------------------------------------------------------------------------
# helpers


def _unit(x: np.ndarray, idx: np.ndarray | None, name: str) -> Tensor:
    arr = np.asarray(x if idx is None else x[idx], dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if not bool(torch.isfinite(t).all()):
        raise ModalignError(f"{name}: embeddings contain NaN or inf")
    return F.normalize(t, dim=1)


def _shift_key(amount: float) -> str:
    return f"shift:{amount:g}"


def _round_xy(xy: np.ndarray) -> list[list[float]]:
    return [np.round(xy[:, 0], 4).tolist(), np.round(xy[:, 1], 4).tolist()]


def _permille(scores: np.ndarray) -> np.ndarray:
    """Cosines as integers in thousandths (padding -inf becomes 0): compact in the page."""
    return np.rint(1000 * np.nan_to_num(scores, neginf=0.0, posinf=0.0)).astype(int)


def _state(label: str, vecs: Mapping[str, Tensor], names: Sequence[str], a: str, b: str,
           opts: ExploreOptions, cache: dict[int, Any], scores: bool = True) -> dict[str, Any]:
    nn = top_k_per_modality({m: vecs[m] for m in names}, opts.k)
    return {
        "label": label,
        "nn": {m: nn[m][0].astype(int).ravel().tolist() for m in names},
        "score": ({m: _permille(nn[m][1]).ravel().tolist() for m in names}
                  if scores else None),
        "diagnosis": _finite_or_none(_diagnosis(vecs, names, a, b, opts, cache)),
    }


def _diagnosis(vecs: Mapping[str, Tensor], names: Sequence[str], a: str, b: str,
               opts: ExploreOptions, cache: dict[int, Any]) -> dict[str, Any]:
    """Gap and separability of ``(a, b)``; uniformity and cone of each modality.

    Per-modality numbers of a tensor already measured (a modality the slider does not move)
    come from ``cache`` (which keeps the tensor alive, so its ``id`` stays unique).
    """
    seed = opts.seed
    xa, xb = vecs[a].double().numpy(), vecs[b].double().numpy()
    gap = modality_gap(xa, xb)
    out: dict[str, Any] = {
        "pair": f"{a}|{b}",
        "gap": round(gap.centroid_distance, 5),
        "gap_renormalized": round(gap.renormalized_distance, 5),
    }
    if min(len(xa), len(xb)) >= 5:
        out["separability"] = round(float(linear_separability(xa, xb, seed=seed)["accuracy"]), 5)
    else:
        out["separability"] = None
    out["uniformity"], out["cone"] = {}, {}
    for m in names:
        if id(vecs[m]) not in cache:
            x = vecs[m].double().numpy()
            cache[id(vecs[m])] = (vecs[m], round(uniformity(x, max_rows=opts.uniformity_rows,
                                                            seed=seed), 5),
                                  round(mean_pairwise_cosine(x), 5))
        _, out["uniformity"][m], out["cone"][m] = cache[id(vecs[m])]
    return out


def _finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    return obj


def _twins(name: str, emb: Embeddings, index_of: Mapping[str, int],
           vecs: Mapping[str, Tensor], proj: Any, k: int) -> dict[str, Any] | None:
    rows = [(i, index_of[str(it["id"])]) for i, it in enumerate(emb.items)
            if str(it["id"]) in index_of]
    if not rows:
        return None
    src = np.array([r[0] for r in rows], dtype=np.int64)
    tv = _unit(emb.vectors, src, f"inverted[{name!r}]")
    dims = {m: v.shape[1] for m, v in vecs.items()}
    if tv.shape[1] != next(iter(dims.values())):
        raise ModalignError(f"inverted array {name!r} has dimension {tv.shape[1]}; the joint "
                            f"space has {next(iter(dims.values()))}")
    parts = name.split(".")
    scores: dict[str, list[int]] = {}
    nn: dict[str, list[int]] = {}
    offsets = np.cumsum([0] + [len(v) for v in vecs.values()])
    for i, (m, v) in enumerate(vecs.items()):
        index = ExactIndex()
        index.add(v)
        res = index.search(tv, k)
        idx = res.indices.numpy()
        nn[m] = np.where(idx >= 0, idx + offsets[i], -1).astype(int).ravel().tolist()
        scores[m] = _permille(res.scores.numpy()).ravel().tolist()
    cosine = [float(emb.items[i].get("final_cosine", float("nan"))) for i in src.tolist()]
    return {
        "name": name,
        "method": parts[1].upper() if len(parts) > 1 else name,
        "modality": parts[0],
        "of": [r[1] for r in rows],
        "xy": _round_xy(proj.transform(tv.double().numpy())),
        "nn": nn,
        "score": scores,
        "final_cosine": [round(c, 4) if math.isfinite(c) else None for c in cosine],
    }


def _pair_lines(names: Sequence[str], items: Mapping[str, list[dict[str, Any]]],
                offsets: Sequence[int]) -> list[list[int]]:
    """One line per group and modality pair: the first row of the group on each side."""
    first: dict[str, dict[str, int]] = {}
    for i, m in enumerate(names):
        seen: dict[str, int] = {}
        for j, it in enumerate(items[m]):
            seen.setdefault(str(it["group"]), offsets[i] + j)
        first[m] = seen
    lines = []
    for m1, m2 in combinations(names, 2):
        for g, i in first[m1].items():
            if g in first[m2]:
                lines.append([i, first[m2][g]])
    return lines


def _describe(value: str | None, size: int) -> tuple[str, str]:
    """Hover text and thumbnail data URL (``""`` if none) of an item value.

    An image file gives its name and a thumbnail, another file (audio) its name, anything else
    is text (cut at 200 characters).
    """
    if value is None:
        return "", ""
    try:
        p = Path(value) if len(value) < 4096 and "\n" not in value else None
        if p is not None and p.is_file():
            if p.suffix.lower() in IMAGE_SUFFIXES:
                return p.name, thumbnail_data_url(p, size)
            return p.name, ""
    except OSError:  # an unreadable file or an unidentifiable image: show the text
        pass
    text = value if len(value) <= 200 else value[:199] + "…"
    return text, ""


def thumbnail_data_url(path: str | Path, size: int = 32) -> str:
    """A ``size`` x ``size`` PNG thumbnail of an image file, as a ``data:`` URL."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
