"""Contrastive distillation from a teacher (DCD, "Dynamic Contrastive Distillation for Image-Text
Retrieval", Rao et al. 2022), for joint-space towers and N keys.

The teacher is any saved modalign model folder (``MultiTowerModel.save_pretrained``, what
``modalign train`` writes) over the same tower features; it stays frozen. The student is the model
being trained and may be smaller (``model.joint_dim``, ``model.head``, ``model.head_depth``). For an
ordered pair of keys ``(a, b)`` of a batch of ``B`` tuples, with teacher logits
``t = s_T * u_a u_b^T`` (its saved logit scale) and student logits ``y = s * z_a z_b^T``::

    p_i  = softmax(t_i)                   H_i = -sum_j p_ij log p_ij
    w_i  = H_i / sum_b H_b                (an uncertain teacher row: a hard sample, more weight)
    L_ab = alpha * T^2 * mean_ij (t_ij / T - y_ij / T)^2  +  (1 - alpha) * sum_i w_i CE(y_i, i)

and the loss is the mean of ``L_ab`` over ordered pairs of distinct keys. ``s`` is the recipe's
learnable logit scale, clamped to [1, 100]. The paper's cross-encoder scores a fixed number of
teacher-mined candidates per query; with towers every in-batch column is a candidate, so the
teacher's similarity rows are the soft targets.

Across processes the student's rows are local and its columns gathered with gradient
(``GatherGrad.GLOBAL``), the teacher's columns are gathered without, and ``sum_b H_b`` is summed
over ranks: the mean over ranks is the single-process loss on the global batch.

Examples:
    >>> cfg = DistillConfig(teacher="runs/big/model")
    >>> cfg.enabled
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modalign.distributed.gather import GatherGrad, gather_with_grad
from modalign.errors import ModalignError
from modalign.train.recipes._checks import check_weight

if TYPE_CHECKING:
    from modalign.model import MultiTowerModel

MIN_SCALE, MAX_SCALE = 1.0, 100.0


@dataclass
class DistillConfig:
    """The ``[distill]`` section: distillation from a teacher model (``teacher = ""``: off)."""

    teacher: str = ""
    alpha: float = 0.2
    temperature: float = 1.0
    weight: float = 1.0

    @property
    def enabled(self) -> bool:
        """Whether the recipe runs (a teacher is named)."""
        return bool(self.teacher)

    def check(self) -> None:
        """Raise :class:`ModalignError` naming the first bad key."""
        if not self.enabled:
            return
        if not 0 <= self.alpha <= 1:
            raise ModalignError(f"distill.alpha must be in [0, 1], got {self.alpha!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ModalignError(f"distill.temperature must be > 0, got {self.temperature!r}")
        check_weight("distill.weight", self.weight)


HELP: dict[str, str] = {
    "distill.teacher": "contrastive distillation (DCD): a saved modalign model folder over the "
                       "same tower features ('': off)",
    "distill.alpha": "weight of the logit-matching term (MSE to the teacher's logits) against "
                     "the entropy-weighted contrastive term",
    "distill.temperature": "temperature T of the logit-matching term (scaled by T^2)",
    "distill.weight": "weight of the distillation loss added to the objectives",
}


def entropy_weights(teacher_logits: torch.Tensor, total: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``H_i / sum_b H_b`` of the teacher's row distributions (``total``: the sum, if known)."""
    logp = F.log_softmax(teacher_logits, dim=1)
    h = -(logp.exp() * logp).sum(1)
    return h / (h.sum() if total is None else total)


def dcd_loss(y: torch.Tensor, t: torch.Tensor, offset: int, weights: torch.Tensor,
             alpha: float, temperature: float) -> torch.Tensor:
    """One direction: ``alpha T^2 mean (t/T - y/T)^2 + (1 - alpha) sum_i w_i CE(y_i, offset+i)``.

    ``y``: (n, k) student logits; ``t``: teacher logits of the same shape (no gradient);
    ``weights``: (n,) per-row weights (:func:`entropy_weights`).
    """
    T = temperature
    mse = F.mse_loss(y / T, t.detach() / T) * T * T
    target = offset + torch.arange(y.shape[0], device=y.device)
    ce = F.cross_entropy(y, target, reduction="none")
    return alpha * mse + (1 - alpha) * (weights.detach() * ce).sum()


def load_teacher(path: str | Path, feature_dims: Mapping[str, int]) -> MultiTowerModel:
    """A saved model folder, frozen, checked to read the same tower features as the student."""
    from modalign.model import MultiTowerModel

    try:
        teacher = MultiTowerModel.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:
        raise ModalignError(f"distill.teacher={str(path)!r}: {e}") from None
    for m, d in feature_dims.items():
        got = teacher.config.feature_dims.get(m)
        if got != d:
            raise ModalignError(f"distill.teacher={str(path)!r} reads {m} features of size {got}; "
                                f"the training data has {d} (the teacher must use the same "
                                "towers)")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class ContrastiveDistillation(nn.Module):
    """The frozen teacher and the student's learnable logit scale of the recipe.

    Args:
        teacher: the teacher model (:func:`load_teacher`); not saved with checkpoints.
        keys: the embedding keys of a training tuple (``data.keys``).
        config: the ``[distill]`` section.
        init_scale: initial student logit scale (default: the teacher's).
    """

    teacher: MultiTowerModel  # set with object.__setattr__: not a submodule

    def __init__(self, teacher: MultiTowerModel, keys: Sequence[str], config: DistillConfig,
                 init_scale: float | None = None) -> None:
        super().__init__()
        if len(keys) < 2:
            raise ModalignError(f"distillation needs two or more data.keys, got {list(keys)}")
        self.config = config
        self.keys = list(keys)
        object.__setattr__(self, "teacher", teacher)  # frozen and outside the state dict
        scale = init_scale if init_scale is not None else float(
            teacher.log_logit_scale.exp())
        scale = min(max(scale, MIN_SCALE), MAX_SCALE)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self._teacher_emb: dict[str, torch.Tensor] = {}

    def trainable(self) -> list[nn.Parameter]:
        """The recipe's own trained parameters (the student's logit scale)."""
        return [self.log_logit_scale]

    @torch.no_grad()
    def begin_step(self, features: Mapping[str, torch.Tensor]) -> None:
        """Embed this rank's batch with the teacher (cached features per key)."""
        missing = [k for k in self.keys if k not in features]
        if missing:
            raise ModalignError(f"distillation needs cached features of {missing} (the teacher "
                                "reads tower features; keys of unfrozen towers are not cached)")
        device = next(iter(features.values())).device
        self.teacher.to(device)
        out = self.teacher({k: features[k] for k in self.keys})
        self._teacher_emb = {k: v.float() for k, v in out.items()}

    def loss(self, emb: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mean of both-key-order :func:`dcd_loss` terms (after :meth:`begin_step`)."""
        if not self._teacher_emb:
            raise RuntimeError("ContrastiveDistillation.loss called before begin_step")
        s = self.log_logit_scale.exp()
        s_t = self.teacher.log_logit_scale.exp()
        world = dist.get_world_size() if dist.is_initialized() else 1
        terms = []
        for a in self.keys:
            for b in self.keys:
                if a == b:
                    continue
                cols = gather_with_grad(emb[b], GatherGrad.GLOBAL)
                tcols = gather_with_grad(self._teacher_emb[b], GatherGrad.NONE).tensor
                y = s * emb[a] @ cols.tensor.T
                t = s_t * self._teacher_emb[a] @ tcols.T
                logp = F.log_softmax(t, dim=1)
                h = -(logp.exp() * logp).sum(1)
                total = h.sum()
                if world > 1:
                    dist.all_reduce(total)
                w = h / total * world  # the mean over ranks is the global weighted sum
                terms.append(dcd_loss(y, t, cols.offset, w, self.config.alpha,
                                      self.config.temperature))
        self._teacher_emb = {}
        return torch.stack(terms).mean()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the student's logit scale in [1, 100]."""
        self.log_logit_scale.clamp_(math.log(MIN_SCALE), math.log(MAX_SCALE))
