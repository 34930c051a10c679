"""Joint-space embeddings for the other stages: from a store, or from a model plus data."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modalign.embed.store import Embeddings, EmbeddingStore
from modalign.errors import ModalignError

if TYPE_CHECKING:
    from modalign.data.dataset import PairedDataset
    from modalign.model import MultiTowerModel


class JointEmbeddings(dict[str, Embeddings]):
    """Modality -> joint-space :class:`Embeddings`, with the store they were read from.

    A plain dict for every use, plus ``store`` (the :class:`EmbeddingStore`) and
    ``display_name`` (the name given with ``modalign embed --name``, or ``None``).

    Examples:
        >>> import tempfile
        >>> joint = JointEmbeddings({}, store=EmbeddingStore(tempfile.mkdtemp()))
        >>> joint == {}, joint.display_name
        (True, None)
    """

    def __init__(self, embeddings: dict[str, Embeddings], *, store: EmbeddingStore) -> None:
        super().__init__(embeddings)
        self.store = store

    @property
    def display_name(self) -> str | None:
        from modalign.embed.store import DATASET_INFO

        return self.store.display_name if (self.store.path / DATASET_INFO).is_file() else None


def load_joint(model_dir: str | Path | None = None, embeddings_dir: str | Path | None = None,
               data: str | Path | None = None, split: str | Iterable[str] | None = None,
               modalities: Iterable[str] | None = None, progress: bool = True,
               ) -> JointEmbeddings:
    """Embeddings in the joint space, per modality, for ``--model``/``--embeddings``/``--data``.

    Returns a :class:`JointEmbeddings` (a dict that also carries the store it read).

    - ``embeddings_dir`` alone: the store's arrays are taken as joint-space vectors (for example
      a store written with a CLIP adapter and ``--normalize``).
    - ``model_dir`` with ``data``: tower features come from the store for that data and the
      model's towers (encoded once and cached, see ``modalign embed``), then the model's heads
      project them. Partly unfrozen towers are run from the model itself.
    - ``model_dir`` with ``embeddings_dir``: the store's tower features are projected.

    Examples:
        (Not run as a doctest: it needs a trained model folder.)

        >>> joint = load_joint(model_dir="runs/clip/model", data="emoji",
        ...                    split="test")  # doctest: +SKIP
        >>> joint["image"].vectors.shape  # doctest: +SKIP
        (386, 256)
    """
    if model_dir is None and embeddings_dir is None:
        raise ValueError("pass --model DIR (with --data DATA) or --embeddings DIR")
    if model_dir is None:
        store = EmbeddingStore(_existing(embeddings_dir, "embeddings"))
        names = list(modalities) if modalities is not None else store.modalities
        if not names:
            raise ValueError(f"embeddings={str(embeddings_dir)!r} holds no arrays")
        return JointEmbeddings({m: store.load(m, split=split) for m in names}, store=store)

    from modalign.model import MultiTowerModel

    model = MultiTowerModel.from_pretrained(_existing(model_dir, "model"))
    wanted = list(modalities) if modalities is not None else model.modalities
    unknown = [m for m in wanted if m not in model.modalities]
    if unknown:
        raise ValueError(f"modalities {unknown} have no tower in the model {model_dir} "
                         f"(it has {model.modalities})")
    if embeddings_dir is not None:
        store = EmbeddingStore(_existing(embeddings_dir, "embeddings"))
        dataset = None
    else:
        if data is None:
            raise ValueError("--model needs --data DATA (or --embeddings DIR of tower features)")
        from modalign.data import load_dataset
        from modalign.embed.paths import default_store_dir
        from modalign.embed.resolve import update_store

        dataset = load_dataset(data, progress=progress)
        frozen = {m: model.config.towers[m] for m in wanted
                  if m not in model.config.trainable_towers and m in dataset.modalities}
        # towers are built only for arrays that are missing or stale
        store = update_store(dataset, frozen, default_store_dir(dataset, model.config.towers),
                             progress=progress)
    out: dict[str, Embeddings] = {}
    for m in wanted:
        if (tuned := fine_tuned_embeddings(model, m, split, store, dataset)) is not None:
            out[m] = tuned
            continue
        if m not in store.modalities:
            warnings.warn(f"modality {m!r}: no array in {store.path}; skipped", stacklevel=2)
            continue
        _check_tower(store, m, model.config.towers[m])
        raw = store.load(m, split=split)
        out[m] = Embeddings(model.project_array(m, raw.vectors), raw.items, raw.group_index)
    return JointEmbeddings(out, store=store)


def fine_tuned_embeddings(model: MultiTowerModel, modality: str,
                          split: str | Iterable[str] | None, store: EmbeddingStore,
                          dataset: PairedDataset | None) -> Embeddings | None:
    """``modality``'s items encoded by ``model`` itself when its tower was fine-tuned (that needs
    ``dataset``: a ``ModalignError`` without it), else None (the store's features serve)."""
    if modality not in model.config.trainable_towers:
        return None
    if dataset is None:
        raise ModalignError(f"the {modality!r} tower of this model was fine-tuned: pass the data "
                            "(CLI: --data) so its inputs are encoded by the model itself")
    return encode_with_model(model, dataset, modality, split, store)


def encode_with_model(model: MultiTowerModel, dataset: PairedDataset, modality: str,
                      split: str | Iterable[str] | None, store: EmbeddingStore) -> Embeddings:
    """``dataset``'s ``modality`` items of ``split`` encoded by ``model`` (its own tower)."""
    from modalign.embed.encode import raw_input

    items = dataset.select(modality=modality, split=split)
    vecs = model.encode(modality, [raw_input(dataset, it) for it in items]).numpy()
    rows = [it.to_dict() for it in items]
    return Embeddings(vecs.astype(np.float32), rows, store.group_index())


def _check_tower(store: EmbeddingStore, modality: str, spec: str) -> None:
    enc = store.info(modality).get("encoder", {})
    if enc and enc.get("name") not in (None, spec) and not str(enc.get("name")).startswith(spec):
        warnings.warn(f"store {store.path} encoded {modality!r} with {enc.get('name')!r} but the "
                      f"model's tower is {spec!r}", stacklevel=3)


def _existing(path: str | Path | None, what: str) -> Path:
    p = Path(str(path))
    if not p.is_dir():
        raise FileNotFoundError(f"--{what} {p}: no such folder")
    return p
