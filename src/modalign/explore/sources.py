"""What ``modalign explore`` reads: joint embeddings, the bank, item values and inverted twins.

Joint-space embeddings come from :func:`modalign.embed.joint.load_joint` (a model with a dataset,
a model with a store of tower features, or a store of joint vectors alone). The shown rows are one
split; the bank (what the bridge and the gap vector are fitted on) is the training split when the
data has one. Item values (text, image paths) come from the dataset, or from the row labels when
only a store is given. Inverted arrays (OTI/OVI, written by ``modalign invert``) are read from the
same store, or from ``inverted_dir``; with a model, only arrays inverted through that model's
weights (their ``model_weights`` hash) are taken.

Examples:
    (Not run as a doctest: it needs a store of joint embeddings on disk.)

    >>> src = load_sources(embeddings_dir="runs/joint-store", split="test")  # doctest: +SKIP
    >>> sorted(src.shown), src.bank is None  # doctest: +SKIP
    (['image', 'text'], False)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modalign.data.dataset import PairedDataset
from modalign.embed.store import MANIFEST, Embeddings, EmbeddingStore
from modalign.errors import ModalignError

__all__ = ["ExploreSources", "load_sources"]


@dataclass
class ExploreSources:
    """Inputs of :func:`modalign.explore.build.build_explore`."""

    shown: dict[str, Embeddings]
    bank: dict[str, Embeddings] | None
    values: dict[str, str]
    inverted: dict[str, Embeddings] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


def load_sources(model_dir: str | Path | None = None,
                 data: str | Path | PairedDataset | None = None,
                 embeddings_dir: str | Path | None = None, split: str | None = "test",
                 modalities: Iterable[str] | None = None,
                 inverted_dir: str | Path | None = None, progress: bool = True
                 ) -> ExploreSources:
    """Read everything the page needs (see the module docstring).

    ``data`` is a dataset spec (``emoji``, a manifest, a folder) or a loaded
    :class:`~modalign.data.dataset.PairedDataset`; with ``embeddings_dir`` it only supplies the
    item values.
    """
    from modalign.embed.joint import load_joint

    if model_dir is None and embeddings_dir is None:
        raise ModalignError("explore: pass --model DIR with --data DATA (or --embeddings DIR), "
                            "or --embeddings DIR of joint-space vectors")
    dataset = data if isinstance(data, PairedDataset) else None
    spec = None if isinstance(data, PairedDataset) else data  # what load_joint encodes
    if dataset is not None and embeddings_dir is None:
        if dataset.root is None:
            raise ModalignError("data: a dataset object without a folder needs --embeddings DIR")
        spec = dataset.root
    joint = load_joint(model_dir=model_dir, embeddings_dir=embeddings_dir, data=spec, split=None,
                       modalities=list(modalities) if modalities else None, progress=progress)
    if len(joint) < 2:
        raise ModalignError(f"explore: needs at least two modalities, found {sorted(joint)}")
    shown = {m: (e.filter(split=split) if split else e) for m, e in joint.items()}
    for m, e in shown.items():
        if len(e) == 0:
            splits = sorted({str(it.get("split")) for it in joint[m].items})
            raise ModalignError(f"--split {split!r}: modality {m!r} has no rows in it "
                                f"(it has {splits})")
    bank = None
    if split != "train":
        train = {m: e.filter(split="train") for m, e in joint.items()}
        if all(len(e) >= 2 for e in train.values()):
            bank = train

    values: dict[str, str] = {}
    store_dirs: list[Path] = []
    if data is not None:
        from modalign.data import load_dataset
        from modalign.embed.encode import raw_input

        if dataset is None:
            assert spec is not None  # data is a spec when it is not a dataset
            dataset = load_dataset(spec, progress=progress)
        wanted = {str(it["id"]) for e in shown.values() for it in e.items}
        for item in dataset.items:
            if item.id in wanted:
                values[item.id] = str(raw_input(dataset, item))
        if model_dir is not None and embeddings_dir is None:
            from modalign.embed.paths import default_store_dir
            from modalign.model import MultiTowerModel

            towers = MultiTowerModel.from_pretrained(model_dir).config.towers
            store_dirs.append(default_store_dir(dataset, towers))
    else:
        for e in shown.values():
            for it in e.items:
                labels = it.get("labels") or {}
                if labels:
                    values[str(it["id"])] = ", ".join(f"{k}={v}" for k, v in labels.items())
    if embeddings_dir is not None:
        store_dirs.append(Path(embeddings_dir))
    if inverted_dir is not None:
        if not Path(inverted_dir).is_dir():
            raise ModalignError(f"--inverted {inverted_dir}: no such folder")
        store_dirs.append(Path(inverted_dir))
    weights = None
    if model_dir is not None and (Path(model_dir) / "model.safetensors").is_file():
        from modalign.io import file_hash

        weights = file_hash(Path(model_dir) / "model.safetensors")
    inverted: dict[str, Embeddings] = {}
    for d in store_dirs:
        if (d / MANIFEST).is_file():
            inverted.update(_inverted_arrays(EmbeddingStore(d), weights))
    data_name = data.name if isinstance(data, PairedDataset) else data
    source = {"model": str(model_dir) if model_dir else None,
              "data": str(data_name) if data_name else None,
              "embeddings": str(embeddings_dir) if embeddings_dir else None, "split": split}
    return ExploreSources(shown, bank, values, inverted, source)


def _inverted_arrays(store: EmbeddingStore, weights: str | None) -> dict[str, Embeddings]:
    """Inverted arrays of ``store``; with ``weights``, only those made for that model."""
    from modalign.bridge.inversion.store import inverted_arrays

    out = {}
    for name, entry in inverted_arrays(store).items():
        made_for = entry.get("inversion", {}).get("model_weights")
        if weights is None or made_for in (None, weights):
            out[name] = store.load(name)
    return out
