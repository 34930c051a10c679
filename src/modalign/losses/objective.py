"""Objectives as data: a weighted list of (loss, modalities) terms, and pairwise N-modal sums.

A training config declares its objective as a list of terms::

    [{"loss": "clip", "modalities": ["image", "text"], "weight": 1.0, "temperature": 0.07},
     {"loss": "uniformity", "modalities": ["image", "text"], "weight": 1.0},
     {"loss": "intra", "modalities": ["image", "image:openmoji"], "weight": 0.5}]

:func:`build_objective` turns it into an :class:`Objective`, whose output is the weighted sum
``sum_k w_k L_k`` with every unweighted term under its label (``"clip[image,text]"``) and every
term's own parts under ``"<label>/<part>"``.

Examples:
    >>> import torch
    >>> obj = build_objective([
    ...     {"loss": "clip", "modalities": ["image", "text"]},
    ...     {"loss": "alignment", "modalities": ["image", "text"], "weight": 0.5},
    ... ])
    >>> emb = {"image": torch.randn(8, 4), "text": torch.randn(8, 4)}
    >>> out = obj(emb)
    >>> sorted(out.parts)[:2]
    ['alignment[image,text]', 'clip[image,text]']
    >>> parts = out.parts
    >>> torch.allclose(out.loss, parts["clip[image,text]"] + 0.5 * parts["alignment[image,text]"])
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modalign.errors import ModalignError
from modalign.losses.base import LossModule, as_modalities
from modalign.losses.output import LossOutput
from modalign.losses.registry import build_loss, loss_class, register_loss

Reduction = Literal["sum", "mean"]


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of an objective.

    Args:
        loss: a registered loss name (built with ``modalities`` and ``params``) or a loss module.
        modalities: the embedding keys the term reads (used to build it, and in its label).
        weight: the term's weight in the total (finite; 0 keeps it logged but without gradient).
        params: constructor keyword arguments for a named loss.
        label: the name of the term in the output parts (default ``"loss[mod1,mod2]"``).
    """

    loss: str | nn.Module
    modalities: tuple[str, ...]
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> LossTerm:
        """Read ``{"loss": ..., "modalities": [...], "weight": w, "label": ..., **params}``."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"a loss term must be a mapping, got {type(spec).__name__}")
        spec = dict(spec)
        if "loss" not in spec or "modalities" not in spec:
            raise ValueError(f"a loss term needs 'loss' and 'modalities' keys, got {sorted(spec)}")
        loss = spec.pop("loss")
        modalities = as_modalities(spec.pop("modalities"), name="modalities")
        weight = spec.pop("weight", 1.0)
        label = spec.pop("label", None)
        params = dict(spec.pop("params", {}))
        params.update(spec)
        return cls(loss, modalities, float(weight), params, label)

    def name(self) -> str:
        """The term's label in the output parts."""
        if self.label is not None:
            return self.label
        base = self.loss if isinstance(self.loss, str) else type(self.loss).__name__
        return f"{base}[{','.join(self.modalities)}]"


class Objective(nn.Module):
    """A weighted sum of loss terms; passes each term the per-batch inputs it declares.

    ``groups`` go to every term and are refused (``ModalignError`` naming the term) by a term that
    would ignore them; ``indices`` go to the terms that declare ``needs_indices``, ``anchor_rows``
    to those that declare ``needs_anchor_rows``. A term that is a plain ``nn.Module`` (not a
    :class:`~modalign.losses.base.LossModule`) receives ``groups`` and ``indices``.

    Args:
        terms: :class:`LossTerm` objects or plain dicts (see :meth:`LossTerm.from_dict`).
        dataset_size: passed to the terms whose loss declares ``needs_dataset_size`` (iSogCLR's
            per-sample state) unless their params give it.

    Examples:
        >>> obj = Objective([LossTerm("clip", ("image", "text"))])
        >>> obj.labels, obj.needs_indices
        (['clip[image,text]'], False)
    """

    def __init__(self, terms: Sequence[LossTerm | Mapping[str, Any]], *,
                 dataset_size: int | None = None) -> None:
        super().__init__()
        if isinstance(terms, (str, Mapping)) or not isinstance(terms, Sequence) or not terms:
            raise ValueError("terms must be a non-empty list of loss terms")
        parsed = [t if isinstance(t, LossTerm) else LossTerm.from_dict(t) for t in terms]
        self.labels: list[str] = []
        self.weights: list[float] = []
        self.terms = nn.ModuleList()
        for term in parsed:
            if not math.isfinite(term.weight):
                raise ValueError(f"weight of {term.name()} must be finite, got {term.weight}")
            if term.name() in self.labels:
                raise ValueError(f"two terms are labelled {term.name()!r}; give one a 'label'")
            if isinstance(term.loss, nn.Module):
                if term.params:
                    raise ValueError(f"params of {term.name()} must be empty when loss is a module")
                module = term.loss
            else:
                params = dict(term.params)
                declares = getattr(loss_class(term.loss), "needs_dataset_size", False)
                if dataset_size is not None and declares:
                    params.setdefault("dataset_size", dataset_size)
                module = build_loss(term.loss, modalities=list(term.modalities), **params)
            self.labels.append(term.name())
            self.weights.append(term.weight)
            self.terms.append(module)

    @property
    def needs_indices(self) -> bool:
        """Whether a term needs the dataset index of every row."""
        return any(getattr(m, "needs_indices", False) for m in self.terms)

    @property
    def distributed(self) -> bool:
        """Whether every term is exact across processes (see ``LossModule.distributed``)."""
        return all(getattr(m, "distributed", False) for m in self.terms)

    def forward(
        self,
        embeddings: Mapping[str, Tensor],
        *,
        groups: Tensor | None = None,
        indices: Tensor | None = None,
        anchor_rows: Tensor | None = None,
    ) -> LossOutput:
        if groups is not None:
            refusing = [label for label, m in zip(self.labels, self.terms, strict=True)
                        if isinstance(m, LossModule) and not m.supports_groups]
            if refusing:
                raise ModalignError(f"objective terms {refusing} do not use groups (shared "
                                    "positives); call the objective without groups or drop them")
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for label, weight, module in zip(self.labels, self.weights, self.terms, strict=True):
            inputs: dict[str, Tensor | None] = {"groups": groups}
            if not isinstance(module, LossModule) or module.needs_indices:
                inputs["indices"] = indices
            if getattr(module, "needs_anchor_rows", False):
                inputs["anchor_rows"] = anchor_rows
            out = module(embeddings, **inputs)
            parts[label] = out.loss
            for key, value in out.parts.items():
                parts[f"{label}/{key}"] = value
            contribution = weight * out.loss
            total = contribution if total is None else total + contribution
        assert total is not None
        return LossOutput(total, parts)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Call ``clamp_()`` on every term that has one (after each optimiser step)."""
        for module in self.terms:
            _clamp_tree(module)

    def log_scales(self) -> dict[str, Tensor]:
        """Every temperature of the objective as its ``log_logit_scale`` tensor (the parameter or
        buffer itself), keyed by term label, ``label/path`` for one inside a term (``pairwise``'s
        ``losses.0``, ...). The first entry is the scale a trained model reports.

        Examples:
            >>> obj = build_objective([{"loss": "clip", "modalities": ["a", "b"]},
            ...                        {"loss": "siglip", "modalities": ["a", "b"]}])
            >>> {k: round(float(v.detach().exp()), 3) for k, v in obj.log_scales().items()}
            {'clip[a,b]': 14.286, 'siglip[a,b]': 10.0}
        """
        out: dict[str, Tensor] = {}
        for label, term in zip(self.labels, self.terms, strict=True):
            for path, module in term.named_modules():
                scale = getattr(module, "log_logit_scale", None)
                if isinstance(scale, Tensor):
                    out[label + (f"/{path}" if path else "")] = scale
        return out


def build_objective(spec: Sequence[LossTerm | Mapping[str, Any]] | Mapping[str, Any], *,
                    dataset_size: int | None = None) -> Objective:
    """Build an :class:`Objective` from a list of terms or ``{"terms": [...]}`` (``dataset_size``:
    see :class:`Objective`).

    Examples:
        >>> build_objective({"terms": [{"loss": "siglip", "modalities": ["a", "b"]}]}).labels
        ['siglip[a,b]']
    """
    if isinstance(spec, Mapping):
        if "terms" not in spec:
            raise ValueError(
                f"spec must be a list of terms or a mapping with 'terms', got {sorted(spec)}"
            )
        return Objective(spec["terms"], dataset_size=dataset_size)
    return Objective(spec, dataset_size=dataset_size)


PairSpec = Literal["all", "anchor"] | Sequence[Sequence[str]]


@register_loss("pairwise")
class PairwiseLoss(LossModule):
    """Apply a two-modality loss to several pairs of N modalities, with weights; sum or mean.

    Args:
        modalities: the N modality keys.
        base_loss: registered name of the two-modality loss applied to each pair.
        pairs: ``"all"`` (every unordered pair, in declared order), ``"anchor"`` (``anchor`` against
            every other modality), or an explicit list of pairs.
        anchor: the anchor modality for ``pairs="anchor"`` (default: the first modality).
        weights: one weight per pair (same order as the pairs), default all 1.
        reduction: ``"sum"`` gives sum_p w_p L_p; ``"mean"`` gives sum_p w_p L_p / sum_p w_p.
        skip_missing: skip pairs whose embeddings are absent from a batch (else ValueError).
        **params: constructor arguments of ``base_loss``.

    Examples:
        >>> import torch
        >>> loss = PairwiseLoss(["image", "text", "audio"], base_loss="clip", pairs="anchor")
        >>> loss.pairs
        [('image', 'text'), ('image', 'audio')]
        >>> emb = {m: torch.randn(4, 3) for m in ["image", "text", "audio"]}
        >>> sorted(loss(emb).parts)[:2]
        ['image,audio', 'image,audio/audio-to-image']
    """

    max_modalities = None
    open_parameters = True

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        base_loss: str = "clip",
        pairs: PairSpec = "all",
        anchor: str | None = None,
        weights: Sequence[float] | None = None,
        reduction: Reduction = "sum",
        skip_missing: bool = False,
        **params: Any,
    ) -> None:
        super().__init__(modalities)
        self.pairs = _resolve_pairs(self.modalities, pairs, anchor)
        if weights is None:
            weights = [1.0] * len(self.pairs)
        weights = [float(w) for w in weights]
        if len(weights) != len(self.pairs) or not all(math.isfinite(w) for w in weights):
            raise ValueError(
                f"weights must hold {len(self.pairs)} finite numbers (one per pair {self.pairs}), "
                f"got {weights}"
            )
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if reduction == "mean" and sum(weights) <= 0:
            raise ValueError("weights must have a positive sum for reduction='mean'")
        self.weights = weights
        self.reduction = reduction
        self.skip_missing = skip_missing
        self.losses = nn.ModuleList(
            build_loss(base_loss, modalities=list(p), **params) for p in self.pairs
        )
        # what the pairs' loss declares, this loss declares (a plain module: the old contract,
        # groups and indices passed through)
        base = loss_class(base_loss)
        self.supports_groups = getattr(base, "supports_groups", True)
        self.needs_indices = getattr(base, "needs_indices", True)
        self.distributed = getattr(base, "distributed", False)

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        total: Tensor | None = None
        weight_sum = 0.0
        parts: dict[str, Tensor] = {}
        for k, ((a, b), w) in enumerate(zip(self.pairs, self.weights, strict=True)):
            if self.skip_missing and (a not in embeddings or b not in embeddings):
                continue
            inputs = {"indices": indices} if self.needs_indices else {}
            out = self.losses[k](embeddings, groups=groups, **inputs)
            label = f"{a},{b}"
            parts[label] = out.loss
            for key, value in out.parts.items():
                parts[f"{label}/{key}"] = value
            total = w * out.loss if total is None else total + w * out.loss
            weight_sum += w
        if total is None:
            raise ValueError(
                f"embeddings hold none of the pairs {self.pairs}; got keys {sorted(embeddings)}"
            )
        if self.reduction == "mean":
            total = total / weight_sum
        return LossOutput(total, parts)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the logit scale of every pair's loss."""
        for module in self.losses:
            _clamp_tree(module)


def _resolve_pairs(
    modalities: tuple[str, ...], pairs: PairSpec, anchor: str | None
) -> list[tuple[str, str]]:
    if pairs == "all":
        return list(itertools.combinations(modalities, 2))
    if pairs == "anchor":
        anchor = modalities[0] if anchor is None else anchor
        if anchor not in modalities:
            raise ValueError(f"anchor must be one of {modalities}, got {anchor!r}")
        return [(anchor, m) for m in modalities if m != anchor]
    if isinstance(pairs, str) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(
            f"pairs must be 'all', 'anchor' or a non-empty list of pairs, got {pairs!r}"
        )
    out: list[tuple[str, str]] = []
    for p in pairs:
        pair = as_modalities(p, 2, name="pairs")
        if any(m not in modalities for m in pair):
            raise ValueError(f"pairs entry {pair} uses a modality not in {modalities}")
        out.append((pair[0], pair[1]))
    return out


def _clamp_tree(module: nn.Module) -> None:
    """Call clamp_ on ``module`` if it has one, else on its children (recursively)."""
    clamp = getattr(module, "clamp_", None)
    if callable(clamp):
        clamp()
        return
    for child in module.children():
        _clamp_tree(child)
