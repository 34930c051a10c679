"""Search a dataset with a late-interaction model: query tokens against token documents by MaxSim.

A :class:`LateSpace` is a late-interaction model folder with the towers that made its token store
(read from the store's manifest, or passed in): it turns raw queries into projected token sets
(:meth:`LateSpace.encode`) and a dataset into documents, one per group made of the tokens of every
row of the model's document keys (:meth:`LateSpace.gallery`; the dataset's token arrays are
computed once and cached). :func:`late_search` ranks them by exact, blocked MaxSim and returns the
same :class:`~modalign.evaluate.semantic.Hit` rows as single-vector search (the id is the group).

Examples:
    (Not run as a doctest: it needs a trained late-interaction model folder and a dataset.)

    >>> space = LateSpace("runs/late/model")                               # doctest: +SKIP
    >>> docs = space.gallery("pairs.csv")                                  # doctest: +SKIP
    >>> late_search(space.encode("text", ["a trash can"]), docs, k=5)[0][0].id  # doctest: +SKIP
    'bin'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modalign.errors import ModalignError
from modalign.evaluate.semantic import Hit, resolve_model_dir
from modalign.late.maxsim import Ragged, maxsim_search
from modalign.late.model import LateInteractionModel, TokenDocuments, token_rows

__all__ = ["LateGallery", "LateSpace", "late_search"]


@dataclass
class LateGallery:
    """Documents searched: their projected tagged tokens and the token rows of each."""

    docs: Ragged
    documents: TokenDocuments

    def __len__(self) -> int:
        return len(self.documents)


class LateSpace:
    """A late-interaction model folder and its query/document towers.

    Args:
        model: a folder written by a ``[late]`` training run (``<run>/model``).
        towers: modality -> a tower with ``preprocess``, ``token_counts`` and ``encode_tokens``
            (your own towers); default: the towers recorded in the model's token store.
        normalize: L2-normalise tower tokens before the heads; default: as the store did.
        progress: show progress bars while a dataset is encoded.
    """

    def __init__(self, model: str | os.PathLike[str], towers: Mapping[str, Any] | None = None,
                 normalize: bool | None = None, progress: bool = False) -> None:
        self.name = str(model)
        model_dir = resolve_model_dir(os.fspath(model))
        self.model = LateInteractionModel.from_pretrained(model_dir).eval()
        settings = dict(getattr(self.model, "extra", {}).get("settings", {}))
        self.query_key = str(settings.get("query", "text"))
        self.document_keys = list(settings.get("documents", []))
        self.store = settings.get("store") or None
        self._towers = dict(towers or {})
        self._normalize = normalize
        self.progress = progress

    @property
    def modalities(self) -> list[str]:
        """The modalities the model has heads for."""
        return sorted(self.model.in_dims)

    def _store_entry(self, modality: str) -> dict[str, Any]:
        from modalign.embed.store import EmbeddingStore

        if not self.store or not (Path(self.store) / "manifest.json").is_file():
            raise ModalignError(f"--model {self.name}: its token store {self.store!r} is not "
                                "there to say which towers made its tokens; pass the towers "
                                "(LateSpace(model, towers={...}))")
        entry = EmbeddingStore(self.store).manifest.get("tokens", {}).get(modality)
        if not entry:
            raise ModalignError(f"the store {self.store} has no {modality!r} token array")
        return dict(entry)

    def tower(self, modality: str) -> Any:
        """The token tower of ``modality``: the one given, else the store's."""
        if modality not in self.model.in_dims:
            raise ModalignError(f"modality {modality!r}: the late-interaction model {self.name} "
                                f"has heads for {self.modalities}")
        if modality not in self._towers:
            from modalign.encoders import load_encoder

            name = (self._store_entry(modality).get("encoder") or {}).get("name")
            if not name:
                raise ModalignError(f"the store {self.store} records no tower for {modality!r}")
            self._towers[modality] = load_encoder(str(name), modality=modality)
        return self._towers[modality]

    def normalize(self, modality: str) -> bool:
        if self._normalize is None:
            return bool(self._store_entry(modality).get("normalized", False)) if self.store \
                else False
        return self._normalize

    @torch.no_grad()
    def encode(self, modality: str, inputs: Sequence[Any]) -> Ragged:
        """Raw inputs of ``modality`` -> one set of projected unit tokens per input."""
        if not inputs:
            raise ModalignError(f"{modality}: expected at least one input to encode")
        tower = self.tower(modality)
        states, mask = tower.encode_tokens(tower.preprocess(list(inputs)))
        states = states.float()
        if self.normalize(modality):
            states = torch.nn.functional.normalize(states, dim=-1)
        mask = mask.bool()
        values = self.model.project(modality, states[mask])
        counts = mask.sum(1).to(torch.int64)
        return Ragged(values, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))

    @torch.no_grad()
    def gallery(self, data: Any, split: str | None = None) -> LateGallery:
        """The documents of ``data`` (a dataset spec or a loaded
        :class:`~modalign.data.PairedDataset`): one per group with rows of the document keys."""
        from modalign.data import PairedDataset, load_dataset
        from modalign.embed.paths import default_store_dir
        from modalign.embed.tokens import embed_tokens

        dataset = data if isinstance(data, PairedDataset) else load_dataset(
            data, progress=self.progress)
        mods = sorted({k.partition(":")[0] for k in self.document_keys})
        missing = [m for m in mods if m not in dataset.modalities]
        if missing:
            raise ModalignError(f"--data {dataset.name}: the model's documents "
                                f"({', '.join(self.document_keys)}) need {missing} items; the "
                                f"data has {dataset.modalities}")
        towers = {m: self.tower(m) for m in mods}
        specs = {m: f"{getattr(t, 'name', t)}:tokens{int(self.normalize(m))}"
                 for m, t in towers.items()}
        for m, t in towers.items():  # one cached store per tower and normalisation
            embed_tokens(dataset, {m: t}, default_store_dir(dataset, {m: specs[m]}),
                         progress=self.progress, normalize=self.normalize(m))
        split = None if split in (None, "all") else split
        rows = {m: token_rows(default_store_dir(dataset, {m: specs[m]}), split) for m in mods}
        documents = TokenDocuments(lambda key: rows[key.partition(":")[0]](key),
                                   self.document_keys)
        if not len(documents):
            raise ModalignError(f"no documents ({', '.join(self.document_keys)}) in "
                                f"{dataset.name}" + (f" with split {split!r}" if split else ""))
        return LateGallery(documents.project(self.model), documents)


def late_search(queries: Ragged, gallery: LateGallery, k: int = 10) -> list[list[Hit]]:
    """Top ``k`` documents per query by exact MaxSim, best first, as :class:`Hit` rows (id and
    group: the document's group; value: its rows' values joined by ``" | "``)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ModalignError(f"k={k!r}: expected a positive integer")
    scores, idx = maxsim_search(queries, gallery.docs, k=min(k, len(gallery)))
    out = []
    for srow, irow in zip(scores.tolist(), idx.tolist()):
        hits: list[Hit] = []
        for score, i in zip(srow, irow):
            group, members = gallery.documents.groups[i], gallery.documents.members[i]
            hits.append(Hit(rank=len(hits) + 1, score=float(score), id=str(group),
                            value=" | ".join(str(it.get("value", "")) for it in members),
                            group=str(group), view="", split=str(members[0].get("split", ""))))
        out.append(hits)
    return out
