"""What loss modules share: declared modalities, a log-parameterised logit scale, an optional bias.

A loss module stores ``log_logit_scale`` (an ``nn.Parameter`` when learnable, a buffer otherwise),
passes ``log_logit_scale.exp()`` to its pure function, and exposes ``clamp_()`` for the training
loop to call after each optimiser step (the log parameter is clamped in place, as in CLIP).

Examples:
    >>> import math, torch
    >>> class MyLoss(ScaledLoss):
    ...     def __init__(self, modalities):
    ...         super().__init__(modalities, n_modalities=2, init_logit_scale=math.log(1 / 0.07))
    >>> m = MyLoss(["image", "text"])
    >>> with torch.no_grad():
    ...     _ = m.log_logit_scale.fill_(10.0)
    >>> m.clamp_()
    >>> round(float(m.logit_scale().detach()), 3)
    100.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from modalign.losses.validation import check_modalities

DEFAULT_SCALE_BOUNDS: tuple[float, float] = (0.0, math.log(100.0))
"""Default clamp range of ``log_logit_scale``: the logit scale stays in [1, 100]."""


def as_modalities(
    modalities: Sequence[str], n: int | None = None, *, name: str = "modalities"
) -> tuple[str, ...]:
    """Validate modality names: distinct non-empty strings, exactly ``n`` of them if given."""
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise ValueError(f"{name} must be a sequence of modality names, got {modalities!r}")
    mods = tuple(modalities)
    if not all(isinstance(m, str) and m for m in mods):
        raise ValueError(f"{name} must hold non-empty strings, got {mods!r}")
    if len(set(mods)) != len(mods):
        raise ValueError(f"{name} must be distinct, got {mods!r}")
    if n is not None and len(mods) != n:
        raise ValueError(f"{name} must name exactly {n} modalities, got {mods!r}")
    return mods


def select_modalities(embeddings: Mapping[str, Tensor], modalities: Sequence[str]) -> list[Tensor]:
    """The tensors of ``modalities`` in order (ValueError naming the missing keys otherwise)."""
    check_modalities("embeddings", embeddings, modalities)
    return [embeddings[m] for m in modalities]


class ScaledLoss(nn.Module):
    """Base class of loss modules with declared modalities and a (learnable) logit scale.

    Args:
        modalities: the embedding keys this loss reads, in order.
        n_modalities: how many keys the loss needs (None: any number >= 1).
        init_logit_scale: initial value of ``log_logit_scale`` (the log of 1/temperature).
        learnable_scale: register the log scale as a parameter (True) or a fixed buffer (False).
        init_logit_bias: initial additive bias of the logits, or None for no bias.
        learnable_bias: register the bias as a parameter (True) or a fixed buffer (False).
        scale_bounds: (min, max) of ``log_logit_scale`` enforced by :meth:`clamp_`.
    """

    log_logit_scale: Tensor
    logit_bias: Tensor | None

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        n_modalities: int | None = 2,
        init_logit_scale: float = math.log(1 / 0.07),
        learnable_scale: bool = True,
        init_logit_bias: float | None = None,
        learnable_bias: bool = True,
        scale_bounds: tuple[float, float] = DEFAULT_SCALE_BOUNDS,
    ) -> None:
        super().__init__()
        self.modalities = as_modalities(modalities, n_modalities)
        init_logit_scale = float(init_logit_scale)
        if not math.isfinite(init_logit_scale):
            raise ValueError(f"init_logit_scale must be finite, got {init_logit_scale}")
        lo, hi = (float(b) for b in scale_bounds)
        if not lo <= hi:
            raise ValueError(f"scale_bounds must be (min, max) with min <= max, got {scale_bounds}")
        self.scale_bounds = (lo, hi)
        scale = torch.tensor(init_logit_scale, dtype=torch.float32)
        if learnable_scale:
            self.log_logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_logit_scale", scale)
        if init_logit_bias is None:
            self.logit_bias = None
        else:
            bias = torch.tensor(float(init_logit_bias), dtype=torch.float32)
            if not math.isfinite(float(bias)):
                raise ValueError(f"init_logit_bias must be finite, got {init_logit_bias}")
            if learnable_bias:
                self.logit_bias = nn.Parameter(bias)
            else:
                self.register_buffer("logit_bias", bias)

    def logit_scale(self) -> Tensor:
        """The logit scale ``exp(log_logit_scale)`` (1 / temperature)."""
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``log_logit_scale`` in place to ``scale_bounds`` (after the optimiser step)."""
        self.log_logit_scale.clamp_(*self.scale_bounds)

    def select(self, embeddings: Mapping[str, Tensor]) -> list[Tensor]:
        """This loss's tensors in declared order (ValueError if a modality is missing)."""
        return select_modalities(embeddings, self.modalities)

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}"
