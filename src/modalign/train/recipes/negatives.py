"""Compositional hard negatives in training (the image-grounded contrast, IGC, of DeGLA,
"Decoupled Global-Local Alignment", Hu et al. 2025), with the shipped rule-based text negatives.

Each training caption (a text row's ``value``) gets ``k`` negatives from
:func:`modalign.data.negatives.text_negatives` (swap, replace, negate), or from a JSON file
mapping a caption to its negatives; their tower features are computed once by the text tower when
training starts. For a query key ``a`` (e.g. image) and the text key ``t``, with ``z_a``, the
positive ``z_t`` and the negatives ``n_1..n_k`` of the row's caption::

    L_IGC = mean_i -log( exp(s z_a.z_t) / (exp(s z_a.z_t) + sum_k exp(s z_a.n_ik)) )

(only the sample's own caption and its own negatives in the softmax; ``s`` a learnable logit
scale). It is added to the objectives with ``negatives.weight`` (DeGLA: 0.1 beside the global
CLIP term). Rows without a caption or without negatives are left out of the mean. Per-sample, so
it needs no gather under ``torchrun``. Not implemented: DeGLA's text-grounded contrast (TGC) and
its EMA self-distillation; generated image or audio negatives.

Examples:
    >>> cfg = NegativesConfig(k=3)
    >>> cfg.enabled
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modalign.data.negatives import RULES, text_negatives
from modalign.errors import ModalignError

MIN_SCALE, MAX_SCALE = 1.0, 100.0


@dataclass
class NegativesConfig:
    """The ``[negatives]`` section: hard negative captions per item (``k = 0``: off)."""

    k: int = 0
    weight: float = 0.1
    rules: list[str] = field(default_factory=lambda: list(RULES))
    text_key: str = "text"
    file: str = ""
    seed: int = 0
    temperature: float = 0.07

    @property
    def enabled(self) -> bool:
        """Whether the recipe runs (``k > 0``)."""
        return self.k > 0

    def check(self, keys: Sequence[str], accumulate: int) -> None:
        """Raise :class:`ModalignError` naming the first bad key."""
        if self.k < 0:
            raise ModalignError(f"negatives.k must be >= 0 (0: off), got {self.k!r}")
        if not self.enabled:
            return
        if self.text_key not in keys:
            raise ModalignError(f"negatives.text_key={self.text_key!r} is not in data.keys "
                                f"{list(keys)}")
        unknown = [r for r in self.rules if r not in RULES]
        if unknown or not self.rules:
            raise ModalignError(f"negatives.rules={self.rules!r}: expected some of {list(RULES)}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ModalignError(f"negatives.weight must be a finite number >= 0, "
                                f"got {self.weight!r}")
        if accumulate > 1:
            raise ModalignError("negatives.k > 0 needs train.accumulate = 1 (the negatives are "
                                "embedded with the step's gradient)")
        if not 1 / MAX_SCALE <= self.temperature <= 1 / MIN_SCALE:
            raise ModalignError(f"negatives.temperature must be in [{1 / MAX_SCALE}, "
                                f"{1 / MIN_SCALE}], got {self.temperature!r}")


HELP: dict[str, str] = {
    "negatives.k": "hard negative captions per training caption (image-grounded contrast, "
                   "DeGLA's IGC; 0: off)",
    "negatives.weight": "weight of the hard-negative loss added to the objectives",
    "negatives.rules": "rules of the shipped generator: some of ['swap', 'replace', 'negate']",
    "negatives.text_key": "the key whose rows carry the captions (their 'value')",
    "negatives.file": "a JSON file {caption: [negative, ...]} used instead of the generator",
    "negatives.seed": "seed of the generator",
    "negatives.temperature": "initial temperature of the recipe's learnable logit scale",
}


def igc_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``mean_i -log softmax([s q.p, s q.n_1.. s q.n_k])_0`` over rows with a negative.

    ``query``, ``positive``: (n, d); ``negatives``: (n, k, d); ``mask``: (n, k) true where real.
    """
    pos = (query * positive).sum(-1, keepdim=True)
    neg = torch.einsum("nd,nkd->nk", query, negatives)
    logits = scale * torch.cat([pos, neg], dim=1)
    logits = logits.masked_fill(~torch.cat([torch.ones_like(mask[:, :1]), mask], 1), -math.inf)
    keep = mask.any(1)
    if not bool(keep.any()):
        return logits.new_zeros(())
    return -F.log_softmax(logits[keep], dim=1)[:, 0].mean()


class HardNegatives(nn.Module):
    """Negative features per training text row and the recipe's learnable logit scale.

    Args:
        items: the training rows of ``text_key`` (their ``value`` is the caption).
        encode: texts -> tower features (the text tower of the run).
        config: the ``[negatives]`` section.
        given: caption -> negatives (instead of the generator).
    """

    def __init__(self, items: Sequence[Mapping], encode: Callable[[list[str]], torch.Tensor],
                 config: NegativesConfig, given: Mapping[str, Sequence[str]] | None = None
                 ) -> None:
        super().__init__()
        self.config = config
        sets: list[list[str]] = []
        for it in items:
            cap = it.get("value")
            if not isinstance(cap, str) or not cap:
                sets.append([])
            elif given is not None:
                sets.append(list(given.get(cap, ()))[:config.k])
            else:
                sets.append(text_negatives(cap, config.k, rules=config.rules, seed=config.seed))
        texts = list(dict.fromkeys(t for s in sets for t in s))
        if not texts:
            raise ModalignError(f"negatives: no training row of {config.text_key!r} yields a "
                                "negative (rows need a 'value' caption)")
        feats = encode(texts).float()
        index = {t: i for i, t in enumerate(texts)}
        k = config.k
        self.register_buffer("features", torch.zeros(len(items), k, feats.shape[1]),
                             persistent=False)
        self.register_buffer("mask", torch.zeros(len(items), k, dtype=torch.bool),
                             persistent=False)
        for r, s in enumerate(sets):
            for j, t in enumerate(s):
                self.features[r, j] = feats[index[t]]
                self.mask[r, j] = True
        self.coverage = float(self.mask.any(1).float().mean())
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature)))

    def trainable(self) -> list[nn.Parameter]:
        """The recipe's own trained parameters (the logit scale)."""
        return [self.log_logit_scale]

    def loss(self, query: torch.Tensor, positive: torch.Tensor, rows: torch.Tensor,
             project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """IGC for the batch's text ``rows`` (indices into the training rows); ``project``
        maps tower features to the joint space with gradient (the text head)."""
        feats, mask = self.features[rows], self.mask[rows]
        n, k, f = feats.shape
        negs = project(feats.reshape(n * k, f)).reshape(n, k, -1)
        return igc_loss(query, positive, negs, mask, self.log_logit_scale.exp())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the logit scale in [1, 100]."""
        self.log_logit_scale.clamp_(math.log(MIN_SCALE), math.log(MAX_SCALE))
