"""Towers that turn raw inputs into vectors; ``load_encoder`` builds one from a spec string.

Built-in towers (all offline): ``minilm`` (text), ``effnet-lite0`` (image), ``logmel`` (audio).
Adapters for models users bring: ``hf-clip:PATH_OR_NAME``, ``hf-siglip:PATH_OR_NAME`` (transformers)
and ``open_clip:ARCH/PRETRAINED`` or ``open_clip:local-dir:PATH`` (optional extra). Anything that
follows :class:`Encoder` plugs in the same way; :func:`register_encoder` gives it a spec name, so a
model trained with it reloads through ``MultiTowerModel.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modalign.encoders.base import Encoder, check_encoder
from modalign.errors import ModalignError, ProtocolError
from modalign.spec import parse_spec

__all__ = ["Encoder", "EncoderFactory", "ProtocolError", "available_encoders", "check_encoder",
           "load_encoder", "register_encoder", "registered_encoder", "unregister_encoder"]

EncoderFactory = Callable[..., Encoder]
"""``factory(arg, modality, **options) -> Encoder``: ``arg`` is the part of the spec after the name
("" if none), ``modality`` the modality name the tower will serve (or None), ``options`` the spec's
``key=value`` options and any keyword arguments given to :func:`load_encoder`."""


@dataclass(frozen=True)
class _Entry:
    factory: EncoderFactory
    description: str
    kind: str | None  # the one modality kind the tower serves; None: any
    pair: bool  # an image and a text tower behind one spec (``tower=image|text`` picks)
    needs_arg: str  # an example argument when one is required, else ""


_REGISTRY: dict[str, _Entry] = {}


def register_encoder(name: str, factory: EncoderFactory, *, description: str = "",
                     kind: str | None = None, pair: bool = False, needs_arg: str = "",
                     replace: bool = False) -> None:
    """Make ``name`` (and ``name:ARG:key=value,...``) a tower spec that :func:`load_encoder` builds.

    Args:
        name: the spec name, without ``:``.
        factory: called as ``factory(arg, modality, **options)`` and returns an :class:`Encoder`
            whose ``name`` is a spec that rebuilds it (that string is what a trained model stores).
        description: one line for :func:`available_encoders` and ``--help``.
        kind: the modality kind the tower serves (``"image"``): it serves any modality name
            (``sketch``) except the other built-in kinds. None: any modality.
        pair: the spec holds an image and a text tower; the modality (or ``tower=``) picks one.
        needs_arg: an example spec when the tower needs an argument (``"hf-clip:DIR"``).
        replace: allow re-registering an existing name.

    Examples:
        >>> import torch, types
        >>> def ones(arg, modality, dim=3):  # a tower of one's own, built from its spec
        ...     return types.SimpleNamespace(
        ...         name=f"ones:dim={dim}", modality=modality, dim=dim, preprocess=len,
        ...         encode=lambda n: torch.ones(n, dim), identity=lambda: {"name": "ones"})
        >>> register_encoder("ones", ones, replace=True)
        >>> tower = load_encoder("ones:dim=4", modality="caption")
        >>> tower.encode(tower.preprocess(["a", "b"])).shape
        torch.Size([2, 4])
        >>> unregister_encoder("ones")
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ModalignError(f"register_encoder: name must be a non-empty string without ':', "
                            f"got {name!r}")
    if not callable(factory):
        raise ProtocolError(f"register_encoder({name!r}): factory must be callable, got "
                            f"{type(factory).__name__}")
    if name in _REGISTRY and not replace:
        raise ModalignError(f"register_encoder: {name!r} is already registered; pass "
                            "replace=True to replace it")
    _REGISTRY[name] = _Entry(factory, description or f"{name} (registered tower)", kind, pair,
                             needs_arg)


def unregister_encoder(name: str) -> None:
    """Forget the tower registered as ``name`` (a built-in one too); unknown names raise.

    Examples:
        >>> registered_encoder("nothing-here")
        False
    """
    if name not in _REGISTRY:
        raise ModalignError(f"unregister_encoder: {name!r} is not registered; registered: "
                            f"{', '.join(_REGISTRY)}")
    del _REGISTRY[name]


def registered_encoder(name: str) -> bool:
    """Whether ``name`` (a spec's name part) is a registered tower.

    Examples:
        >>> registered_encoder("effnet-lite0"), registered_encoder("resnet50")
        (True, False)
    """
    return name in _REGISTRY


def available_encoders() -> dict[str, str]:
    """Spec names ``load_encoder`` understands, each with a one-line description.

    Examples:
        >>> sorted(available_encoders())[:3]
        ['effnet-lite0', 'hf-clip', 'hf-siglip']
    """
    return {name: entry.description for name, entry in _REGISTRY.items()}


def load_encoder(spec: str, modality: str | None = None, **options: Any) -> Encoder:
    """Build the tower named by ``spec``.

    Args:
        spec: ``minilm``, ``minilm:PATH_OR_NAME``, ``effnet-lite0``, ``effnet-lite0:WEIGHTS``,
            ``logmel``, ``hf-clip:PATH_OR_NAME``, ``hf-siglip:PATH_OR_NAME``,
            ``open_clip:ARCH/PRETRAINED`` or ``open_clip:local-dir:PATH`` (or a name given to
            :func:`register_encoder`), each optionally followed by ``:key=value,...`` options
            (``effnet-lite0:image_size=48``; parsed by :func:`modalign.spec.parse_spec`).
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
    entry = _REGISTRY.get(kind)
    if entry is None:
        raise ModalignError(f"tower spec {spec!r}: unknown encoder {kind!r}; expected one of "
                            f"{', '.join(_REGISTRY)} (see available_encoders(); a tower of "
                            "your own needs register_encoder first)")
    if entry.kind is not None:
        others = {e.kind for e in _REGISTRY.values() if e.kind not in (None, entry.kind)}
        if modality in others:
            raise ModalignError(f"tower spec {spec!r}: {kind} is an {entry.kind} tower and "
                                f"cannot encode {modality!r}; pick a {modality} tower")
    if entry.pair and modality not in ("image", "text") and "tower" not in options:
        raise ModalignError(
            f"tower spec {spec!r}: {kind} has an image and a text tower; for modality "
            f"{modality!r} say which one with the option tower=image or tower=text "
            f"(e.g. {kind}:MODEL:tower=image)")
    if entry.needs_arg and not arg:
        raise ModalignError(f"tower spec {spec!r}: {kind} needs a model, e.g. {entry.needs_arg}")
    try:
        encoder = entry.factory(arg, modality, **options)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ModalignError(f"tower spec {spec!r}: {e}; see `modalign embed --help` and "
                            "docs/encoders.md for each tower's options") from None
    return check_encoder(encoder)


def _pick(spec_name: str, arg: str, modality: str | None, options: dict[str, Any]) -> str:
    which = options.pop("tower", modality)
    if which not in ("image", "text"):
        raise ModalignError(f"tower spec {spec_name}:{arg}: tower={which!r}, expected image or "
                            "text")
    return str(which)


def _no_arg(name: str, arg: str) -> None:
    if arg:
        raise ModalignError(f"tower spec {name}:{arg}: {name} takes no argument; pass options "
                            f"instead, e.g. {name}:n_mels=64")


def _minilm(arg: str, modality: str | None, **options: Any) -> Encoder:
    from modalign.encoders.minilm import MiniLMEncoder

    return MiniLMEncoder(arg or None, **options)


def _effnet(arg: str, modality: str | None, **options: Any) -> Encoder:
    from modalign.encoders.effnet import EfficientNetLite0Encoder

    return EfficientNetLite0Encoder(arg or None, **options)


def _logmel(arg: str, modality: str | None, **options: Any) -> Encoder:
    from modalign.encoders.logmel import LogMelEncoder

    _no_arg("logmel", arg)
    return LogMelEncoder(**options)


def _hf(family: str) -> EncoderFactory:
    def factory(arg: str, modality: str | None, **options: Any) -> Encoder:
        from modalign.encoders.hf import load_hf_towers

        which = _pick(f"hf-{family}", arg, modality, options)
        return load_hf_towers(arg, family=family, **options)[which]

    return factory


def _open_clip(arg: str, modality: str | None, **options: Any) -> Encoder:
    from modalign.encoders.open_clip import load_open_clip_towers

    which = _pick("open_clip", arg, modality, options)
    return load_open_clip_towers(arg, **options)[which]


register_encoder("minilm", _minilm, kind="text", description=(
    "text: all-MiniLM-L6-v2 (384-d); minilm:PATH_OR_NAME for another sentence-transformers BERT "
    "folder"))
register_encoder("effnet-lite0", _effnet, kind="image", description=(
    "image: EfficientNet-Lite0 ImageNet (1280-d); effnet-lite0:WEIGHTS.safetensors|.pth for "
    "other weights"))
register_encoder("logmel", _logmel, kind="audio", description=(
    "audio: log-mel spectrogram image through EfficientNet-Lite0 (1280-d)"))
register_encoder("hf-clip", _hf("clip"), pair=True, needs_arg="hf-clip:PATH_OR_NAME",
                 description="image or text: hf-clip:PATH_OR_NAME, a transformers CLIPModel folder")
register_encoder("hf-siglip", _hf("siglip"), pair=True, needs_arg="hf-siglip:PATH_OR_NAME",
                 description=("image or text: hf-siglip:PATH_OR_NAME, a transformers SiglipModel "
                              "folder"))
register_encoder("open_clip", _open_clip, pair=True,
                 needs_arg="open_clip:ARCH/PRETRAINED or open_clip:local-dir:PATH",
                 description=("image or text: open_clip:ARCH/PRETRAINED or "
                              "open_clip:local-dir:PATH (pip install 'modalign[openclip]')"))
