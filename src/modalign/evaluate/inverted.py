"""Find the inverted array an evaluation means: ``image=oti`` -> ``text.oti.3f2a...``.

``modalign invert`` writes arrays named ``<tower modality>.<method>.<hash>`` into the embedding
store, each with its settings and context (direction, split, views, model weights). An evaluation
names the inverted queries by what they are: ``image=oti`` is "the image queries, replaced by
their OTI inversion", for this model, this split and this store. When several arrays match (other
steps, template, limit), the choice is refused with the list, unless ``image=oti:latest`` asks
for the newest; an exact array name is taken as is. :func:`align_inverted` then puts the found
arrays in place of the query sets, row by row, matched by item id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modalign.errors import ModalignError
from modalign.spec import split_key_value

if TYPE_CHECKING:  # the store (and torch) load only when an array is resolved
    from modalign.embed.store import EmbeddingStore


@dataclass(frozen=True)
class InvertedSpec:
    """One parsed ``--inverted QUERY=WHAT``.

    Attributes:
        query: the query set replaced: ``"image"`` or ``"image:VIEW"``.
        what: a method (``"oti"``, ``"ovi"``), or an exact array name.
        latest: take the newest of several matching arrays.
    """

    query: str
    what: str
    latest: bool = False

    @property
    def modality(self) -> str:
        return self.query.partition(":")[0]

    @property
    def view(self) -> str | None:
        return self.query.partition(":")[2] or None


def parse_inverted(spec: str) -> InvertedSpec:
    """Parse ``QUERY=METHOD[:latest]`` or ``QUERY=ARRAY``.

    Examples:
        >>> parse_inverted("image=oti:latest")
        InvertedSpec(query='image', what='oti', latest=True)
    """
    expected = ("QUERY=METHOD (e.g. image=oti, text=ovi, image=oti:latest) or QUERY=ARRAY (an "
                "array name)")
    key, what = split_key_value(spec, "--inverted", expected)
    if not what or key.startswith(":"):
        raise ModalignError(f"--inverted {spec!r}: expected {expected}")
    latest = what.endswith(":latest")
    return InvertedSpec(key, what[: -len(":latest")] if latest else what, latest)


def resolve_inverted(spec: InvertedSpec, store: EmbeddingStore, *, split: str,
                     model_weights: str | None = None) -> str:
    """The array of ``store`` that ``spec`` means (see the module docstring).

    Args:
        spec: the parsed ``--inverted`` value.
        store: the embedding store the inversion wrote into.
        split: the evaluated split; an array of another split does not match.
        model_weights: the model's weights hash (``modalign.io.file_hash``); arrays inverted
            through other weights do not match.
    """
    arrays = store.manifest["arrays"]
    if spec.what in arrays:  # an exact name: any array of query features, as the user says
        return spec.what
    if "." in spec.what:
        raise ModalignError(f"--inverted {spec.query}={spec.what}: no such array in {store.path}")
    candidates = {n: a["inversion"] for n, a in arrays.items()
                  if a.get("inversion", {}).get("method") == spec.what}
    matching = {n: inv for n, inv in candidates.items() if _matches(inv, spec, split,
                                                                     model_weights)}
    how = (f"modalign invert --model DIR --data DATA --direction {spec.modality}-to-"
           f"{'text' if spec.modality != 'text' else 'image'} --split {split}")
    if not matching:
        seen = f" ({len(candidates)} {spec.what} arrays of other settings)" if candidates else ""
        raise ModalignError(f"--inverted {spec.query}={spec.what}: no {spec.what} inversion of "
                            f"the {spec.query} items of split {split!r} for this model in "
                            f"{store.path}{seen}; run '{how}' first")
    if len(matching) > 1 and not spec.latest:
        lines = "; ".join(f"{n} ({arrays[n]['count']} rows, {describe(inv)})"
                          for n, inv in sorted(matching.items()))
        raise ModalignError(f"--inverted {spec.query}={spec.what}: {len(matching)} arrays match: "
                            f"{lines}. Name one, or pass {spec.query}={spec.what}:latest")
    return max(matching, key=lambda n: (store.path / arrays[n]["file"]).stat().st_mtime_ns)


def resolve_inverted_queries(specs: Sequence[str], store: EmbeddingStore, *, split: str,
                             model_weights: str | None = None
                             ) -> dict[str, tuple[EmbeddingStore, str]]:
    """``["image=oti", ...]`` -> query key -> ``(store, array name)`` (:func:`resolve_inverted`
    for each; see there for ``model_weights``)."""
    out = {}
    for raw in specs:
        spec = parse_inverted(raw)
        out[spec.query] = (store, resolve_inverted(spec, store, split=split,
                                                   model_weights=model_weights))
    return out


def align_inverted(test: Mapping[str, Any], inverted: Mapping[str, tuple[Any, str]], *,
                   split: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Replace query sets by inverted arrays, matched by item id.

    Args:
        test: modality -> :class:`~modalign.embed.store.Embeddings` of the evaluated ``split``.
        inverted: query key (``"image"`` or ``"image:VIEW"``) -> ``(store, array name)``, as
            :func:`resolve_inverted_queries` returns it.
        split: the evaluated split (``"all"``: every row of the array).

    Returns:
        ``(test, overrides, inversion)``: ``test`` with a modality restricted to the inverted
        items where the array covers only some queries (``modalign invert --limit``; the record
        says how many), query key -> ``(n, d)`` float32 tensor in the order of the query rows,
        and the description stored in the record (``None`` without inverted queries).

    Examples:
        >>> import tempfile
        >>> from modalign.embed.store import EmbeddingStore
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> test = toy_embeddings()
        >>> store = EmbeddingStore(tempfile.mkdtemp())
        >>> rows = test["image"].items[::-1][:5]        # 5 queries, in another order
        >>> _ = store.add_array("inv", test["text"].vectors[:5], rows)
        >>> test2, over, info = align_inverted(test, {"image": (store, "inv")}, split="test")
        >>> len(test2["image"]), over["image"].shape, info["queries"]["image"]["of"]
        (5, torch.Size([5, 8]), 24)
    """
    if not inverted:
        return dict(test), {}, None
    import numpy as np
    import torch

    test = dict(test)
    overrides: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    for key, (store, name) in inverted.items():
        modality, _, view = key.partition(":")
        features = store.load(name, split=None if split == "all" else split)
        row = {it["id"]: i for i, it in enumerate(features.items)}
        if modality not in test:
            raise ModalignError(f"--inverted {key}={name}: no {modality!r} embeddings to "
                                f"replace ({sorted(test)})")
        rows = test[modality]
        queries = rows.filter(view=view) if view else rows
        covered = [it["id"] in row for it in queries.items]
        if not any(covered):
            raise ModalignError(f"--inverted {key}={name}: the array has none of the "
                                f"{len(queries)} {key} query ids of split {split!r}")
        total = len(queries)
        if not all(covered):  # evaluate on the inverted subset of this modality
            keep = [it["id"] in row or (view and it.get("view") != view) for it in rows.items]
            test[modality] = rows.subset(np.array(keep, dtype=bool))
            rows = test[modality]
            queries = rows.filter(view=view) if view else rows
        order = np.array([row[it["id"]] for it in queries.items], dtype=np.int64)
        overrides[key] = torch.from_numpy(np.asarray(features.vectors[order], dtype=np.float32))
        arrays[key] = {"array": name, "num_queries": len(queries), "of": total,
                       **{k: v for k, v in store.info(name).items()
                          if k not in ("file", "count", "dtype")}}
    return test, overrides, {"name": "inverted-queries", "queries": arrays}


def describe(inversion: Mapping[str, Any]) -> str:
    """A short description of an inversion's settings, for choosing between arrays."""
    settings = inversion.get("settings", {})
    forward = inversion.get("forward", {})
    parts = [f"steps={settings.get('steps')}"]
    if forward.get("template"):
        parts.append(f"template={forward['template']!r}")
    if inversion.get("views"):
        parts.append(f"views={inversion['views']}")
    return ", ".join(parts)


def _matches(inv: Mapping[str, Any], spec: InvertedSpec, split: str,
             model_weights: str | None) -> bool:
    src = str(inv.get("direction", "")).partition("-to-")[0]
    if src != spec.modality or str(inv.get("split")) not in (split, "all"):
        return False
    if model_weights is not None and inv.get("model_weights") not in (None, model_weights):
        return False
    views = inv.get("views")
    if spec.view is not None and views:
        return spec.view in [v.strip() for v in str(views).split(",")]
    return True
