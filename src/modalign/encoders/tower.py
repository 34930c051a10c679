"""A base for built-in towers: an ``nn.Module`` whose stages can be frozen or partly unfrozen."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Tower(nn.Module):
    """A tower made of an ordered list of stages (input side first).

    Subclasses set ``name``, ``modality`` and ``dim``, implement ``preprocess``, ``encode``,
    ``identity`` and ``blocks()``; this base adds freezing and partial unfreezing of the last
    stages, for fine-tuning only the top of a pretrained tower.

    Examples:
        >>> from modalign.encoders import load_encoder
        >>> tower = load_encoder("effnet-lite0")
        >>> tower.freeze()
        >>> params = tower.trainable_tail(2)   # the head and the last MBConv block
        >>> all(p.requires_grad for p in params)
        True
    """

    name: str
    modality: str
    dim: int

    def blocks(self) -> list[nn.Module]:
        """The tower's stages in order from input to output."""
        raise NotImplementedError

    def freeze(self) -> None:
        """Stop gradients to every parameter and put the tower in eval mode."""
        self.requires_grad_(False)
        self.eval()

    def trainable_tail(self, k: int) -> list[nn.Parameter]:
        """Unfreeze the last ``k`` stages of :meth:`blocks` and return their parameters.

        The other parameters are left as they are (call :meth:`freeze` first for a frozen body).
        ``k = 0`` returns an empty list. Train/eval mode is not changed: batch-norm statistics stay
        frozen until the caller puts the unfrozen stages in ``train()`` mode.
        """
        stages = self.blocks()
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(stages):
            raise ValueError(f"k must be an int in [0, {len(stages)}] (the number of stages), "
                             f"got {k!r}")
        params: list[nn.Parameter] = []
        for stage in stages[len(stages) - k:]:
            for p in stage.parameters():
                p.requires_grad_(True)
                params.append(p)
        return params

    def preprocess(self, inputs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, batch: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: Any) -> torch.Tensor:
        """Same as :meth:`encode`, so a tower can sit inside other modules."""
        return self.encode(batch)
