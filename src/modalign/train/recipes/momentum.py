"""Momentum distillation (ALBEF, "Align before Fuse", Li et al. 2021), for N keys.

An exponential moving average (EMA) copy of the model's trainable parts embeds every batch; its
embeddings fill one feature queue per key (extra negatives) and give soft targets. For an ordered
pair of keys ``(a, b)`` with student embeddings ``z_a``, momentum embeddings ``m_a, m_b`` and
``K_b = [m_b of the global batch; queue_b]``::

    p    = softmax(s * z_a K_b^T)          q = softmax(s * m_a K_b^T)     (no gradient)
    y    = alpha_t * q + (1 - alpha_t) * onehot(own column)
    L_ab = mean_i  -sum_j y_ij log p_ij

the loss is the mean of ``L_ab`` over the ordered pairs of distinct keys (two pairs for image and
text: ALBEF's ``(L_i2t + L_t2i) / 2``). ``s`` is a learnable logit scale (ALBEF's ``1/temp``,
clamped to [2, 1000]); ``alpha_t = alpha * min(1, step / ramp)``; the EMA update before each step
is ``theta_m <- mu theta_m + (1 - mu) theta`` over the trainable parameters.

Across processes the momentum embeddings of every rank are gathered (no gradient: they are
targets), so every rank sees the global batch as in-batch keys and enqueues the same rows; the
queues therefore stay identical on every rank and the update equals one process on the global
batch. Unlike ALBEF's random initial queue, only filled queue rows are used.

Examples:
    >>> cfg = MomentumConfig(decay=0.995, queue_size=1024)
    >>> cfg.enabled, alpha_at(cfg, step=5, steps_per_epoch=10)
    (True, 0.2)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from modalign.distributed.gather import GatherGrad, gather_with_grad
from modalign.errors import ModalignError
from modalign.train.recipes._checks import check_temperature, check_weight

ModuleT = TypeVar("ModuleT", bound=nn.Module)

MIN_SCALE, MAX_SCALE = 2.0, 1000.0


@dataclass
class MomentumConfig:
    """The ``[momentum]`` section: ALBEF momentum distillation (``decay = 0``: off)."""

    decay: float = 0.0
    queue_size: int = 0
    alpha: float = 0.4
    alpha_ramp_steps: int = -1
    weight: float = 1.0
    temperature: float = 0.07

    @property
    def enabled(self) -> bool:
        """Whether the recipe runs (``decay > 0``)."""
        return self.decay > 0

    def check(self, batch_size: int) -> None:
        """Raise :class:`ModalignError` naming the first bad key."""
        if not 0 <= self.decay < 1:
            raise ModalignError(f"momentum.decay must be in [0, 1) (0: off), got {self.decay!r}")
        if not self.enabled:
            return
        if self.queue_size < 0:
            raise ModalignError(f"momentum.queue_size must be >= 0, got {self.queue_size!r}")
        if 0 < self.queue_size < batch_size:
            raise ModalignError(f"momentum.queue_size={self.queue_size} must be 0 or at least "
                                f"train.batch_size={batch_size} (a step enqueues the global batch)")
        if not 0 <= self.alpha <= 1:
            raise ModalignError(f"momentum.alpha must be in [0, 1], got {self.alpha!r}")
        if self.alpha_ramp_steps < -1:
            raise ModalignError("momentum.alpha_ramp_steps must be >= 0 or -1 (one epoch), "
                                f"got {self.alpha_ramp_steps!r}")
        check_weight("momentum.weight", self.weight)
        check_temperature("momentum.temperature", self.temperature, MIN_SCALE, MAX_SCALE)


HELP: dict[str, str] = {
    "momentum.decay": "ALBEF momentum distillation: EMA decay of the momentum model, e.g. 0.995 "
                      "(0: off)",
    "momentum.queue_size": "momentum features kept per key as extra negatives (0: none; else "
                           ">= train.batch_size)",
    "momentum.alpha": "weight of the momentum model's soft targets against the one-hot ones",
    "momentum.alpha_ramp_steps": "steps over which alpha ramps up linearly from 0 (-1: the "
                                 "first epoch, as ALBEF)",
    "momentum.weight": "weight of the momentum-distillation loss added to the objectives",
    "momentum.temperature": "initial temperature of its learnable logit scale",
}


def alpha_at(cfg: MomentumConfig, step: int, steps_per_epoch: int) -> float:
    """``alpha * min(1, step / ramp)`` (ramp ``-1``: one epoch; ``0``: no ramp)."""
    ramp = steps_per_epoch if cfg.alpha_ramp_steps < 0 else cfg.alpha_ramp_steps
    return cfg.alpha if ramp <= 0 else cfg.alpha * min(1.0, step / ramp)


def frozen_copy(model: ModuleT) -> ModuleT:
    """A deep copy of ``model`` whose parameters take no gradient (the start of an EMA)."""
    copied = copy.deepcopy(model)
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``theta_ema <- decay theta_ema + (1 - decay) theta`` over the parameters ``model`` trains
    (``decay = 1``: a frozen copy); buffers (feature centres) are copied."""
    mine = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad and decay < 1:
            mine[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
    mine_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        mine_buffers[name].copy_(b)


def soft_target_loss(z: torch.Tensor, m_query: torch.Tensor, keys: torch.Tensor, offset: int,
                     scale: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean_i -sum_j y_ij log softmax(s z K^T)_ij`` with ``y = alpha q + (1 - alpha) onehot``.

    ``z``: (n, d) student queries; ``m_query``: their momentum embeddings; ``keys``: (k, d), whose
    row ``offset + i`` is the positive of query ``i``.
    """
    logits = scale * z @ keys.T
    with torch.no_grad():
        soft = torch.softmax(scale.detach() * m_query @ keys.T, dim=1)
        hard = torch.zeros_like(soft)
        hard[torch.arange(z.shape[0]), offset + torch.arange(z.shape[0])] = 1.0
        target = alpha * soft + (1 - alpha) * hard
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


class MomentumDistillation(nn.Module):
    """The momentum model, the per-key queues and the learnable scale of the recipe.

    Its ``state_dict`` (EMA weights, queues, pointer, fill count, scale) is saved with every
    checkpoint, so a resumed run continues bitwise.

    Args:
        model: the student (copied once; the copy is updated by EMA).
        keys: the embedding keys of a training tuple (``data.keys``).
        joint_dim: size of the joint space.
        config: the ``[momentum]`` section.
    """

    queue: torch.Tensor  # buffers: (keys, queue size, joint_dim), write position, rows filled
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, model: nn.Module, keys: Sequence[str], joint_dim: int,
                 config: MomentumConfig) -> None:
        super().__init__()
        if len(keys) < 2:
            raise ModalignError(f"momentum distillation needs two or more data.keys, got {keys}")
        self.config = config
        self.keys = list(keys)
        self.ema = frozen_copy(model)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature)))
        q = config.queue_size
        self.register_buffer("queue", torch.zeros(len(self.keys), q, joint_dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._pending: dict[str, torch.Tensor] = {}
        self._offset = 0

    def trainable(self) -> list[nn.Parameter]:
        """The recipe's own trained parameters (the logit scale)."""
        return [self.log_logit_scale]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """EMA step over the parameters ``model`` trains; buffers (feature centres) copied."""
        ema_update(self.ema, model, self.config.decay)

    @torch.no_grad()
    def begin_step(self, model: nn.Module,
                   embed: Callable[[nn.Module], Mapping[str, torch.Tensor]]) -> None:
        """EMA-update from ``model``, then embed this rank's batch with the momentum model and
        gather it over ranks (``embed(module)`` returns the batch's embeddings per key)."""
        self.update(model)
        was = self.ema.training
        self.ema.eval()
        try:
            mom = embed(self.ema)
        finally:
            self.ema.train(was)
        self._pending = {}
        for k in self.keys:
            g = gather_with_grad(mom[k].detach().to(self.queue.dtype), GatherGrad.NONE)
            self._pending[k] = g.tensor
            self._offset = g.offset
        self._local = {k: v.detach().to(self.queue.dtype) for k, v in mom.items()}

    def loss(self, emb: Mapping[str, torch.Tensor], alpha: float) -> torch.Tensor:
        """The mean of :func:`soft_target_loss` over ordered key pairs (after
        :meth:`begin_step`)."""
        if not self._pending:
            raise RuntimeError("MomentumDistillation.loss called before begin_step")
        scale = self.log_logit_scale.exp()
        n = int(self.filled)
        total = []
        for a in self.keys:
            for j, b in enumerate(self.keys):
                if a == b:
                    continue
                keys = torch.cat([self._pending[b], self.queue[j, :n]])
                total.append(soft_target_loss(emb[a], self._local[a], keys, self._offset,
                                              scale, alpha))
        return torch.stack(total).mean()

    @torch.no_grad()
    def enqueue(self) -> None:
        """Push this step's gathered momentum embeddings into the queues (oldest out)."""
        q = self.queue.shape[1]
        if q and self._pending:
            rows = next(iter(self._pending.values())).shape[0]
            idx = (int(self.ptr) + torch.arange(rows, device=self.queue.device)) % q
            for j, k in enumerate(self.keys):
                self.queue[j, idx] = self._pending[k].to(self.queue)
            self.ptr.fill_((int(self.ptr) + rows) % q)
            self.filled.fill_(min(q, int(self.filled) + rows))
        self._pending = {}

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the logit scale in [2, 1000] (ALBEF's temperature range 0.001-0.5)."""
        self.log_logit_scale.clamp_(math.log(MIN_SCALE), math.log(MAX_SCALE))
