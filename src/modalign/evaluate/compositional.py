"""Compositional evaluation: does a query (an image) score its true caption above hard negatives
of that caption (swapped words, replaced attributes, negations)?

``accuracy = mean_i 1[s(x_i, t_i+) > max_k s(x_i, t_ik-)]`` with exact ties counted as failures
(ARO / SugarCrepe convention); ``accuracy_<rule>`` is the same pairwise test against the
negatives of one rule only. Negatives come from :func:`modalign.data.negatives.text_negatives`
or are given per caption.

Examples:
    >>> import torch
    >>> q = torch.tensor([[1.0, 0.0]])
    >>> compositional_correct(q, torch.tensor([[1.0, 0.0]]), [torch.tensor([[0.0, 1.0]])]).tolist()
    [True]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from modalign.data.negatives import RULES, labelled_negatives
from modalign.errors import ModalignError
from modalign.evaluate.retrieval import TaskResult


def compositional_correct(queries: Tensor, positives: Tensor,
                          negatives: Sequence[Tensor]) -> Tensor:
    """Per query: its positive's score beats every negative's (ties fail).

    ``queries`` and ``positives``: (n, d); ``negatives[i]``: (k_i, d), k_i >= 1.
    """
    if len(negatives) != queries.shape[0] or positives.shape != queries.shape:
        raise ModalignError(f"compositional: {queries.shape[0]} queries need as many positives "
                            f"and negative sets, got {tuple(positives.shape)} and "
                            f"{len(negatives)}")
    k = max((len(n) for n in negatives), default=0)
    if k == 0 or any(len(n) == 0 for n in negatives):
        raise ModalignError("compositional: every query needs at least one negative")
    pad = torch.full((queries.shape[0], k, queries.shape[1]), float("nan"), dtype=queries.dtype)
    for i, n in enumerate(negatives):
        pad[i, :len(n)] = n
    pos = (queries * positives).sum(-1)
    neg = torch.einsum("nd,nkd->nk", queries, pad).nan_to_num(float("-inf"))
    return pos > neg.max(1).values


def evaluate_compositional(queries: Tensor, captions: Sequence[str],
                           encode_text: Callable[[list[str]], Tensor], *, k: int = 3,
                           rules: Sequence[str] = RULES, seed: int = 0,
                           negatives: Mapping[str, Sequence[str]] | None = None) -> TaskResult:
    """Accuracy of choosing each query's caption over its negatives.

    Args:
        queries: (n, d) joint embeddings of the queries (e.g. images), L2-normalised.
        captions: the true caption of each query.
        encode_text: texts -> (m, d) joint embeddings (e.g. ``lambda t: model.encode("text", t)``).
        k, rules, seed: of the rule-based generator.
        negatives: caption -> its negatives, instead of the generator (rule ``"given"``).

    Queries whose caption yields no negative are skipped (``num_skipped``).
    """
    if queries.shape[0] != len(captions):
        raise ModalignError(f"compositional: {queries.shape[0]} queries but {len(captions)} "
                            "captions")
    sets: list[list[tuple[str, str]]] = []
    for c in captions:
        if negatives is not None:
            sets.append([(t, "given") for t in negatives.get(c, ())])
        else:
            sets.append(labelled_negatives(c, k, rules=rules, seed=seed))
    keep = [i for i, s in enumerate(sets) if s]
    if not keep:
        raise ModalignError("compositional: no caption yields a negative")
    uniq = list(dict.fromkeys([captions[i] for i in keep] + [t for i in keep for t, _ in sets[i]]))
    table = encode_text(uniq).float()
    row = {t: j for j, t in enumerate(uniq)}
    q = queries[keep].float()
    pos = table[[row[captions[i]] for i in keep]]
    negs = [table[[row[t] for t, _ in sets[i]]] for i in keep]
    correct = compositional_correct(q, pos, negs)
    metrics = {"accuracy": float(correct.float().mean()), "num_queries": float(len(keep)),
               "num_skipped": float(len(captions) - len(keep))}
    pos_s = (q * pos).sum(-1)
    for r in dict.fromkeys(r for i in keep for _, r in sets[i]):
        wins = [bool(pos_s[a] > float(q[a] @ table[row[t]]))
                for a, i in enumerate(keep) for t, rr in sets[i] if rr == r]
        metrics[f"accuracy_{r}"] = sum(wins) / len(wins)
        metrics[f"num_{r}"] = float(len(wins))
    protocol = {"negatives": "given" if negatives is not None else "rule-based",
                "rules": list(rules), "k": k, "seed": seed, "ties": "fail"}
    return TaskResult("compositional", metrics, protocol)


def compositional_task(model_dir: str, test: Mapping[str, Any], modality: str = "image", *,
                       split: str = "test", seed: int = 0) -> TaskResult:
    """Each ``modality`` item of ``test`` against its group's caption (the ``name`` text, else any
    text of the group) and rule-based negatives of that caption, encoded by the text tower of
    the model in ``model_dir``; ``split`` only names the split in errors.

    Examples:
        >>> compositional_task("no/such/model", {})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        modalign.errors.ModalignError: --modality 'image': not among the embeddings ([])
    """
    import numpy as np

    from modalign.evaluate.runner import modality_rows

    queries, texts = modality_rows(test, modality), modality_rows(test, "text")
    from modalign.model import MultiTowerModel

    model = MultiTowerModel.from_pretrained(model_dir)
    if "text" not in model.modalities:
        raise ModalignError(f"--task compositional: the model {model_dir} has no text tower")
    caption: dict[str, str] = {}
    for it in sorted(texts.items, key=lambda it: it.get("view") != "name"):
        if it.get("value"):
            caption.setdefault(it["group"], str(it["value"]))
    rows = [i for i, it in enumerate(queries.items) if it["group"] in caption]
    if not rows:
        raise ModalignError(f"--task compositional: no {modality} item of --split "
                            f"{split!r} has a caption in its group")
    z = torch.as_tensor(np.asarray(queries.vectors))[rows]
    return evaluate_compositional(z, [caption[queries.items[i]["group"]] for i in rows],
                                  lambda t: model.encode("text", t), seed=seed)
