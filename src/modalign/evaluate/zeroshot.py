"""Zero-shot classification: class prototypes from prompt templates, scored by cosine.

Each class name is written into every template (``"a photo of a {}."``), the prompts are encoded
by the text tower, each prompt embedding is L2-normalised, the embeddings of one class are
averaged over templates and renormalised: that is the class prototype. An input is assigned the
class whose prototype scores highest. Metrics use CLIP_benchmark's names: ``acc1``, ``acc5``
(true class among the top 5) and ``mean_per_class_recall`` (top-1 recall averaged over classes).
Score ties are broken pessimistically, as in :mod:`modalign.evaluate.metrics`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from modalign.bridge.posthoc import build_chain
from modalign.embed.store import Embeddings
from modalign.evaluate.bootstrap import QueryValues
from modalign.evaluate.metrics import DEFAULT_CHUNK_SIZE, Ties, relevant_positions
from modalign.evaluate.retrieval import TaskResult, as_unit_tensor
from modalign.io import atomic_path, read_safetensors

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "an emoji of {}.",
    "an icon of {}.",
    "{}",
)
"""Prompt templates of the emoji data (and the lab on it); ``{}`` is replaced by the class name."""

NEUTRAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "{}",
)
"""Prompt templates for a user's own data when none are given: CLIP's plain prompt and the name."""


def default_templates(data: str) -> tuple[str, ...]:
    """The templates used when none are given: the emoji ones for the emoji data, else neutral.

    Examples:
        >>> default_templates("emoji:limit=50") == DEFAULT_TEMPLATES
        True
        >>> default_templates("shop/manifest.csv")
        ('a photo of a {}.', '{}')
    """
    name = str(data)
    return DEFAULT_TEMPLATES if name == "emoji" or name.startswith("emoji:") else NEUTRAL_TEMPLATES


def class_name(label: str) -> str:
    """A readable class name from a label value: ``"face-smiling"`` -> ``"face smiling"``.

    Examples:
        >>> class_name("animal-bird"), class_name("Smileys & Emotion")
        ('animal bird', 'smileys & emotion')
    """
    return " ".join(label.replace("-", " ").replace("_", " ").split()).lower()


def build_prompts(classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
                  ) -> list[list[str]]:
    """Prompts per class, ``[class][template]``.

    Examples:
        >>> build_prompts(["cat"], ["a photo of a {}.", "{}"])
        [['a photo of a cat.', 'cat']]
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates={list(templates)!r}: expected strings containing '{{}}'")
    if not classnames:
        raise ValueError("classnames: expected at least one class")
    return [[t.format(c) for t in templates] for c in classnames]


def class_prototypes(prompt_embeddings: Tensor) -> Tensor:
    """``(C, T, d)`` prompt embeddings -> ``(C, d)`` prototypes (normalise, average, renormalise).

    A ``(C, d)`` input is taken as one prompt per class and only normalised.

    Examples:
        >>> p = class_prototypes(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]))
        >>> [round(v, 4) for v in p[0].tolist()]
        [0.7071, 0.7071]
    """
    if prompt_embeddings.ndim == 2:
        return F.normalize(prompt_embeddings.float(), dim=-1)
    if prompt_embeddings.ndim != 3:
        raise ValueError(f"prompt_embeddings: expected (C, T, d) or (C, d), got "
                         f"{tuple(prompt_embeddings.shape)}")
    return F.normalize(F.normalize(prompt_embeddings.float(), dim=-1).mean(1), dim=-1)


def encode_prototypes(encode: Callable[[list[str]], Tensor], classnames: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES) -> Tensor:
    """Prototypes from a text encoder (e.g. ``lambda p: model.encode("text", p)``).

    Examples:
        >>> fake = lambda prompts: torch.randn(len(prompts), 4)
        >>> encode_prototypes(fake, ["cat", "dog"], ["a {}", "{}"]).shape
        torch.Size([2, 4])
    """
    prompts = build_prompts(classnames, templates)
    flat = [p for per_class in prompts for p in per_class]
    emb = torch.as_tensor(encode(flat)).float()
    if emb.ndim != 2 or len(emb) != len(flat):
        raise ValueError(f"encode: expected ({len(flat)}, d) embeddings, got {tuple(emb.shape)}")
    return class_prototypes(emb.reshape(len(classnames), len(templates), -1))


def save_class_embeddings(path: str | os.PathLike[str], classnames: Sequence[str],
                          embeddings: Tensor, templates: Sequence[str] = ()) -> Path:
    """Write class embeddings (``(C, d)`` or ``(C, T, d)``) with their names, as safetensors.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "classes.safetensors"
        >>> _ = save_class_embeddings(p, ["cat", "dog"], torch.eye(2))
        >>> load_class_embeddings(p)[0]
        ['cat', 'dog']
    """
    if embeddings.ndim not in (2, 3) or len(embeddings) != len(classnames):
        raise ValueError(f"embeddings: expected ({len(classnames)}, d) or "
                         f"({len(classnames)}, T, d), got {tuple(embeddings.shape)}")
    meta = {"classes": json.dumps(list(classnames)), "templates": json.dumps(list(templates))}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.detach().float().contiguous()}, str(tmp),
                  metadata=meta)
    return path


def load_class_embeddings(path: str | os.PathLike[str]) -> tuple[list[str], Tensor]:
    """Read a file written by :func:`save_class_embeddings`: class names and prototypes."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class embeddings {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "classes" not in meta:
        raise ValueError(f"class embeddings {path}: expected a 'classes' entry in the metadata "
                         "(write the file with save_class_embeddings)")
    names = json.loads(meta["classes"])
    return names, class_prototypes(read_safetensors(path)["embeddings"])



def resolve_classes(task: str, labels: Sequence[str | None], *, label: str,
                    class_embeddings: str | None, model_dir: str | None,
                    templates: Sequence[str], exclude: frozenset[str] = frozenset()
                    ) -> tuple[list[str], Tensor, tuple[str, ...]]:
    """Class names, their prototypes and the templates used, for ``--task TASK``.

    From ``class_embeddings`` (a file of :func:`save_class_embeddings`; no templates), or else
    the class values of ``labels`` (less ``exclude``) as prompts encoded by the text tower of
    the model in ``model_dir``. Shared by zero-shot classification and OoD detection.
    """
    from modalign.errors import ModalignError

    if class_embeddings:
        names, prototypes = load_class_embeddings(class_embeddings)
        return names, prototypes, ()
    if not model_dir:
        raise ModalignError(f"--task {task} with --embeddings needs class prototypes: pass "
                            "--model DIR (its text tower encodes the prompts) or "
                            "--class-embeddings FILE")
    from modalign.model import MultiTowerModel

    model = MultiTowerModel.from_pretrained(model_dir)
    if "text" not in model.modalities:
        raise ModalignError(f"--task {task}: the model {model_dir} has no text tower to encode "
                            "class prompts; pass --class-embeddings FILE")
    names = sorted({v for v in labels if v} - exclude)
    if not names:
        raise ModalignError(f"--label {label!r}: the inputs carry no such label")
    prototypes = encode_prototypes(lambda p: model.encode("text", p),
                                   [class_name(c) for c in names], templates)
    return names, prototypes, tuple(templates)


def zero_shot_classification(
    inputs: Embeddings,
    prototypes: Tensor,
    classnames: Sequence[str],
    *,
    label: str,
    input_key: str = "image",
    prototype_key: str = "text",
    bridges: Sequence[str] = (),
    bank: Mapping[str, Embeddings] | None = None,
    query_override: Tensor | None = None,
    inversion: Mapping[str, Any] | None = None,
    templates: Sequence[str] = (),
    ties: Ties = "pessimistic",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TaskResult:
    """Classify ``inputs`` by their ``label`` against class prototypes.

    Args:
        inputs: embeddings to classify (e.g. test images); their ``labels[label]`` is the truth.
        prototypes: ``(C, d)`` class prototypes, row ``c`` for ``classnames[c]``.
        classnames: the label value of each prototype row (the value stored on the items).
        label: label name on the items (``"subgroup"``, ``"group"``, a user's ``"label"``).
        input_key: modality of the inputs (the bridges' query side).
        prototype_key: modality of the prototypes (the bridges' gallery side).
        bridges: bridge specs, fitted on ``bank`` and applied to inputs and prototypes.
        bank: modality -> training embeddings for the bridges.
        query_override: ``(n, d)`` vectors replacing the inputs (e.g. inverted features).
        inversion: how the override was made, stored in the record.
        templates: the templates that built the prototypes, for the protocol.
        ties: tie rule.
        chunk_size: scores held in memory at once.

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> emb = toy_embeddings()["image"]
        >>> names = sorted(set(emb.labels("subgroup")))
        >>> protos = torch.randn(len(names), emb.dim)
        >>> r = zero_shot_classification(emb, protos, names, label="subgroup")
        >>> sorted(r.metrics)
        ['acc1', 'acc5', 'mean_per_class_recall']
    """
    truth = inputs.labels(label)
    if not any(truth):
        raise ValueError(f"label={label!r}: the inputs carry no such label")
    if prototypes.ndim != 2 or len(prototypes) != len(classnames):
        raise ValueError(f"prototypes: expected ({len(classnames)}, d), got "
                         f"{tuple(prototypes.shape)}")
    index = {c: i for i, c in enumerate(classnames)}
    missing = sorted({t for t in truth if t and t not in index})
    if missing:
        raise ValueError(f"classnames: no prototype for labels {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; expected every label value of "
                         "the inputs")
    keep = np.array([bool(t) for t in truth])
    inputs = inputs.subset(keep) if not keep.all() else inputs
    x = as_unit_tensor(inputs)
    if query_override is not None and query_override.shape != (len(truth), x.shape[1]):
        raise ValueError(f"query_override: expected shape {(len(truth), x.shape[1])} (one row "
                         f"per input), got {tuple(query_override.shape)}")
    protos = F.normalize(prototypes.float(), dim=1)
    applied: list[dict[str, Any]] = []
    if bridges:
        if bank is None:
            raise ValueError("bank: bridges need a bank of training embeddings to fit on")
        chain = build_chain(bridges, query=input_key, gallery=prototype_key)
        chain.fit({k: as_unit_tensor(bank[k]) for k in (input_key, prototype_key) if k in bank})
        moved = chain.transform({input_key: x, prototype_key: protos})
        x, protos, applied = moved[input_key], moved[prototype_key], chain.identity()
    if query_override is not None:  # replaces the inputs after the bridges, like retrieval
        x = F.normalize(query_override.float()[torch.from_numpy(keep)], dim=1)
    y = torch.tensor([index[t] for t in inputs.labels(label)], dtype=torch.int64)
    rank = torch.empty(len(y), dtype=torch.int64)
    for block in relevant_positions(x, protos, y, torch.arange(len(classnames)), ties=ties,
                                    chunk_size=chunk_size):
        rank[block.start : block.start + len(block.positions)] = block.positions[:, 0]
    top1 = (rank == 1).double()
    present = torch.unique(y)
    per_class = torch.stack([top1[y == c].mean() for c in present])
    metrics = {
        "acc1": float(top1.mean()),
        "acc5": float((rank <= 5).double().mean()),
        "mean_per_class_recall": float(per_class.mean()),
    }
    protocol = {
        "inputs": input_key, "label": label, "num_inputs": len(y),
        "num_classes": len(classnames), "classes_present": len(present),
        "templates": list(templates), "prototype": "mean of normalised prompts, renormalised",
        "ties": ties, "score": "cosine", "inverted_queries": query_override is not None,
    }
    classes = y.numpy()
    per_query = {"acc1": QueryValues(top1.numpy()),
                 "acc5": QueryValues((rank <= 5).double().numpy()),
                 "mean_per_class_recall": QueryValues(top1.numpy(), classes)}
    return TaskResult("zeroshot", metrics, protocol, applied,
                      dict(inversion) if inversion else None, per_query)


def group_as_label(emb: Embeddings) -> Embeddings:
    """The rows with their group as the label ``group`` (where they carry no such label).

    Examples:
        >>> rows = [{"id": "a", "group": "cat", "labels": {}}, {"id": "b", "group": "dog"}]
        >>> group_as_label(Embeddings(np.zeros((2, 3), np.float32), rows, {})).labels("group")
        ['cat', 'dog']
    """
    items = [it if (it.get("labels") or {}).get("group")
             else {**it, "labels": {**(it.get("labels") or {}), "group": it["group"]}}
             for it in emb.items]
    return Embeddings(emb.vectors, items, emb.group_index)


def zero_shot_task(
    joint: Mapping[str, Embeddings],
    test: Mapping[str, Embeddings],
    bank: Mapping[str, Embeddings] | None = None,
    *,
    modality: str = "image",
    label: str = "subgroup",
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    class_embeddings: str | os.PathLike[str] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    bridges: Sequence[str] = (),
    query_override: Tensor | None = None,
    inversion: Mapping[str, Any] | None = None,
    ties: Ties = "pessimistic",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TaskResult:
    """Zero-shot classification of ``test[modality]`` as ``modalign eval --task zeroshot`` runs it.

    The classes are the ``label`` values of all rows of ``joint[modality]`` (``label="group"``:
    the group, where a row has no such label); their prototypes come from ``class_embeddings``
    or from the text tower of ``model_dir`` on ``templates`` (:func:`resolve_classes`). Then
    :func:`zero_shot_classification`, with ``bridges`` fitted on ``bank``. Five classes or fewer
    give a :class:`~modalign.errors.SmallDataWarning` (``acc5`` means little).

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> import tempfile, pathlib
        >>> emb = toy_embeddings()
        >>> names = sorted(set(emb["text"].labels("subgroup")))
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "classes.safetensors"
        >>> _ = save_class_embeddings(path, names, torch.randn(len(names), emb["text"].dim))
        >>> import warnings; warnings.simplefilter("ignore")
        >>> r = zero_shot_task(emb, emb, class_embeddings=path)
        >>> r.protocol["num_classes"], r.protocol["num_inputs"]
        (4, 24)
    """
    import warnings

    from modalign.errors import SmallDataWarning
    from modalign.evaluate.runner import modality_rows

    if label == "group":
        joint = {m: group_as_label(e) for m, e in joint.items()}
        test = {m: group_as_label(e) for m, e in test.items()}
        bank = {m: group_as_label(e) for m, e in bank.items()} if bank is not None else None
    inputs = modality_rows(test, modality)
    classnames, prototypes, used = resolve_classes(
        "zeroshot", modality_rows(joint, modality).labels(label), label=label,
        class_embeddings=None if class_embeddings is None else str(class_embeddings),
        model_dir=None if model_dir is None else str(model_dir), templates=templates)
    if len(classnames) <= 5:
        warnings.warn(f"zero-shot with {len(classnames)} classes: acc5 counts the true class "
                      f"among the top 5 of {len(classnames)}, so it means little",
                      SmallDataWarning, stacklevel=2)
    return zero_shot_classification(
        inputs, prototypes, classnames, label=label, input_key=modality,
        prototype_key="text", bridges=bridges, bank=bank, query_override=query_override,
        inversion=inversion, templates=used, ties=ties, chunk_size=chunk_size)
