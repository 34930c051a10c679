"""SLAP (Guinot et al., ISMIR 2025): negative-free, BYOL-style language-audio alignment.

Each tower has an online predictor output ``q`` and an EMA target projection ``z``. The loss pulls
``q`` towards the stop-gradient ``z`` of the other modality (and of its own, the unimodal terms).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from modalign.losses._support import check_fraction, pick, unit_rows
from modalign.losses.base import LossModule, as_modalities
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.vocabulary import direction_name


def byol_distance(prediction: Tensor, target: Tensor) -> Tensor:
    """``mean_i (2 - 2 cos(q_i, z_i))`` with no gradient to ``target``; in [0, 4], 0 iff aligned."""
    q = unit_rows(prediction, "prediction")
    z = unit_rows(target, "target", rows=q.shape[0], dim=q.shape[1]).detach()
    return (2 - 2 * (q * z).sum(dim=-1)).mean()


def slap_loss(
    prediction_a: Tensor,
    prediction_b: Tensor,
    target_a: Tensor,
    target_b: Tensor,
    *,
    cross_weight: float = 0.5,
    unimodal: bool = True,
    names: Sequence[str] = ("a", "b"),
) -> LossOutput:
    """``w (d(q_a, z_b) + d(q_b, z_a)) / 2 + (1 - w) (d(q_a, z_a) + d(q_b, z_b)) / 2``.

    ``prediction_*`` are the online predictor outputs, ``target_*`` the EMA target projections of
    the same modality (a and b); ``cross_weight`` is ``w``. Without ``unimodal`` only the cross
    terms are used (weight 1). Part ``a-to-b`` is ``d(q_a, z_b)``, with ``names = (a, b)``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> qa, qb, za, zb = (torch.randn(4, 8, generator=g) for _ in range(4))
        >>> sorted(slap_loss(qa, qb, za, zb).parts)
        ['a-to-a', 'a-to-b', 'b-to-a', 'b-to-b']
    """
    check_fraction(cross_weight, "cross_weight")
    a, b = names
    a_to_b = byol_distance(prediction_a, target_b)
    b_to_a = byol_distance(prediction_b, target_a)
    parts = {direction_name(a, b): a_to_b, direction_name(b, a): b_to_a}
    cross = (a_to_b + b_to_a) / 2
    if not unimodal:
        return LossOutput(cross, parts)
    a_to_a = byol_distance(prediction_a, target_a)
    b_to_b = byol_distance(prediction_b, target_b)
    parts.update({direction_name(a, a): a_to_a, direction_name(b, b): b_to_b})
    uni = (a_to_a + b_to_b) / 2
    return LossOutput(cross_weight * cross + (1 - cross_weight) * uni, parts)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, decay: float) -> None:
    """In place: ``theta_target <- decay * theta_target + (1 - decay) * theta_online``.

    ``decay = 0`` copies the online weights, ``decay = 1`` keeps the target frozen; floating buffers
    (e.g. batch-norm statistics) follow the same rule, other buffers are copied.

    Examples:
        >>> online, target = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> ema_update_(target, online, 0.0)
        >>> torch.equal(target.weight, online.weight)
        True
    """
    check_fraction(decay, "decay")
    t_params, o_params = dict(target.named_parameters()), dict(online.named_parameters())
    t_bufs, o_bufs = dict(target.named_buffers()), dict(online.named_buffers())
    if t_params.keys() != o_params.keys() or t_bufs.keys() != o_bufs.keys():
        raise ValueError("target and online must have the same parameter and buffer names")
    for name, t in t_params.items():
        t.lerp_(o_params[name].detach(), 1 - decay)
    for name, buf in t_bufs.items():
        if buf.is_floating_point():
            buf.lerp_(o_bufs[name], 1 - decay)
        else:
            buf.copy_(o_bufs[name])


@register_loss("slap")
class SLAPLoss(LossModule):
    """SLAP loss; ``modalities`` are the two predictor-output keys, ``target_keys`` the EMA targets.

    Defaults follow the reference configuration: ``cross_weight = 0.5``, unimodal terms on; use
    :func:`ema_update_` with ``decay = 0.995`` on the target towers after each optimiser step.
    Across processes it needs no gather: every term is a mean over rows, so with equal per-rank
    batches the mean over ranks is the single-process value.

    Examples:
        >>> loss = SLAPLoss(["audio", "text"])
        >>> emb = {k: torch.randn(4, 8) for k in ["audio", "text", "audio_target", "text_target"]}
        >>> sorted(loss(emb).parts)
        ['audio-to-audio', 'audio-to-text', 'text-to-audio', 'text-to-text']
    """

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        target_keys: Sequence[str] | None = None,
        cross_weight: float = 0.5,
        unimodal: bool = True,
    ) -> None:
        super().__init__(modalities)
        keys = target_keys if target_keys is not None else [f"{m}_target" for m in self.modalities]
        self.target_keys = as_modalities(keys, 2, name="target_keys")
        check_fraction(cross_weight, "cross_weight")
        self.cross_weight, self.unimodal = float(cross_weight), bool(unimodal)

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        q_a, q_b = pick(embeddings, self.modalities)
        z_a, z_b = pick(embeddings, self.target_keys)
        pick(embeddings, [self.modalities[0], self.target_keys[0]])  # predictions match targets
        return slap_loss(q_a, q_b, z_a, z_b, cross_weight=self.cross_weight,
                         unimodal=self.unimodal, names=self.modalities)
