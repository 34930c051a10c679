"""Adapter for open_clip models (optional extra ``modalign[openclip]``), imported only when used.

Specs: ``open_clip:ARCH/PRETRAINED`` (a model of open_clip's registry with a pretrained tag, e.g.
``ViT-B-32/laion2b_s34b_b79k``), ``open_clip:ARCH`` (random weights), ``open_clip:hf-hub:ORG/REPO``
and ``open_clip:local-dir:PATH`` (a folder with ``open_clip_config.json`` and the weights, read by
open_clip itself). When the hub cannot be reached, loading runs with the hub in offline mode, so
weights in the local cache still load and missing ones fail at once.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalign.encoders.base import tower_identity
from modalign.encoders.hub import folder_weights_hash, hub_offline, hub_reachable
from modalign.encoders.images import ImageInput, to_rgb
from modalign.encoders.tower import Tower
from modalign.io import content_hash

INSTALL_HINT = "pip install 'modalign[openclip]'"


def import_open_clip() -> Any:
    """Import ``open_clip`` or raise ``ImportError`` saying how to install it.

    Examples:
        >>> try:
        ...     _ = import_open_clip()
        ... except ImportError as e:
        ...     assert "modalign[openclip]" in str(e)
    """
    try:
        return importlib.import_module("open_clip")
    except ImportError as e:
        raise ImportError(
            f"the open_clip adapter needs the optional extra: {INSTALL_HINT} "
            f"(open_clip_torch and torchvision); import failed with: {e}"
        ) from e


def parse_open_clip_spec(arg: str) -> tuple[str, str | None]:
    """``ARCH/PRETRAINED``, ``ARCH``, ``hf-hub:ORG/REPO`` or ``local-dir:PATH`` -> (model, tag).

    Examples:
        >>> parse_open_clip_spec("ViT-B-32/laion2b_s34b_b79k")
        ('ViT-B-32', 'laion2b_s34b_b79k')
        >>> parse_open_clip_spec("hf-hub:org/repo")
        ('hf-hub:org/repo', None)
    """
    if not isinstance(arg, str) or not arg.strip():
        raise ValueError("open_clip spec must be ARCH/PRETRAINED, ARCH, hf-hub:ORG/REPO or "
                         f"local-dir:PATH, got {arg!r}")
    if arg.startswith("local-dir:"):
        folder = Path(arg.removeprefix("local-dir:")).expanduser()
        if not folder.is_dir():
            raise ValueError(f"open_clip:local-dir:PATH: no such folder {str(folder)!r}")
        return f"local-dir:{folder}", None
    if arg.startswith("hf-hub:"):
        return arg, None
    arch, _, tag = arg.partition("/")
    if not arch or "/" in tag:
        raise ValueError(f"open_clip spec must be ARCH/PRETRAINED (one '/'), got {arg!r}")
    return arch, tag or None


@contextmanager
def _hub_offline_if_unreachable(needs_hub: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode while the hub cannot be reached (no retry waits)."""
    if not needs_hub or hub_offline() or hub_reachable():
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


class _OpenClipTower(Tower):
    # open_clip's CLIP / CustomTextCLIP (open_clip is an optional extra, not typed here), or peft's
    # LoRA wrapper of it: read by name (visual, encode_image, encode_text, transformer, ...).
    model: Any

    def __init__(self, model: nn.Module, name: str, weights_id: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self._weights_id = weights_id

    def blocks(self) -> list[nn.Module]:
        """The tower's transformer (or CNN) stages, when open_clip's model exposes them."""
        trunk = self._trunk()
        resblocks = getattr(getattr(trunk, "transformer", None), "resblocks", None)
        if resblocks is None:
            raise NotImplementedError(f"no known stage list on {type(trunk).__name__}")
        return list(resblocks)

    def _trunk(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def _identity(self, preprocessing: str) -> dict[str, Any]:
        return tower_identity(self, architecture=type(self.model).__name__,
                              weights_hash=self._weights_id, preprocessing=preprocessing,
                              pooling="model's projected features")


class OpenClipImageTower(_OpenClipTower):
    """The image tower of an open_clip model: ``model.encode_image`` after its eval transform.

    ``model`` is the open_clip model (``model.visual`` the image trunk; for ViTs,
    ``model.visual.conv1`` is the patch embedding) and ``transform`` its eval preprocessing.
    """

    modality = "image"

    def __init__(self, model: nn.Module, transform: Any, name: str, weights_id: str) -> None:
        super().__init__(model, name, weights_id)
        self.transform = transform
        self.dim = int(getattr(model.visual, "output_dim", 0)) or self._probe_dim()

    def _trunk(self) -> nn.Module:
        return self.model.visual

    def _probe_dim(self) -> int:
        from PIL import Image

        with torch.no_grad():
            return int(self.encode(self.preprocess([Image.new("RGB", (32, 32))])).shape[-1])

    def preprocess(self, inputs: Sequence[ImageInput]) -> torch.Tensor:
        """Images (paths or PIL, alpha on white) -> the model's eval transform, stacked."""
        if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Sequence) or not inputs:
            raise ValueError("inputs must be a non-empty list of image paths or PIL images")
        return torch.stack([self.transform(to_rgb(x)) for x in inputs])

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Transformed images ``(B, 3, H, W)`` -> ``model.encode_image`` (not normalised)."""
        return self.model.encode_image(batch)

    def identity(self) -> dict[str, Any]:
        return self._identity("open_clip eval transform of the model")


class OpenClipTextTower(_OpenClipTower):
    """The text tower of an open_clip model: its tokenizer, then ``model.encode_text``.

    ``model.token_embedding`` is the token-embedding layer of the usual CLIP text tower.
    """

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, weights_id: str) -> None:
        super().__init__(model, name, weights_id)
        self.tokenizer = tokenizer
        with torch.no_grad():
            self.dim = int(self.encode(self.preprocess(["a"])).shape[-1])

    def _trunk(self) -> nn.Module:
        return self.model

    def preprocess(self, inputs: Sequence[str]) -> torch.Tensor:
        """Strings -> token ids ``(B, context_length)``."""
        if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs:
            raise ValueError("inputs must be a non-empty list of strings")
        if not all(isinstance(t, str) for t in inputs):
            raise ValueError("inputs must be strings")
        return self.tokenizer(list(inputs))

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Token ids -> ``model.encode_text`` (not normalised)."""
        return self.model.encode_text(batch)

    def identity(self) -> dict[str, Any]:
        return self._identity(f"open_clip tokenizer {type(self.tokenizer).__name__}")


def load_open_clip_towers(arg: str) -> dict[str, _OpenClipTower]:
    """Load an open_clip model as ``{"image": ..., "text": ...}`` towers sharing one model.

    Examples:
        (Not run as a doctest: it needs open_clip and the pretrained weights.)

        >>> towers = load_open_clip_towers("ViT-B-32/laion2b_s34b_b79k")  # doctest: +SKIP
        >>> towers["text"].dim                                             # doctest: +SKIP
        512
    """
    model_name, pretrained = parse_open_clip_spec(arg)
    open_clip = import_open_clip()
    needs_hub = model_name.startswith("hf-hub:") or pretrained is not None
    try:
        with _hub_offline_if_unreachable(needs_hub):
            model, _, transform = open_clip.create_model_and_transforms(model_name,
                                                                        pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError) as e:
        raise ValueError(
            f"open_clip:{arg}: could not load the model ({e}). Without a network, download it "
            "elsewhere and pass the folder as open_clip:local-dir:PATH"
        ) from e
    model.eval()
    name = f"open_clip:{arg}"
    if model_name.startswith("local-dir:"):
        weights_id = folder_weights_hash(model_name.removeprefix("local-dir:"))
    else:  # registry or hub weights: identified by name, tag and open_clip version
        weights_id = content_hash(model_name, pretrained, getattr(open_clip, "__version__", "?"))
    return {"image": OpenClipImageTower(model, transform, name, weights_id),
            "text": OpenClipTextTower(model, tokenizer, name, weights_id)}
