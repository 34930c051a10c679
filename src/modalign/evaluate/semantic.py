"""Encode queries and search a dataset with them: the everyday acts of a retrieval tool.

A :class:`JointSpace` is what turns raw inputs into comparable vectors: a trained model folder
(towers + heads) or one joint-space tower such as ``hf-clip:PATH`` used for every modality. It
encodes queries (:meth:`JointSpace.encode`) and a dataset's items (:meth:`JointSpace.gallery`,
reusing the cached embedding store). :func:`semantic_search` ranks a gallery for each query and
returns :class:`Hit` rows (id, value, score); :func:`search` does all three in one call.

Examples:
    (Not run as a doctest: it needs a trained model folder and a dataset.)

    >>> import modalign
    >>> hits = modalign.search("runs/clip/model", "pairs.csv",
    ...                        text="a trash can", k=5)  # doctest: +SKIP
    >>> hits[0][0].id, hits[0][0].value  # doctest: +SKIP
    ('img-17', 'images/bin.png')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.embed.store import Embeddings
from modalign.errors import ModalignError
from modalign.evaluate.runner import resolve_model_dir
from modalign.evaluate.search import ExactIndex, SearchIndex


@dataclass(frozen=True)
class Hit:
    """One ranked gallery item.

    Attributes:
        rank: 1 for the best match.
        score: cosine similarity to the query.
        id: the item's id in the dataset.
        value: its caption (text) or file path (image, audio).
        group: its group (the positives of one another).
        view: its view (``""`` when the data has none).
        split: its split.
    """

    rank: int
    score: float
    id: str
    value: str
    group: str
    view: str
    split: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_tower_spec(model: str) -> bool:
    """Whether ``model`` names a tower (``hf-clip:PATH``, ``minilm``) rather than a folder.

    Examples:
        >>> is_tower_spec("hf-clip:/models/clip"), is_tower_spec("runs/x/model")
        (True, False)
    """
    from modalign.encoders import registered_encoder
    from modalign.spec import parse_spec

    if Path(model).is_dir():
        return False
    try:
        return registered_encoder(parse_spec(model, "--model").name)
    except ModalignError:
        return False


class JointSpace:
    """A model folder, or one joint-space tower spec, that encodes inputs to unit vectors.

    Args:
        model: a folder written by ``modalign train`` / ``save_pretrained``, or a tower spec
            whose towers share one space (``hf-clip:PATH``, ``hf-siglip:PATH``,
            ``open_clip:ARCH/PRETRAINED``; a single-modality spec such as ``minilm`` searches
            within its own modality).
        progress: show progress bars while a dataset is embedded.

    Examples:
        (Not run as a doctest: it needs a trained model folder.)

        >>> space = JointSpace("runs/clip/model")  # doctest: +SKIP
        >>> space.encode("text", ["a trash can"]).shape  # doctest: +SKIP
        torch.Size([1, 256])
    """

    def __init__(self, model: str | Path, *, progress: bool = False) -> None:
        self.name = str(model)
        self.progress = progress
        self._towers: dict[str, Any] = {}
        if is_tower_spec(self.name):
            self.model_dir: Path | None = None
            self.model: Any = None
        else:
            from modalign.model import MultiTowerModel

            self.model_dir = resolve_model_dir(model)
            self.model = MultiTowerModel.from_pretrained(self.model_dir).eval()

    @property
    def modalities(self) -> list[str] | None:
        """The model's modalities (``None`` for a tower spec: whatever it accepts)."""
        return list(self.model.modalities) if self.model is not None else None

    def check_modality(self, modality: str, option: str = "--modality") -> None:
        """Fail with a clear message when the space has no tower for ``modality``."""
        names = self.modalities
        if names is not None and modality not in names:
            raise ModalignError(f"{option} {modality!r}: the model {self.name} has no such tower "
                                f"(it has {names})")

    def encode(self, modality: str, inputs: Sequence[Any], batch_size: int = 64) -> Tensor:
        """Raw inputs (texts, image paths, ...) of ``modality`` -> ``(n, d)`` unit vectors."""
        self.check_modality(modality)
        if not inputs:
            raise ModalignError(f"{modality}: expected at least one input to encode")
        if self.model is not None:
            return F.normalize(self.model.encode(modality, list(inputs), batch_size).float(),
                               dim=1)
        tower = self._tower(modality)
        out = []
        with torch.no_grad():
            for i in range(0, len(inputs), batch_size):
                batch = tower.preprocess(list(inputs[i:i + batch_size]))
                out.append(tower.encode(batch).float())
        return F.normalize(torch.cat(out), dim=1)

    def gallery(self, data: str | Path, modality: str, *, split: str | None = None,
                view: str | None = None) -> Embeddings:
        """The items of ``modality`` in ``data`` as unit joint vectors (embedded once, cached).

        ``split``/``view`` restrict the rows (``None`` or ``"all"``: every row).
        """
        self.check_modality(modality)
        split = None if split in (None, "all") else split
        if self.model_dir is not None:
            from modalign.embed.joint import load_joint

            joint = load_joint(model_dir=self.model_dir, data=data, modalities=[modality],
                               progress=self.progress)
            if modality not in joint:
                raise ModalignError(f"--modality {modality!r}: the data {data} has no such items")
            emb = joint[modality]
        else:
            from modalign.data import load_dataset
            from modalign.embed.encode import embed_dataset
            from modalign.embed.paths import default_store_dir

            dataset = load_dataset(data, progress=self.progress)
            if modality not in dataset.modalities:
                raise ModalignError(f"--modality {modality!r}: the data {data} has no such items "
                                    f"(it has {dataset.modalities})")
            store = embed_dataset(dataset, {modality: self._tower(modality)},
                                  default_store_dir(dataset, {modality: self.name}),
                                  progress=self.progress, normalize=True)
            emb = store.load(modality)
        emb = emb.filter(view=view, split=split) if (view or split) else emb
        if len(emb) == 0:
            raise ModalignError(f"no {modality} items in {data}"
                                + (f" with split {split!r}" if split else "")
                                + (f" and view {view!r}" if view else ""))
        vectors = F.normalize(torch.from_numpy(np.array(emb.vectors, dtype=np.float32)), dim=1)
        return Embeddings(vectors.numpy(), emb.items, emb.group_index)

    def _tower(self, modality: str) -> Any:
        if modality not in self._towers:
            from modalign.encoders import load_encoder

            self._towers[modality] = load_encoder(self.name, modality=modality)
        return self._towers[modality]


def other_modality(space: JointSpace, query_modality: str) -> str:
    """The gallery modality when none is given: the model's other modality, else the same.

    A two-modality model searches across (text -> image); a single tower within its own modality.
    """
    names = space.modalities
    if names is None:
        return "image" if query_modality == "text" else "text"
    others = [m for m in names if m != query_modality]
    if len(others) == 1:
        return others[0]
    if not others:
        return query_modality
    raise ModalignError(f"the model has modalities {names}: pass --modality to say which one "
                        "to search")


def semantic_search(queries: Tensor, gallery: Embeddings, k: int = 10, *,
                    index: SearchIndex | None = None) -> list[list[Hit]]:
    """Top ``k`` gallery items per query, best first (cosine scores of unit vectors).

    Args:
        queries: ``(Q, d)`` query vectors (normalised here).
        gallery: the items searched; its rows give each hit's id and value.
        k: hits per query (fewer when the gallery is smaller).
        index: a search index already holding ``gallery``'s vectors in the same row order (for
            example a faiss index read by :func:`modalign.evaluate.index_file.read_index`);
            default: exact search.

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> g = toy_embeddings()["image"]
        >>> hits = semantic_search(torch.from_numpy(g.vectors[:1].copy()), g, k=2)
        >>> hits[0][0].id, hits[0][0].rank
        ('image-noto-0', 1)
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ModalignError(f"k={k!r}: expected a positive integer")
    if len(gallery) == 0:
        raise ModalignError("gallery: expected at least one item to search")
    q = F.normalize(queries.detach().float().cpu(), dim=1)
    if index is None:
        index = ExactIndex()
        index.add(F.normalize(torch.from_numpy(np.array(gallery.vectors, dtype=np.float32)),
                              dim=1))
    elif index.size != len(gallery):
        raise ModalignError(f"index: holds {index.size} vectors but the gallery has "
                            f"{len(gallery)} items")
    found = index.search(q, min(k, len(gallery)))
    out = []
    for scores, rows in zip(found.scores.tolist(), found.indices.tolist()):
        hits: list[Hit] = []
        for score, row in zip(scores, rows):
            if row < 0:
                continue
            it = gallery.items[row]
            hits.append(Hit(rank=len(hits) + 1, score=float(score), id=str(it["id"]),
                            value=str(it.get("value", "")), group=str(it.get("group", "")),
                            view=str(it.get("view", "")), split=str(it.get("split", ""))))
        out.append(hits)
    return out


def search(model: str | Path, data: str | Path, *, text: str | Sequence[str] | None = None,
           image: str | Sequence[str] | None = None, k: int = 10, modality: str | None = None,
           split: str | None = None) -> list[list[Hit]]:
    """Encode text or image queries with ``model`` and search the items of ``data``.

    Args:
        model: a model folder or a joint-space tower spec (see :class:`JointSpace`).
        data: the dataset searched (a manifest, a dataset folder, ``emoji``); its embeddings are
            computed once and cached.
        text: one query text or several.
        image: one query image path or several (exactly one of ``text``/``image``).
        k: hits per query.
        modality: the modality searched (default: the model's other modality).
        split: restrict the gallery to one split (default: every row).

    Returns:
        One list of :class:`Hit` per query, best first.

    Examples:
        (Not run as a doctest: it needs a trained model folder and a dataset.)

        >>> import modalign
        >>> for hit in modalign.search("runs/clip/model", "pairs.csv", text="a red bicycle",
        ...                            k=3)[0]:  # doctest: +SKIP
        ...     print(hit.rank, round(hit.score, 3), hit.id, hit.value)
    """
    if (text is None) == (image is None):
        raise ModalignError("search: pass exactly one of text=... or image=...")
    query_modality = "text" if text is not None else "image"
    raw = text if text is not None else image
    queries = [raw] if isinstance(raw, (str, Path)) else list(raw or [])
    space = JointSpace(model)
    target = modality or other_modality(space, query_modality)
    gallery = space.gallery(data, target, split=split)
    return semantic_search(space.encode(query_modality, [str(q) for q in queries]), gallery, k)
