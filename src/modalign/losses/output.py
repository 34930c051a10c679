"""The result every objective returns: the total and its named parts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LossOutput:
    """A scalar loss plus named scalar parts for logging (always the same type, whatever the flags).

    Examples:
        >>> import torch
        >>> parts = {"i2t": torch.tensor(1.0), "t2i": torch.tensor(2.0)}
        >>> out = LossOutput(torch.tensor(1.5), parts)
        >>> float(out.loss), sorted(out.parts)
        (1.5, ['i2t', 't2i'])
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def detached(self) -> dict[str, float]:
        """The loss and its parts as plain floats, for logs."""
        out = {"loss": float(self.loss.detach())}
        out.update({k: float(v.detach()) for k, v in self.parts.items()})
        return out
