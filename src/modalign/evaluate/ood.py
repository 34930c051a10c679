"""Out-of-distribution detection with a joint space: scores, exact metrics, bootstrap intervals.

Scores (higher = more in-distribution), from the cosines ``s_k = cos(e(x), p_k)`` of an input to
the ``K`` class prototypes (prompt embeddings of the ID classes) at temperature ``tau``:

    ==============  ====================================================================
    ``mcm``         ``max_k softmax(s / tau)_k`` (MCM, Ming et al. 2022; ``tau = 1``)
    ``energy``      ``tau * logsumexp_k(s_k / tau)`` (negative free energy)
    ``max_logit``   ``max_k s_k``
    ``knn``         cosine to the ``k``-th nearest ID training embedding (a joint-space
                    nearest-neighbour baseline; needs a bank)
    ==============  ====================================================================

Metrics (positive = ID; MCM's convention), computed exactly from the two score samples:

* ``auroc`` = ``P(s_ID > s_OOD) + P(s_ID = s_OOD) / 2`` (Mann-Whitney).
* ``aupr_in`` = average precision with ID positive (a step function over distinct thresholds,
  tied scores grouped, as scikit-learn's ``average_precision_score``); ``aupr_out`` the same with
  OOD positive and negated scores.
* ``fpr@95tpr``: ``t*`` = the largest threshold with at least 95% of ID scores ``>= t*``; the
  share of OOD scores ``>= t*`` (ties at ``t*`` are all accepted). MCM's code takes the recall
  nearest 0.95 and CMA's interpolates the ROC curve; this one never goes below 95% TPR.

Intervals: percentile bootstrap, ID and OOD resampled independently.

Examples:
    >>> import numpy as np
    >>> m = ood_metrics(np.array([0.9, 0.8, 0.7]), np.array([0.75, 0.1]))
    >>> round(m["auroc"], 4), round(m["aupr_in"], 4), m["fpr@95tpr"]
    (0.8333, 0.9167, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.embed.store import Embeddings
from modalign.errors import ModalignError
from modalign.evaluate.retrieval import TaskResult, as_unit_tensor
from modalign.evaluate.runner import data_and_split, parse_ood_values

SCORES: tuple[str, ...] = ("mcm", "energy", "max_logit", "knn")
"""Score names accepted by :func:`ood_detection`."""

METRICS: tuple[str, ...] = ("auroc", "fpr@95tpr", "aupr_in", "aupr_out")


# --------------------------------------------------------------------------------------------
# scores


def mcm_scores(similarities: Tensor, temperature: float = 1.0) -> Tensor:
    """MCM: ``max_k softmax(s / tau)_k`` per row of ``(n, K)`` cosines, in float64.

    Examples:
        >>> mcm_scores(torch.zeros(2, 4)).tolist()
        [0.25, 0.25]
    """
    s = _check_similarities(similarities, temperature)
    return torch.softmax(s / temperature, dim=1).amax(dim=1)


def energy_scores(similarities: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy ``tau * logsumexp(s / tau)`` per row, float64.

    Examples:
        >>> round(float(energy_scores(torch.zeros(1, 4))[0]), 4)  # log 4
        1.3863
    """
    s = _check_similarities(similarities, temperature)
    return temperature * torch.logsumexp(s / temperature, dim=1)


def max_logit_scores(similarities: Tensor) -> Tensor:
    """``max_k s_k`` per row, float64.

    Examples:
        >>> max_logit_scores(torch.tensor([[0.1, 0.5]])).tolist()
        [0.5]
    """
    return _check_similarities(similarities, 1.0).amax(dim=1)


def knn_scores(inputs: Tensor, bank: Tensor, k: int = 1, *, block: int = 4096) -> Tensor:
    """Cosine similarity of each (normalised) input to its ``k``-th nearest (normalised) bank row.

    Higher = closer to the ID training data; equal to ``1 - d^2 / 2`` with ``d`` the Euclidean
    distance on the sphere, so it ranks inputs as the ``k``-NN distance does.

    Examples:
        >>> bank = torch.eye(3)
        >>> [round(v, 4) for v in knn_scores(torch.tensor([[1.0, 0, 0], [1, 1, 0]]), bank).tolist()]
        [1.0, 0.7071]
    """
    if not isinstance(k, int) or k < 1:
        raise ModalignError(f"k={k!r}: expected an integer >= 1")
    x = _unit_matrix("inputs", inputs)
    b = _unit_matrix("bank", bank)
    if b.shape[1] != x.shape[1]:
        raise ModalignError(f"bank: expected dimension {x.shape[1]}, got {b.shape[1]}")
    if len(b) < k:
        raise ModalignError(f"k={k}: the bank has only {len(b)} rows")
    out = torch.empty(len(x), dtype=x.dtype)
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ b.T
        out[start : start + block] = sims.topk(k, dim=1).values[:, -1]
    return out


# --------------------------------------------------------------------------------------------
# metrics


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """``P(s_ID > s_OOD) + P(tie) / 2``, exact (average ranks), ID positive.

    Examples:
        >>> auroc(np.array([1.0, 1.0]), np.array([1.0]))
        0.5
    """
    pos, neg = _check_scores(id_scores, ood_scores)
    both = np.concatenate([pos, neg])
    ranks = _average_ranks(both)
    n1, n0 = len(pos), len(neg)
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def average_precision(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Average precision with the first sample positive: ``sum_t (R_t - R_{t-1}) P_t``.

    Thresholds ``t`` run over the distinct scores, high to low; tied scores enter together.

    Examples:
        >>> round(average_precision(np.array([0.9, 0.8, 0.7]), np.array([0.75, 0.1])), 4)
        0.9167
    """
    pos, neg = _check_scores(pos_scores, neg_scores)
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]  # end of each tie group
    tp = np.cumsum(is_pos)[last]
    predicted = last + 1.0
    precision = tp / predicted
    recall_step = np.diff(np.r_[0.0, tp]) / len(pos)
    return float((recall_step * precision).sum())


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Share of OOD scores ``>= t*``, ``t*`` the largest threshold keeping ``>= tpr`` of ID.

    Examples:
        >>> fpr_at_tpr(np.array([0.9, 0.8, 0.7]), np.array([0.75, 0.1]))
        0.5
    """
    if not 0.0 < tpr <= 1.0:
        raise ModalignError(f"tpr={tpr!r}: expected a number in (0, 1]")
    pos, neg = _check_scores(id_scores, ood_scores)
    need = math.ceil(tpr * len(pos) - 1e-9)  # ID samples that must be accepted
    threshold = np.sort(pos)[::-1][need - 1]
    return float((neg >= threshold).mean())


def ood_metrics(id_scores: np.ndarray | Tensor, ood_scores: np.ndarray | Tensor,
                tpr: float = 0.95) -> dict[str, float]:
    """``auroc``, ``fpr@95tpr``, ``aupr_in`` and ``aupr_out`` of one score (higher = ID).

    Examples:
        >>> sorted(ood_metrics(np.array([1.0, 2.0]), np.array([0.0])))
        ['aupr_in', 'aupr_out', 'auroc', 'fpr@95tpr']
    """
    pos = _as_numpy(id_scores)
    neg = _as_numpy(ood_scores)
    return {
        "auroc": auroc(pos, neg),
        f"fpr@{round(100 * tpr)}tpr": fpr_at_tpr(pos, neg, tpr),
        "aupr_in": average_precision(pos, neg),
        "aupr_out": average_precision(-neg, -pos),
    }


def bootstrap_intervals(id_scores: np.ndarray | Tensor, ood_scores: np.ndarray | Tensor, *,
                        n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                        metric: Callable[..., dict[str, float]] = ood_metrics,
                        ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric; ID and OOD are resampled independently.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> ci = bootstrap_intervals(rng.normal(1, 1, 200), rng.normal(0, 1, 200), n_boot=200)
        >>> lo, hi = ci["auroc"]
        >>> bool(0.6 < lo < hi < 0.9)
        True
    """
    if not isinstance(n_boot, int) or n_boot < 2:
        raise ModalignError(f"n_boot={n_boot!r}: expected an integer >= 2")
    if not 0.0 < level < 1.0:
        raise ModalignError(f"level={level!r}: expected a number in (0, 1)")
    pos = _as_numpy(id_scores)
    neg = _as_numpy(ood_scores)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        values = metric(pos[rng.integers(0, len(pos), len(pos))],
                        neg[rng.integers(0, len(neg), len(neg))])
        for key, value in values.items():
            draws.setdefault(key, []).append(value)
    alpha = (1.0 - level) / 2.0
    return {key: (float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha)))
            for key, v in draws.items()}


def bootstrap_difference(id_a: np.ndarray | Tensor, ood_a: np.ndarray | Tensor,
                         id_b: np.ndarray | Tensor, ood_b: np.ndarray | Tensor, *,
                         n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                         ) -> dict[str, tuple[float, float, float]]:
    """Paired bootstrap of ``metric(b) - metric(a)`` for two scorings of the *same* inputs.

    Both scorings see the same resampled ID and OOD rows in each replicate, so the interval is
    that of the change, not of either model. Returns ``metric -> (difference, lo, hi)``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> i, o = rng.normal(1, 1, 100), rng.normal(0, 1, 100)
        >>> d = bootstrap_difference(i, o, 2 * i, 2 * o, n_boot=50)  # same ranking
        >>> d["auroc"]
        (0.0, 0.0, 0.0)
    """
    if not isinstance(n_boot, int) or n_boot < 2:
        raise ModalignError(f"n_boot={n_boot!r}: expected an integer >= 2")
    ia, oa, ib, ob = (_as_numpy(v).ravel() for v in (id_a, ood_a, id_b, ood_b))
    if len(ia) != len(ib) or len(oa) != len(ob):
        raise ModalignError("id_a/id_b and ood_a/ood_b: expected scores of the same inputs "
                            f"(got {len(ia)} vs {len(ib)} ID, {len(oa)} vs {len(ob)} OOD)")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        ri, ro = rng.integers(0, len(ia), len(ia)), rng.integers(0, len(oa), len(oa))
        ma, mb = ood_metrics(ia[ri], oa[ro]), ood_metrics(ib[ri], ob[ro])
        for key in ma:
            draws.setdefault(key, []).append(mb[key] - ma[key])
    point_a, point_b = ood_metrics(ia, oa), ood_metrics(ib, ob)
    alpha = (1.0 - level) / 2.0
    return {key: (point_b[key] - point_a[key], float(np.quantile(v, alpha)),
                  float(np.quantile(v, 1.0 - alpha))) for key, v in draws.items()}


# --------------------------------------------------------------------------------------------
# the task


def ood_detection(
    id_inputs: Embeddings,
    ood_inputs: Embeddings,
    prototypes: Tensor,
    classnames: Sequence[str],
    *,
    label: str,
    temperature: float = 1.0,
    scores: Sequence[str] = ("mcm", "energy", "max_logit", "knn"),
    bank: Embeddings | None = None,
    k: int = 1,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    templates: Sequence[str] = (),
) -> TaskResult:
    """Score ID and OOD inputs against the ID class prototypes; metrics, intervals, ID accuracy.

    Args:
        id_inputs: in-distribution inputs (e.g. test images of the ID classes).
        ood_inputs: out-of-distribution inputs (same modality, classes outside ``classnames``).
        prototypes: ``(K, d)`` prototypes of the ID classes (see
            :func:`modalign.evaluate.zeroshot.encode_prototypes`).
        classnames: label value of each prototype row.
        label: label name holding the class of ``id_inputs`` (for the ID accuracy).
        temperature: ``tau`` of ``mcm`` and ``energy`` (MCM uses 1 on cosines).
        scores: which of :data:`SCORES` to compute; ``knn`` needs ``bank``.
        bank: ID training embeddings of the same modality (the ``knn`` reference set).
        k: neighbour rank of ``knn``.
        n_boot: bootstrap replicates for the intervals (0 disables them).
        level: interval coverage.
        seed: bootstrap seed.
        templates: the templates that built the prototypes, for the protocol.

    Returns:
        A :class:`TaskResult` with ``{score}/{metric}``, ``{score}/{metric}_lo`` and ``_hi``, and
        the zero-shot accuracy of the ID inputs (``id_acc1``, ``id_acc5``,
        ``id_mean_per_class_recall``).

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> emb = toy_embeddings()["image"]
        >>> names = sorted(set(emb.labels("subgroup")))
        >>> protos = torch.randn(len(names), emb.dim)
        >>> half = len(emb) // 2
        >>> r = ood_detection(emb.subset(range(half)), emb.subset(range(half, len(emb))),
        ...                   protos, names, label="subgroup", scores=["mcm"], n_boot=0)
        >>> sorted(r.metrics)[:3]
        ['id_acc1', 'id_acc5', 'id_mean_per_class_recall']
    """
    from modalign.evaluate.zeroshot import zero_shot_classification

    unknown = [s for s in scores if s not in SCORES]
    if unknown or not scores:
        raise ModalignError(f"scores={list(scores)!r}: expected some of {', '.join(SCORES)}")
    if "knn" in scores and bank is None:
        raise ModalignError("scores: 'knn' needs bank (the ID training embeddings)")
    if len(id_inputs) == 0 or len(ood_inputs) == 0:
        raise ModalignError(f"expected ID and OOD inputs, got {len(id_inputs)} ID and "
                            f"{len(ood_inputs)} OOD rows")
    if not isinstance(n_boot, int) or n_boot < 0 or n_boot == 1:
        raise ModalignError(f"n_boot={n_boot!r}: expected 0 (no intervals) or an integer >= 2")
    protos = _unit_matrix("prototypes", prototypes)
    if len(protos) != len(classnames):
        raise ModalignError(f"prototypes: expected {len(classnames)} rows (one per class name), "
                            f"got {len(protos)}")
    x_id, x_ood = as_unit_tensor(id_inputs).double(), as_unit_tensor(ood_inputs).double()
    score_fns: dict[str, Callable[[Tensor], Tensor]] = {
        "mcm": lambda x: mcm_scores(x @ protos.T, temperature),
        "energy": lambda x: energy_scores(x @ protos.T, temperature),
        "max_logit": lambda x: max_logit_scores(x @ protos.T),
        "knn": lambda x: knn_scores(x, as_unit_tensor(bank).double(), k),  # type: ignore[arg-type]
    }
    metrics: dict[str, float] = {}
    for name in scores:
        s_id, s_ood = score_fns[name](x_id), score_fns[name](x_ood)
        values = ood_metrics(s_id, s_ood)
        metrics.update({f"{name}/{key}": v for key, v in values.items()})
        if n_boot:
            ci = bootstrap_intervals(s_id, s_ood, n_boot=n_boot, level=level,
                                     seed=seed + SCORES.index(name))
            for key, (lo, hi) in ci.items():
                metrics[f"{name}/{key}_lo"], metrics[f"{name}/{key}_hi"] = lo, hi
    zs = zero_shot_classification(id_inputs, protos.float(), classnames, label=label)
    metrics.update({f"id_{key}": v for key, v in zs.metrics.items()})
    protocol: dict[str, Any] = {
        "label": label, "num_id": len(id_inputs), "num_ood": len(ood_inputs),
        "num_classes": len(classnames), "scores": list(scores), "temperature": temperature,
        "knn_k": k if "knn" in scores else None, "positive": "ID", "higher_score": "ID",
        "fpr": "largest threshold keeping >= 95% ID, ties accepted",
        "aupr": "average precision (step), tied scores grouped",
        "intervals": {"method": "percentile bootstrap, ID and OOD resampled independently",
                      "replicates": n_boot, "level": level, "seed": seed} if n_boot else None,
        "templates": list(templates),
    }
    return TaskResult("ood", metrics, protocol)


# --------------------------------------------------------------------------------------------
# helpers


def _check_similarities(similarities: Tensor, temperature: float) -> Tensor:
    if not isinstance(similarities, Tensor) or similarities.ndim != 2 or similarities.shape[1] < 1:
        raise ModalignError(f"similarities: expected an (n, K) tensor with K >= 1, got "
                            f"{getattr(similarities, 'shape', type(similarities).__name__)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ModalignError(f"temperature={temperature!r}: expected a finite number > 0")
    return similarities.double()


def _unit_matrix(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or len(x) == 0:
        raise ModalignError(f"{name}: expected a non-empty (n, d) tensor, got "
                            f"{getattr(x, 'shape', type(x).__name__)}")
    return F.normalize(x.double(), dim=1)


def _as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_scores(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _as_numpy(pos).ravel()
    n = _as_numpy(neg).ravel()
    if len(p) == 0 or len(n) == 0:
        raise ModalignError(f"scores: expected both samples non-empty, got {len(p)} positive and "
                            f"{len(n)} negative")
    if not (np.isfinite(p).all() and np.isfinite(n).all()):
        raise ModalignError("scores: expected finite values")
    return p, n


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x) != 0) + 1]
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def split_by_label(embeddings: Embeddings, label: str, ood_values: Sequence[str]
                   ) -> tuple[Embeddings, Embeddings]:
    """Rows whose ``label`` is not / is in ``ood_values``: (ID, OOD).

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> emb = toy_embeddings()["image"]
        >>> ind, ood = split_by_label(emb, "subgroup", ["s0"])
        >>> len(ind) + len(ood) == len(emb)
        True
    """
    values = embeddings.labels(label)
    held = set(ood_values)
    if not held & set(values):
        raise ModalignError(f"ood_values={sorted(held)!r}: no row has such a {label!r} label")
    mask = np.array([v in held for v in values])
    return embeddings.subset(~mask), embeddings.subset(mask)


def metrics_by_score(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"mcm/auroc": v, ...}`` -> ``{"mcm": {"auroc": v, ...}, ...}`` (for tables).

    Examples:
        >>> metrics_by_score({"mcm/auroc": 0.9, "id_acc1": 0.5})
        {'mcm': {'auroc': 0.9}}
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        score, sep, metric = key.partition("/")
        if sep:
            out.setdefault(score, {})[metric] = value
    return out


# --------------------------------------------------------------------------------------------
# the task as ``modalign eval --task ood`` runs it


def ood_task(s: Any) -> tuple[TaskResult, str]:
    """Run ``--task ood`` from :class:`~modalign.evaluate.runner.EvalSettings` (``data``,
    ``split``, ``model``, ``embeddings``, ``modality``, ``label``, ``ood_values`` or
    ``out_data``, ``templates``, ``class_embeddings``, ``scores``, ``temperature``, ``knn_k``,
    ``bank_split``, ``bootstrap``, ``seed``); returns the result and the dataset name for the
    record. :func:`modalign.evaluate.run` is the usual entry point."""
    from modalign.embed.joint import load_joint
    from modalign.evaluate.zeroshot import DEFAULT_TEMPLATES, resolve_classes

    if s.data is None and s.embeddings is None:
        raise ModalignError("--task ood: pass --in DATA (with --model) or --embeddings DIR")
    data, split = data_and_split(s.data, s.split) if s.data else (None, s.split)
    joint = load_joint(model_dir=s.model, embeddings_dir=s.embeddings,
                       data=data if s.model else None, modalities=[s.modality])
    if s.modality not in joint:
        raise ModalignError(f"--modality {s.modality!r}: no such embeddings")
    emb = joint[s.modality]
    ind = emb.filter(split=split) if split else emb
    bank = emb.filter(split=s.bank_split)
    excluded: set[str] = set()
    if s.ood_values:
        name, held = parse_ood_values(s.ood_values)
        ind, ood = split_by_label(ind, name, held)
        excluded = {v for v in ood.labels(s.label) if v}
        keep = np.array([v not in set(held) for v in bank.labels(name)], dtype=bool)
        bank = bank.subset(keep)
    elif s.out_data:
        if s.model is None:
            raise ModalignError("--out-data needs --model (its towers encode the OOD data)")
        out_data, out_split = data_and_split(s.out_data, s.split)
        out = load_joint(model_dir=s.model, data=out_data, modalities=[s.modality])
        ood = out[s.modality].filter(split=out_split) if out_split else out[s.modality]
    else:
        raise ModalignError("--task ood needs OOD inputs: --out-data DATA[:split] or "
                            "--ood-values LABEL=V1,V2")
    templates: tuple[str, ...] = tuple(s.templates) if s.templates else DEFAULT_TEMPLATES
    classnames, protos, templates = resolve_classes(
        "ood", emb.labels(s.label), label=s.label, class_embeddings=s.class_embeddings,
        model_dir=s.model, templates=templates, exclude=frozenset(excluded))
    keep = np.array([v in set(classnames) for v in ind.labels(s.label)], dtype=bool)
    ind = ind.subset(keep)
    result = ood_detection(ind, ood, protos, classnames, label=s.label,
                           temperature=s.temperature, scores=list(s.scores),
                           bank=bank if len(bank) else None, k=s.knn_k, n_boot=s.bootstrap,
                           seed=s.seed, templates=templates)
    result.protocol.update({"inputs": s.modality, "id_data": s.data,
                            "ood": s.ood_values or s.out_data, "bank_split": s.bank_split})
    dataset = s.data or Path(str(s.embeddings)).name
    return result, str(dataset)
