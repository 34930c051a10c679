"""LoRA adapters on a tower's network, through the ``peft`` library (extra ``modalign[lora]``).

The low-rank update ``W + (alpha / rank) * B A`` is peft's; this module only says where it goes
(the default targets; ``LoraSettings.target_modules`` chooses others):

- ``minilm`` (BERT): ``nn.Linear`` attention ``query``/``key``/``value`` and its output
  ``dense``, the MLP's ``intermediate.dense`` and ``output.dense`` of every layer;
- ``hf-clip`` image or text tower: ``q_proj``/``k_proj``/``v_proj``/``out_proj`` and
  ``fc1``/``fc2`` of that tower's encoder only (``nn.Linear``);
- ``effnet-lite0``: the pointwise (1x1) ``nn.Conv2d`` of every block (``_expand_conv``,
  ``_project_conv``) and the head (``_conv_head``).

peft's ``Conv2d`` LoRA builds ``A`` with the base layer's kernel, stride and padding; the 1x1
convolutions match exactly. The depthwise convolutions (``groups`` = channels, TensorFlow "SAME"
padding computed at call time) and the stem are left out: the adapter branch would not get the
same padding.

Examples:
    (Not run as a doctest: it needs the optional peft and loads the MiniLM weights.)

    >>> from modalign.encoders import load_encoder                       # doctest: +SKIP
    >>> tower = load_encoder("minilm")                                    # doctest: +SKIP
    >>> params = apply_lora(tower, LoraSettings(rank=8, alpha=16))        # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from modalign.errors import ModalignError

__all__ = ["LoraSettings", "adapter_dropout_on", "apply_lora", "default_targets", "has_lora",
           "merge_lora", "save_adapters"]

_MINILM = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|" \
          r"intermediate\.dense|output\.dense)"
_CLIP = r".*{part}\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|" \
        r"mlp\.(fc1|fc2))"
_EFFNET = r".*(_expand_conv|_project_conv|_conv_head)"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters for one tower.

    Attributes:
        rank: rank ``r`` of the update.
        alpha: scale numerator (the update is multiplied by ``alpha / rank``).
        dropout: dropout on the adapter's input.
        target_modules: module names (peft's suffix matching) or one regular expression (a
            one-element list whose entry contains ``*``, ``(`` or ``\\``) matched against full
            module names; empty: :func:`default_targets`.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ModalignError(f"lora rank: expected an int >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ModalignError(f"lora alpha: expected a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ModalignError(f"lora dropout: expected a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, list) or not all(
                isinstance(t, str) and t for t in self.target_modules):
            raise ModalignError("lora target_modules: expected a list of module names, got "
                                f"{self.target_modules!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _inner_name(tower: Any) -> str:
    for name in ("model", "net"):
        if isinstance(getattr(tower, name, None), nn.Module):
            return name
    raise ModalignError(f"tower {getattr(tower, 'name', type(tower).__name__)!r}: LoRA needs the "
                        "network as its `model` or `net` attribute (the built-in towers have one)")


def default_targets(tower: Any) -> str:
    """The default target expression for a built-in tower (see the module docstring)."""
    kind = type(tower).__name__
    kinds = {c.__name__ for c in type(tower).__mro__}
    if kind == "MiniLMEncoder":
        return _MINILM
    if "HFImageTower" in kinds:
        return _CLIP.format(part="vision_model")
    if "HFTextTower" in kinds:
        return _CLIP.format(part="text_model")
    if kind == "EfficientNetLite0Encoder":
        return _EFFNET
    raise ModalignError(f"tower {getattr(tower, 'name', kind)!r} has no default LoRA targets; set "
                        "lora.target_modules to the names of its nn.Linear / nn.Conv2d modules")


def has_lora(tower: Any) -> bool:
    """True when the tower's network carries peft adapters."""
    try:
        inner = getattr(tower, _inner_name(tower))
    except ModalignError:
        return False
    return type(inner).__name__.startswith("Peft")


def apply_lora(tower: Any, settings: LoraSettings) -> list[nn.Parameter]:
    """Freeze ``tower`` and wrap its network with peft LoRA adapters; returns the adapter
    parameters (the only trainable ones)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ModalignError("LoRA needs the peft package: pip install 'modalign[lora]'") from e
    if has_lora(tower):
        raise ModalignError(f"tower {tower.name!r} already carries LoRA adapters")
    name = _inner_name(tower)
    targets: str | list[str] = settings.target_modules or default_targets(tower)
    if isinstance(targets, list) and len(targets) == 1 and any(c in targets[0] for c in "*(\\"):
        targets = targets[0]
    tower.requires_grad_(False)
    # peft annotates lora_alpha as int; it only divides by the rank, so a float scales the same
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,  # type: ignore[arg-type]
                        lora_dropout=settings.dropout, target_modules=targets, bias="none")
    try:
        wrapped = get_peft_model(getattr(tower, name), config)
    except ValueError as e:
        raise ModalignError(f"lora.target_modules {targets!r} on tower {tower.name!r}: {e}") from e
    setattr(tower, name, wrapped)
    return [p for p in tower.parameters() if p.requires_grad]


def merge_lora(tower: Any) -> None:
    """Fold the adapters into the tower's weights and drop peft's wrapper (in place)."""
    if not has_lora(tower):
        raise ModalignError(f"tower {tower.name!r} carries no LoRA adapters")
    name = _inner_name(tower)
    setattr(tower, name, getattr(tower, name).merge_and_unload())


def save_adapters(towers: Mapping[str, Any], directory: str | os.PathLike[str]) -> list[Path]:
    """Write each adapted tower's adapters (peft format) to ``directory/<modality>/``."""
    out = []
    for m, tower in towers.items():
        if has_lora(tower):
            path = Path(directory) / m
            getattr(tower, _inner_name(tower)).save_pretrained(str(path))
            out.append(path)
    return out


def adapter_dropout_on(tower: Any) -> None:
    """Put only the adapters' dropout layers in training mode (the tower itself stays in eval
    mode: frozen BatchNorm statistics, no dropout of its own)."""
    if isinstance(tower, nn.Module) and has_lora(tower):
        for name, module in tower.named_modules():
            if name.endswith("lora_dropout"):
                module.train()
