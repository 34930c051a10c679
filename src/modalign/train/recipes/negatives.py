"""Compositional hard negatives in training (DeGLA, "Decoupled Global-Local Alignment", Hu et
al. 2025: image-grounded and text-grounded contrast, IGC and TGC, and its self-distillation),
with the shipped rule-based text negatives.

Each training caption (a text row's ``value``) gets ``k`` negatives from
:func:`modalign.data.negatives.text_negatives` (swap, replace, negate), or from a JSON file
mapping a caption to its negatives; their tower features are computed once by the text tower when
training starts. For a query key ``a`` (e.g. image) and the text key ``t``, with ``z_a``, the
positive ``z_t`` and the negatives ``n_1..n_k`` of the row's caption::

    L_IGC = mean_i -log( exp(s z_a.z_t) / (exp(s z_a.z_t) + sum_k exp(s z_a.n_ik)) )

(only the sample's own caption and its own negatives in the softmax; ``s`` a learnable logit
scale). It is added to the objectives with ``negatives.weight`` (DeGLA: 0.1 beside the global
CLIP term). Rows without a caption or without negatives are left out of the mean.

The text-grounded contrast and the self-distillation use a teacher: an exponential moving
average of the model, ``theta_T <- mu theta_T + (1 - mu) theta`` once per step
(``negatives.ema_decay = mu``; DeGLA 0.9996; 1: a frozen copy of the initial model). With the
student caption ``z_t``, the teacher's ``zbar_t`` and the student negatives ``n_ik``::

    L_TGC     = mean_i -log( exp(s' z_t.zbar_t) / (exp(s' z_t.zbar_t) + sum_k exp(s' z_t.n_ik)) )
    L_distill = mean_i sum_x ||z_x - zbar_x||^2   (x: every key's row and the row's negatives)

with a fixed scale ``s' = negatives.tgc_scale`` (DeGLA 10). They are added with
``negatives.tgc_weight`` (DeGLA 0.1) and ``negatives.distill_weight`` (DeGLA 0.005, on a sum
over a batch of 32 per process; here a mean over the rows). Per-sample, so it needs no gather
under ``torchrun``. Not implemented: generated image or audio negatives.

Examples:
    >>> cfg = NegativesConfig(k=3)
    >>> cfg.enabled
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from modalign.data.negatives import RULES, text_negatives
from modalign.errors import ModalignError
from modalign.train.recipes._checks import check_temperature, check_weight
from modalign.train.recipes.momentum import ema_update, frozen_copy

if TYPE_CHECKING:
    from modalign.model import MultiTowerModel

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
    tgc_weight: float = 0.0
    tgc_scale: float = 10.0
    distill_weight: float = 0.0
    ema_decay: float = 0.9996

    @property
    def enabled(self) -> bool:
        """Whether the recipe runs (``k > 0``)."""
        return self.k > 0

    @property
    def needs_teacher(self) -> bool:
        """Whether the EMA teacher is kept (text-grounded contrast or self-distillation on)."""
        return self.enabled and (self.tgc_weight > 0 or self.distill_weight > 0)

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
        for name in ("weight", "tgc_weight", "distill_weight", "tgc_scale"):
            check_weight(f"negatives.{name}", getattr(self, name))
        if not 0 <= self.ema_decay <= 1:
            raise ModalignError(f"negatives.ema_decay must be in [0, 1] (1: a frozen copy of the "
                                f"initial model), got {self.ema_decay!r}")
        if accumulate > 1:
            raise ModalignError("negatives.k > 0 needs train.accumulate = 1 (the negatives are "
                                "embedded with the step's gradient)")
        check_temperature("negatives.temperature", self.temperature, MIN_SCALE, MAX_SCALE)


HELP: dict[str, str] = {
    "negatives.k": "hard negative captions per training caption (image-grounded contrast, "
                   "DeGLA's IGC; 0: off)",
    "negatives.weight": "weight of the hard-negative loss added to the objectives",
    "negatives.rules": "rules of the shipped generator: some of ['swap', 'replace', 'negate']",
    "negatives.text_key": "the key whose rows carry the captions (their 'value')",
    "negatives.file": "a JSON file {caption: [negative, ...]} used instead of the generator",
    "negatives.seed": "seed of the generator",
    "negatives.temperature": "initial temperature of the recipe's learnable logit scale",
    "negatives.tgc_weight": "weight of DeGLA's text-grounded contrast (caption against the EMA "
                            "teacher's caption and its own negatives; 0: off)",
    "negatives.tgc_scale": "fixed logit scale of the text-grounded contrast",
    "negatives.distill_weight": "weight of the self-distillation to the EMA teacher (mean "
                                "squared distance of the embeddings; 0: off)",
    "negatives.ema_decay": "EMA decay of the teacher (1: a frozen copy of the initial model)",
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
        model: the student, copied as the EMA teacher when ``config.needs_teacher``.
    """

    features: torch.Tensor  # buffers: negative tower features per row, and which are real
    mask: torch.Tensor

    def __init__(self, items: Sequence[Mapping], encode: Callable[[list[str]], torch.Tensor],
                 config: NegativesConfig, given: Mapping[str, Sequence[str]] | None = None,
                 model: MultiTowerModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.teacher: MultiTowerModel | None = None
        if config.needs_teacher:
            if model is None:
                raise ModalignError("negatives.tgc_weight / distill_weight need the model (the "
                                    "EMA teacher starts as its copy)")
            self.teacher = frozen_copy(model)
        self._teacher_emb: dict[str, torch.Tensor] = {}
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
        return igc_loss(query, positive, self.negatives(rows, project), self.mask[rows],
                        self.log_logit_scale.exp())

    def negatives(self, rows: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]
                  ) -> torch.Tensor:
        """``(n, k, d)``: the negatives of the batch's text ``rows`` through ``project``."""
        feats = self.features[rows]
        n, k, f = feats.shape
        return project(feats.reshape(n * k, f)).reshape(n, k, -1)

    @torch.no_grad()
    def begin_step(self, model: nn.Module,
                   embed: Callable[[nn.Module], Mapping[str, torch.Tensor]]) -> None:
        """EMA-update the teacher from ``model`` and embed this batch with it
        (``embed(module)`` returns the batch's embeddings per key); no-op without a teacher."""
        if self.teacher is None:
            return
        ema_update(self.teacher, model, self.config.ema_decay)
        was = self.teacher.training
        self.teacher.eval()
        try:
            self._teacher_emb = {k: v.detach() for k, v in embed(self.teacher).items()}
        finally:
            self.teacher.train(was)

    def teacher_terms(self, emb: Mapping[str, torch.Tensor], rows: torch.Tensor,
                      student: MultiTowerModel) -> dict[str, torch.Tensor]:
        """DeGLA's text-grounded contrast (``"tgc"``) and self-distillation (``"distill"``) of
        the batch (after :meth:`begin_step`); negatives go through ``student.project(text_key,
        features)`` with gradient and the teacher's ``project`` without."""
        cfg, t = self.config, self.config.text_key
        if self.teacher is None:
            return {}
        if not self._teacher_emb:
            raise RuntimeError("HardNegatives.teacher_terms called before begin_step")
        teacher, frozen = self._teacher_emb, self.teacher
        negs = self.negatives(rows, lambda f: student.project(t, f))
        out: dict[str, torch.Tensor] = {}
        mask = self.mask[rows]
        if cfg.tgc_weight > 0:
            out["tgc"] = igc_loss(emb[t], teacher[t], negs, mask,
                                  torch.tensor(cfg.tgc_scale, dtype=negs.dtype))
        if cfg.distill_weight > 0:
            with torch.no_grad():
                tneg = self.negatives(rows, lambda f: frozen.project(t, f))
            dist = sum(((emb[k] - teacher[k]) ** 2).sum(-1) for k in emb)
            dist = dist + (((negs - tneg) ** 2).sum(-1) * mask).sum(-1)
            out["distill"] = dist.mean()
        return out

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the logit scale in [1, 100]."""
        self.log_logit_scale.clamp_(math.log(MIN_SCALE), math.log(MAX_SCALE))
