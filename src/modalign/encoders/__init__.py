"""Towers that turn raw inputs into vectors; ``load_encoder`` builds one from a spec string.

Built-in towers (all offline): ``minilm`` (text), ``effnet-lite0`` (image), ``logmel`` (audio).
Adapters for models users bring: ``hf-clip:PATH_OR_NAME``, ``hf-siglip:PATH_OR_NAME`` (transformers)
and ``open_clip:ARCH/PRETRAINED`` or ``open_clip:local-dir:PATH`` (optional extra). Anything that
follows :class:`Encoder` plugs in the same way.
"""

from __future__ import annotations

from typing import Any

from modalign.encoders.base import Encoder, check_encoder
from modalign.errors import ModalignError
from modalign.spec import parse_spec

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
            ``open_clip:ARCH/PRETRAINED`` or ``open_clip:local-dir:PATH``, each optionally
            followed by ``:key=value,...`` options (``effnet-lite0:image_size=48``; parsed by
            :func:`modalign.spec.parse_spec`).
        modality: the modality name the tower will serve. A single-modality tower serves any
            name of its kind (``effnet-lite0`` for ``sketch`` or ``x-ray``), not another
            built-in modality. For the two-tower adapters it picks the tower (``"image"`` or
            ``"text"``); another name needs the option ``tower=image`` or ``tower=text``.
        options: passed to the tower's constructor (e.g. ``image_size=224``, ``max_length=64``).

    Towers come in eval mode with gradients enabled; wrap calls in ``torch.no_grad()`` to embed.

    Examples:
        >>> import torch
        >>> tower = load_encoder("effnet-lite0", image_size=64)
        >>> (tower.modality, tower.dim)
        ('image', 1280)
    """
    parsed = parse_spec(spec, "tower spec")
    kind, arg = parsed.name, parsed.arg
    options = {**parsed.options, **options}
    if kind not in _SPECS:
        raise ModalignError(f"tower spec {spec!r}: unknown encoder {kind!r}; expected one of "
                            f"{', '.join(_SPECS)} (see available_encoders())")
    if kind in _SINGLE_MODALITY:
        expected = _SINGLE_MODALITY[kind]
        other = [m for m in _SINGLE_MODALITY.values() if m != expected]
        if modality in other:
            raise ModalignError(f"tower spec {spec!r}: {kind} is an {expected} tower and cannot "
                                f"encode {modality!r}; pick a {modality} tower")
    elif modality not in ("image", "text") and "tower" not in options:
        raise ModalignError(
            f"tower spec {spec!r}: {kind} has an image and a text tower; for modality "
            f"{modality!r} say which one with the option tower=image or tower=text "
            f"(e.g. {kind}:MODEL:tower=image)")
    if kind in _TWO_TOWER and not arg:
        example = _SPECS[kind].split(": ", 1)[1]
        raise ModalignError(f"tower spec {spec!r}: {kind} needs a model, e.g. {example}")
    try:
        return _build(kind, arg, modality, options, spec)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ModalignError(f"tower spec {spec!r}: {e}; see `modalign embed --help` and "
                            "docs/encoders.md for each tower's options") from None


def _build(kind: str, arg: str, modality: str | None, options: dict[str, Any], spec: str
           ) -> Encoder:
    if kind == "minilm":
        from modalign.encoders.minilm import MiniLMEncoder

        return MiniLMEncoder(arg or None, **options)
    if kind == "effnet-lite0":
        from modalign.encoders.effnet import EfficientNetLite0Encoder

        return EfficientNetLite0Encoder(arg or None, **options)
    if kind == "logmel":
        from modalign.encoders.logmel import LogMelEncoder

        if arg:
            raise ModalignError(f"tower spec {spec!r}: logmel takes no argument; pass options "
                                "instead, e.g. logmel:n_mels=64")
        return LogMelEncoder(**options)
    which = options.pop("tower", modality)
    if which not in ("image", "text"):
        raise ModalignError(f"tower spec {spec!r}: tower={which!r}, expected image or text")
    if kind in ("hf-clip", "hf-siglip"):
        from modalign.encoders.hf import load_hf_towers

        return load_hf_towers(arg, family=kind.removeprefix("hf-"), **options)[which]
    from modalign.encoders.open_clip import load_open_clip_towers

    return load_open_clip_towers(arg, **options)[which]
