"""An embedding store whose texts are class prompts: the text modality of label-supervised runs.

Objectives such as CMA (:mod:`modalign.losses.cma`) pair each image with the prompt of its class
(``"a photo of a {}."`` over a label, e.g. the emoji subgroups) instead of its own caption.
:func:`class_prompt_store` writes that data as an ordinary store, so ``train`` needs nothing
new: the image array is copied, and the text array holds, for every group that carries the
label, one row per template (view ``"prompt"``, the group's split and labels) with the text
tower's features of that prompt. Groups of one class share the same prompt features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modalign.embed.store import EmbeddingStore
from modalign.errors import ModalignError


def class_prompt_store(store: EmbeddingStore, text_tower: Any, label: str,
                       folder: str | Path, *, templates: Sequence[str] = ("a photo of a {}.",),
                       image: str = "image", text: str = "text") -> EmbeddingStore:
    """Copy ``store``'s ``image`` array and write class-prompt rows as its ``text`` array.

    Args:
        store: a store with an ``image`` array whose rows carry ``labels[label]``.
        text_tower: the text tower (``preprocess`` + ``encode``) of the model to train.
        label: the label whose values are the classes, e.g. ``"subgroup"``.
        folder: the new store's folder (an existing store there is reused as it is).
        templates: prompt templates with ``{}``.
        image, text: the array names.

    Examples:
        >>> import tempfile, torch
        >>> class Tower:
        ...     def preprocess(self, texts): return texts
        ...     def encode(self, texts): return torch.ones(len(texts), 3)
        >>> src = EmbeddingStore(tempfile.mkdtemp())
        >>> rows = [{"id": f"i{i}", "modality": "image", "view": "v", "group": f"g{i}",
        ...          "split": "train", "labels": {"subgroup": "cat"}} for i in range(2)]
        >>> _ = src.add_array("image", np.ones((2, 4), np.float32), rows)
        >>> new = class_prompt_store(src, Tower(), "subgroup", tempfile.mkdtemp(),
        ...                          templates=["a {}", "the {}"])
        >>> len(new.load("text", view="prompt"))
        4
    """
    from modalign.evaluate.zeroshot import class_name
    from modalign.refine.core import tower_prompt_features

    if not templates or any("{}" not in t for t in templates):
        raise ModalignError(f"templates={list(templates)!r}: expected templates with '{{}}'")
    new = EmbeddingStore(folder)
    if image in new.arrays and text in new.arrays:
        return new
    emb = store.load(image)
    by_group: dict[str, dict[str, Any]] = {}
    for row in emb.items:
        value = (row.get("labels") or {}).get(label)
        if value and row["group"] not in by_group:
            by_group[row["group"]] = row
    if not by_group:
        raise ModalignError(f"label={label!r}: no {image} row of {store.path} carries it")
    classes = sorted({r["labels"][label] for r in by_group.values()})
    index = {c: i for i, c in enumerate(classes)}
    feats = tower_prompt_features(text_tower, classes, templates)
    rows, vecs = [], []
    for group, row in sorted(by_group.items()):
        for t in range(len(templates)):
            rows.append({"id": f"prompt/{t}/{group}", "modality": text, "view": "prompt",
                         "group": group, "split": row["split"], "labels": dict(row["labels"]),
                         "value": templates[t].format(class_name(row["labels"][label]))})
            vecs.append(feats[index[row["labels"][label]], t].numpy())
    info = {k: v for k, v in store.info(image).items() if k not in ("file", "count", "hash")}
    new.add_array(image, np.asarray(emb.vectors), list(emb.items), info=info)
    text_info = {k: v for k, v in store.info(text).items() if k not in ("file", "count", "hash")
                 } if text in store.arrays else {}
    new.add_array(text, np.asarray(vecs, dtype=np.float32), rows,
                  info={**text_info, "class_prompts": {"label": label,
                                                       "templates": list(templates)}})
    return new
