"""M3CoL mixup contrastive loss (Kumar, Singhal et al., TMLR 2025), with soft mixup targets.

One modality is mixed within the batch, ``x~_i = b_i x_i + (1 - b_i) x_pi(i)``, and contrasted with
the other; the target of row i puts ``b_i`` on column i and ``1 - b_i`` on column pi(i).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.losses._support import check_fraction, checked, pick, soft_cross_entropy
from modalign.losses.base import ScaledLoss, ScaleOptions
from modalign.losses.geodesic_mixup import sample_beta
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_positive, validation_enabled


def mixup_targets(permutation: Tensor, mix_weights: Tensor) -> Tensor:
    """The (B, B) soft targets ``P_ii += b_i``, ``P_i,pi(i) += 1 - b_i``; every row sums to 1.

    The two entries are added, so a fixed point ``pi(i) = i`` gives ``P_ii = 1`` (the reference code
    overwrote the diagonal there and left the row summing to ``1 - b_i``).

    Examples:
        >>> mixup_targets(torch.tensor([0, 2, 1]), torch.tensor([0.3, 0.5, 1.0]))
        tensor([[1.0000, 0.0000, 0.0000],
                [0.0000, 0.5000, 0.5000],
                [0.0000, 0.0000, 1.0000]])
    """
    b = mix_weights.shape[0]
    rows = torch.arange(b, device=permutation.device)
    targets = torch.zeros(b, b, dtype=mix_weights.dtype, device=mix_weights.device)
    targets.index_put_((rows, rows), mix_weights, accumulate=True)
    targets.index_put_((rows, permutation), 1 - mix_weights, accumulate=True)
    return targets


def _check_mixing(permutation: Tensor, mix_weights: Tensor, batch: int) -> None:
    if permutation.shape != (batch,) or permutation.is_floating_point():
        raise ValueError(f"permutation must be an integer tensor of shape ({batch},)")
    if mix_weights.shape != (batch,) or not mix_weights.is_floating_point():
        raise ValueError(f"mix_weights must be a floating tensor of shape ({batch},)")
    if not validation_enabled():  # the value checks below read the tensors on the host
        return
    if not torch.equal(permutation.sort().values.cpu(), torch.arange(batch)):
        raise ValueError("permutation must be a permutation of range(batch)")
    if bool(((mix_weights < 0) | (mix_weights > 1) | ~torch.isfinite(mix_weights)).any()):
        raise ValueError("mix_weights must lie in [0, 1]")


def mixed_contrast(
    mixed_source: Tensor,
    other: Tensor,
    logit_scale: Tensor | float,
    permutation: Tensor,
    mix_weights: Tensor,
) -> Tensor:
    """One M3Co term: mix ``mixed_source`` rows, contrast with ``other`` both ways, average.

    The reverse direction uses ``P.T`` with each row renormalised to sum to 1 (the columns of ``P``
    do not sum to 1 in general).
    """
    weights = mix_weights.to(mixed_source.dtype).unsqueeze(1)
    mixed = weights * mixed_source + (1 - weights) * mixed_source[permutation]
    logits = logit_scale * F.normalize(mixed, dim=-1) @ F.normalize(other, dim=-1).T
    targets = mixup_targets(permutation, mix_weights.to(mixed_source.dtype))
    reverse_targets = targets.T / targets.T.sum(dim=1, keepdim=True)
    return (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, reverse_targets)) / 2


def m3col_loss(
    x: Tensor, y: Tensor, logit_scale: Tensor | float, permutation: Tensor, mix_weights: Tensor,
    *, names: Sequence[str] = ("x", "y"),
) -> LossOutput:
    """M3Co: mixed-x against y plus mixed-y against x, each the mean of both directions.

    ``permutation`` (B,) and ``mix_weights`` (B,) in [0, 1] are shared by both terms (see
    :func:`sample_m3col_mixing`). With ``mix_weights = 1`` each term is the CLIP loss. Parts:
    ``mixed-<x>`` and ``mixed-<y>`` with ``names``.

    Departure from the reference code: there each modality draws its own permutation and its own
    beta vector, and (through an in-place view) the mixing also reaches the modality it is
    contrasted with, so both sides of a term are mixed. Here one permutation and one weight vector
    serve both terms, and each mixed modality is contrasted with the clean other one.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
        >>> out = m3col_loss(x, y, 10.0, torch.tensor([1, 0, 3, 2]), torch.full((4,), 0.7))
        >>> sorted(out.parts)
        ['mixed-x', 'mixed-y']
    """
    checked(x, "x", normalize=True)
    checked(y, "y", rows=x.shape[0], dim=x.shape[1], normalize=True)
    check_positive("logit_scale", logit_scale)
    _check_mixing(permutation, mix_weights, x.shape[0])
    mixed_x = mixed_contrast(x, y, logit_scale, permutation, mix_weights)
    mixed_y = mixed_contrast(y, x, logit_scale, permutation, mix_weights)
    parts = {f"mixed-{names[0]}": mixed_x, f"mixed-{names[1]}": mixed_y}
    return LossOutput(mixed_x + mixed_y, parts)


def sample_m3col_mixing(
    batch: int,
    *,
    beta: float = 0.15,
    mix_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A random permutation and per-sample weights ``b_i ~ Beta(beta, beta)``, or 1 (unmixed).

    Each sample is mixed with probability ``mix_probability``.

    Examples:
        >>> perm, w = sample_m3col_mixing(4, generator=torch.Generator().manual_seed(0))
        >>> perm.shape, w.shape
        (torch.Size([4]), torch.Size([4]))
    """
    check_fraction(mix_probability, "mix_probability")
    permutation = torch.randperm(batch, generator=generator)
    weights = sample_beta(beta, batch, generator=generator).reshape(batch)
    mixed = torch.rand(batch, generator=generator) < mix_probability
    return permutation, torch.where(mixed, weights, torch.ones_like(weights))


@register_loss("m3col")
class M3CoLLoss(ScaledLoss):
    """M3Co mixup contrastive loss: ``tau = 0.1`` (fixed, as in the reference code; the
    temperature keywords change it), ``beta = 0.15``, mixing probability 0.5.

    Single-process only: the mixing permutation pairs rows within the local batch. One
    permutation and one weight vector serve both terms (see :func:`m3col_loss` for how this
    departs from the reference code).

    Examples:
        >>> loss = M3CoLLoss(["image", "text"], generator=torch.Generator().manual_seed(0))
        >>> emb = {"image": torch.randn(4, 8), "text": torch.randn(4, 8)}
        >>> sorted(loss(emb).parts)
        ['mixed-image', 'mixed-text']
    """

    scale_defaults = ScaleOptions(temperature=0.1, learnable_temperature=False)

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        beta: float = 0.15,
        mix_probability: float = 0.5,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> None:
        super().__init__(modalities, **options)
        check_positive("beta", beta)
        check_fraction(mix_probability, "mix_probability")
        self.beta, self.mix_probability = float(beta), float(mix_probability)
        self.generator = generator

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        x, y = pick(embeddings, self.modalities)
        checked(x, self.modalities[0])
        perm, weights = sample_m3col_mixing(
            x.shape[0],
            beta=self.beta,
            mix_probability=self.mix_probability,
            generator=self.generator,
        )
        return m3col_loss(x, y, self.logit_scale(), perm.to(x.device), weights.to(x.device),
                          names=self.modalities)
