"""Towers that turn raw inputs into vectors; ``load_encoder`` builds one from a spec string.

Built-in towers (all offline): ``minilm`` (text), ``effnet-lite0`` (image), ``logmel`` (audio).
Adapters for models users bring: ``hf-clip:PATH_OR_NAME``, ``hf-siglip:PATH_OR_NAME`` (transformers)
and ``open_clip:ARCH/PRETRAINED`` or ``open_clip:local-dir:PATH`` (optional extra). Anything that
follows :class:`Encoder` plugs in the same way.
"""

from __future__ import annotations

from typing import Any

from modalign.encoders.base import Encoder, check_encoder

__all__ = ["Encoder", "available_encoders", "check_encoder", "load_encoder"]

_SPECS: dict[str, str] = {
    "minilm": "text: all-MiniLM-L6-v2 (384-d); minilm:PATH_OR_NAME for another "
              "sentence-transformers BERT folder",
    "effnet-lite0": "image: EfficientNet-Lite0 ImageNet (1280-d); "
                    "effnet-lite0:WEIGHTS.safetensors|.pth for other weights",
    "logmel": "audio: log-mel spectrogram image through EfficientNet-Lite0 (1280-d)",
    "hf-clip": "image or text: hf-clip:PATH_OR_NAME, a transformers CLIPModel folder",
    "hf-siglip": "image or text: hf-siglip:PATH_OR_NAME, a transformers SiglipModel folder",
    "open_clip": "image or text: open_clip:ARCH/PRETRAINED or open_clip:local-dir:PATH "
                 "(pip install 'modalign[openclip]')",
}
_SINGLE_MODALITY = {"minilm": "text", "effnet-lite0": "image", "logmel": "audio"}
_TWO_TOWER = ("hf-clip", "hf-siglip", "open_clip")


def available_encoders() -> dict[str, str]:
    """Spec prefixes ``load_encoder`` understands, each with a one-line description.

    Examples:
        >>> sorted(available_encoders())[:3]
        ['effnet-lite0', 'hf-clip', 'hf-siglip']
    """
    return dict(_SPECS)


def load_encoder(spec: str, modality: str | None = None, **options: Any) -> Encoder:
    """Build the tower named by ``spec``.

    Args:
        spec: ``minilm``, ``minilm:PATH_OR_NAME``, ``effnet-lite0``, ``effnet-lite0:WEIGHTS``,
            ``logmel``, ``hf-clip:PATH_OR_NAME``, ``hf-siglip:PATH_OR_NAME``,
            ``open_clip:ARCH/PRETRAINED`` or ``open_clip:local-dir:PATH``.
        modality: which tower of a two-tower model (``"image"`` or ``"text"``); required for the
            adapters, optional (and checked) for the built-in single-modality towers.
        options: passed to the tower's constructor (e.g. ``image_size=224``, ``max_length=64``).

    Towers come in eval mode with gradients enabled; wrap calls in ``torch.no_grad()`` to embed.

    Examples:
        >>> import torch
        >>> tower = load_encoder("effnet-lite0", image_size=64)
        >>> (tower.modality, tower.dim)
        ('image', 1280)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec must be a non-empty string such as 'minilm', got {spec!r}")
    kind, _, arg = spec.strip().partition(":")
    if kind not in _SPECS:
        raise ValueError(f"spec {spec!r}: unknown encoder {kind!r}; expected one of "
                         f"{', '.join(_SPECS)} (see available_encoders())")
    if kind in _SINGLE_MODALITY:
        expected = _SINGLE_MODALITY[kind]
        if modality is not None and modality != expected:
            raise ValueError(f"modality: {kind} is a {expected} tower, got modality={modality!r}")
    elif modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text' for the two-tower spec {spec!r}, "
                         f"got {modality!r}")
    elif not arg:
        example = _SPECS[kind].split(": ", 1)[1]
        raise ValueError(f"spec {spec!r}: {kind} needs a model, e.g. {example}")

    if kind == "minilm":
        from modalign.encoders.minilm import MiniLMEncoder

        return MiniLMEncoder(arg or None, **options)
    if kind == "effnet-lite0":
        from modalign.encoders.effnet import EfficientNetLite0Encoder

        return EfficientNetLite0Encoder(arg or None, **options)
    if kind == "logmel":
        from modalign.encoders.logmel import LogMelEncoder

        if arg:
            raise ValueError(f"spec {spec!r}: logmel takes no argument; pass options instead")
        return LogMelEncoder(**options)
    if kind in ("hf-clip", "hf-siglip"):
        from modalign.encoders.hf import load_hf_towers

        return load_hf_towers(arg, family=kind.removeprefix("hf-"), **options)[modality]
    from modalign.encoders.open_clip import load_open_clip_towers

    return load_open_clip_towers(arg, **options)[modality]
