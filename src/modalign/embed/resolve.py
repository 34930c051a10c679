"""Find the embedding store a run reads: a store folder, or a dataset's default store, encoded.

A dataset's default store is keyed by the data and the tower specs
(:func:`~modalign.embed.paths.default_store_dir`); :func:`dataset_store` brings it up to date
(missing or stale arrays are encoded, the rest reused) through :func:`update_store`, which builds
a tower only when its array must be encoded (:func:`current_arrays` judges from remembered tower
identities). :data:`DEFAULT_TOWERS` names the tower of each built-in modality when the caller
names none.

Examples:
    >>> import tempfile
    >>> try:
    ...     open_store(tempfile.mkdtemp())
    ... except FileNotFoundError as err:
    ...     print(str(err).split("(")[1].split(")")[0])
    no manifest.json
    >>> DEFAULT_TOWERS["text"]
    'minilm'
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modalign.embed.store import EmbeddingStore
from modalign.errors import ModalignError

if TYPE_CHECKING:
    from modalign.data.dataset import PairedDataset

DEFAULT_TOWERS: dict[str, str] = {"image": "effnet-lite0", "text": "minilm", "audio": "logmel"}
"""The tower spec of each built-in modality (what ``modalign embed`` uses by default)."""

TowerLoader = Callable[[str, str], Any]
"""``(spec, modality) -> tower``; the default is :func:`modalign.encoders.load_encoder`."""


def open_store(path: str | Path, *, option: str = "embeddings") -> EmbeddingStore:
    """The store at ``path``; ``FileNotFoundError`` naming ``option`` when it is not a store."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{option}={str(path)!r} is not an embedding store "
                                "(no manifest.json); build one with 'modalign embed'")
    return EmbeddingStore(path)


def recorded_towers(store: EmbeddingStore, modalities: Sequence[str]) -> dict[str, str]:
    """The encoder name the store recorded for each of ``modalities`` (those that record one).

    Examples:
        >>> import tempfile, numpy as np
        >>> store = EmbeddingStore(tempfile.mkdtemp())
        >>> rows = [{"id": "a", "modality": "text", "group": "g", "split": "train"}]
        >>> store.add_array("text", np.ones((1, 2), np.float32), rows,
        ...                 {"encoder": {"name": "minilm"}})
        >>> recorded_towers(store, ["text", "image"])
        {'text': 'minilm'}
    """
    specs: dict[str, str] = {}
    for m in modalities:
        try:
            enc = store.info(m).get("encoder") or {}
        except ValueError:
            enc = {}
        name = enc.get("name") if isinstance(enc, Mapping) else None
        if name:
            specs[m] = str(name)
    return specs


def load_tower(spec: str, modality: str) -> Any:
    """The tower ``spec`` names, for ``modality`` (:func:`modalign.encoders.load_encoder`), its
    identity remembered (:func:`~modalign.encoders.identity.remember_identity`) so that a later
    run finds its cached arrays without building it."""
    from modalign.encoders import load_encoder
    from modalign.encoders.identity import remember_identity

    tower = load_encoder(spec, modality=modality)
    remember_identity(spec, modality, tower)
    return tower


def current_arrays(dataset: PairedDataset, specs: Mapping[str, str], store: EmbeddingStore,
                   *, normalize: bool = False) -> list[str]:
    """The modalities of ``specs`` whose array in ``store`` is whole and current for the tower
    each spec builds, judged without building a tower: from the tower's remembered identity
    (:func:`~modalign.encoders.identity.remembered_identity`). A tower not remembered, or whose
    files or code changed since, counts as not current. ``normalize``: the arrays asked for are
    L2-normalised (``modalign embed --normalize``), which have keys of their own.

    Examples:
        >>> import tempfile
        >>> from modalign.data.dataset import Item, PairedDataset
        >>> ds = PairedDataset("toy", [Item("a", "text", "v", "hi", "g", "test")])
        >>> current_arrays(ds, {"text": "minilm"}, EmbeddingStore(tempfile.mkdtemp()))
        []
    """
    from modalign.embed.encode import array_key
    from modalign.encoders.identity import remembered_identity

    arrays = store.manifest["arrays"] if (store.path / "manifest.json").is_file() else {}
    current = []
    for m, spec in specs.items():
        if m not in arrays:
            continue
        identity = remembered_identity(spec, m)
        if identity is not None and store.is_current(m, array_key(
                dataset, dataset.select(modality=m), identity, normalized=normalize)):
            current.append(m)
    return current


def update_store(dataset: PairedDataset, specs: Mapping[str, str], path: str | Path, *,
                 load: TowerLoader | None = None, progress: bool = False) -> EmbeddingStore:
    """The store at ``path`` with an up-to-date array of ``dataset`` for each modality of
    ``specs`` (modality -> tower spec): towers are built only for arrays that are missing or
    stale (:func:`current_arrays`), which are then encoded
    (:func:`~modalign.embed.encode.embed_dataset`).

    ``load`` builds a tower from ``(spec, modality)`` (default :func:`load_tower`); a loader of
    one's own builds every tower, since identities are remembered for the default loader only.
    """
    from modalign.embed.encode import embed_dataset

    store = EmbeddingStore(path)
    fresh = current_arrays(dataset, specs, store) if load is None else []
    stale = {m: s for m, s in specs.items() if m not in fresh}
    if stale:
        # embed_dataset re-encodes an array whose inputs or tower changed and reuses the rest
        build = load or load_tower
        embed_dataset(dataset, {m: build(s, m) for m, s in stale.items()}, store.path,
                      progress=progress)
    return store


def dataset_store(dataset: str, modalities: Sequence[str], towers: Mapping[str, str] | None = None,
                  *, encode: bool = True, load: TowerLoader | None = None,
                  option: str = "dataset") -> EmbeddingStore:
    """The default store of ``dataset`` for ``modalities``, brought up to date when ``encode``.

    Args:
        dataset: a dataset spec (``emoji``, a manifest, a folder; see :func:`~modalign.data.
            load_dataset`).
        modalities: the modalities the caller reads.
        towers: tower spec per modality; a modality without one uses :data:`DEFAULT_TOWERS`.
        encode: encode missing or stale arrays (``False``: only locate the folder, e.g. on the
            processes of a distributed run that wait for rank 0).
        load: how a tower spec becomes a tower (default :func:`load_tower`).
        option: the setting named in error messages.
    """
    from modalign.data import load_dataset
    from modalign.embed.paths import default_store_dir

    towers = towers or {}
    ds = load_dataset(dataset)
    specs = {m: towers.get(m) or DEFAULT_TOWERS.get(m, "") for m in ds.modalities
             if m in modalities}
    missing = [m for m in modalities if not specs.get(m)]
    if missing:
        raise ModalignError(f"{option}={dataset!r} has no items of {missing} or no "
                            f"default tower for them; it has {ds.modalities}")
    path = default_store_dir(ds, specs)
    if encode:
        return update_store(ds, specs, path, load=load, progress=sys.stderr.isatty())
    return EmbeddingStore(path)
