"""Small towers trained from scratch by the contrastive loss alone (the lab's ``scratch`` family).

* :class:`ScratchImageTower`: a four-stage CNN (3x3 convolutions, GroupNorm, GELU, stride 2 in
  every stage) at ``image_size`` pixels, global average pooling and a linear output. Each image
  file is decoded once and kept at ``image_size`` as bytes; while gradients are on (training) the
  tower augments its batch itself on those pixels (random resized crop, colour jitter), so an
  epoch decodes no file (``augments_inputs``: the trainer hands it the raw paths).
* :class:`ScratchTextTower`: token embeddings over the built-in (MiniLM WordPiece) tokenizer and
  mean pooling; with ``layers = 0`` a bag of word pieces (mean-pooled embeddings and a residual
  MLP), else learned positions and a small pre-norm transformer encoder; a linear output; token
  masking (a share of the non-special tokens replaced by ``[MASK]``) while gradients are on.

Neither uses batch norm or dropout (the trainer runs towers in eval mode), so training and
evaluation compute the same function (up to the augmentation). Both are
:class:`~modalign.encoders.tower.Tower` s (the trainer's ``train.unfreeze`` trains all their
stages) and both can be inverted:
:func:`scratch_inversion` gives the OTI forward (pseudo-tokens at the word-embedding layer of
the template ``"a photo of {}"``) or the OVI forward (pseudo-patches at the input of the last
convolutional stage, as the lab does for EfficientNet-Lite0).

Examples:
    >>> import torch
    >>> img = ScratchImageTower(image_size=32, seed=0)
    >>> img.encode(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 128])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.bridge.inversion import (
    BidirectionalTextInversion,
    InversionForward,
    StageInversion,
    TemplateTokens,
)
from modalign.encoders.images import images_to_tensor
from modalign.encoders.tower import Tower

DEFAULT_TEMPLATE = "a photo of {}"
PIXEL_CACHE_ITEMS = 100_000
"""Decoded images kept per process (3 x 32 x 32 bytes each at 32 pixels: about 300 MB)."""
_pixels: dict[tuple[str, int, int], Tensor] = {}  # (file, mtime_ns, side) -> (3, s, s) uint8


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU())


def _pixel_key(image: Any, side: int) -> tuple[str, int, int] | None:
    """The cache key of an image file (its path, modification time and the side), else None."""
    if not isinstance(image, (str, Path)):
        return None
    try:
        return str(image), Path(image).stat().st_mtime_ns, side
    except OSError:
        return None  # images_to_tensor names the missing file


class ScratchImageTower(Tower):
    """A small CNN from random weights (see the module docstring).

    Args:
        image_size: input side in pixels (32-48 keeps a training epoch to seconds on a CPU).
        width: channels of the stem; the stages have ``2w, 4w, 4w``.
        dim: output feature width.
        seed: seed of the initial weights.
        crop_scale: area range of the random resized crop applied while training (aspect
            3/4-4/3); ``(1, 1)`` and ``color_jitter = 0`` turn the augmentation off.
        color_jitter: brightness, contrast and saturation each scaled by a factor drawn from
            ``[1 - j, 1 + j]`` while training.
    """

    modality = "image"
    augments_inputs = True
    """The trainer passes raw inputs unaugmented: :meth:`preprocess` augments them itself."""

    def __init__(self, image_size: int = 40, width: int = 32, dim: int = 128,
                 seed: int = 0, crop_scale: tuple[float, float] = (0.5, 1.0),
                 color_jitter: float = 0.2) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        if width < 8 or width % 8:
            raise ValueError(f"width must be a multiple of 8, got {width!r}")
        lo, hi = (float(v) for v in crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got "
                             f"{crop_scale!r}")
        if not 0 <= color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter!r}")
        self.crop_scale, self.color_jitter = (lo, hi), float(color_jitter)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.stages = nn.ModuleList([
                _conv(3, width, 2),
                nn.Sequential(_conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 1)),
                nn.Sequential(_conv(2 * width, 4 * width, 2), _conv(4 * width, 4 * width, 1)),
                nn.Sequential(_conv(4 * width, 4 * width, 2), _conv(4 * width, 4 * width, 1)),
            ])
            self.out = nn.Linear(4 * width, dim)
        finally:
            torch.random.set_rng_state(gen_state)
        self.image_size, self.width, self.dim, self.seed = image_size, width, dim, seed
        self.name = f"scratch-cnn{image_size}-w{width}-d{dim}"

    def blocks(self) -> list[nn.Module]:
        return [*self.stages, self.out]

    def preprocess(self, inputs: Sequence[Any]) -> Tensor:
        """Images (paths or PIL) -> ``(B, 3, s, s)`` pixels scaled to ``[-1, 1]``; augmented
        (:meth:`augment`) while gradients are on."""
        x = self.pixels(inputs).float() / 127.5 - 1.0
        return self.augment(x) if torch.is_grad_enabled() else x

    def pixels(self, inputs: Sequence[Any]) -> Tensor:
        """``(B, 3, s, s)`` uint8 pixels; a file is decoded and resized once per process (for
        every scratch tower of this size), then reused."""
        inputs = list(inputs)
        if not inputs:
            raise ValueError("inputs must hold at least one image, got an empty list")
        keys = [_pixel_key(x, self.image_size) for x in inputs]
        out: list[Tensor | None] = [None if k is None else _pixels.get(k) for k in keys]
        todo = [i for i, px in enumerate(out) if px is None]
        if todo:
            fresh = images_to_tensor([inputs[i] for i in todo], self.image_size)
            if len(_pixels) + len(todo) > PIXEL_CACHE_ITEMS:
                _pixels.clear()
            for i, px in zip(todo, fresh.round().clamp(0, 255).to(torch.uint8), strict=True):
                out[i] = px
                key = keys[i]
                if key is not None:  # a file: kept; an in-memory image: converted each time
                    _pixels[key] = px
        return torch.stack([px for px in out if px is not None])

    def augment(self, x: Tensor) -> Tensor:
        """Random resized crop (area in ``crop_scale``, aspect 3/4-4/3, bilinear, resized back
        to the input size) and colour jitter of a ``[-1, 1]`` batch, one draw per image."""
        b = len(x)
        lo, hi = self.crop_scale
        if lo < 1:
            area = torch.empty(b).uniform_(lo, hi)
            ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
            sw, sh = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0], theta[:, 1, 1] = sw, sh
            theta[:, 0, 2] = (torch.rand(b) * 2 - 1) * (1 - sw)
            theta[:, 1, 2] = (torch.rand(b) * 2 - 1) * (1 - sh)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                              align_corners=False)
        j = self.color_jitter
        if j > 0:
            def factor() -> Tensor:
                return torch.empty(b, 1, 1, 1).uniform_(1 - j, 1 + j)

            v = (x + 1) / 2 * factor()  # brightness
            mean = v.mean((1, 2, 3), keepdim=True)
            v = (v - mean) * factor() + mean  # contrast
            gray = v.mean(1, keepdim=True)
            v = (v - gray) * factor() + gray  # saturation
            x = v.clamp(0, 1) * 2 - 1
        return x

    def features_from(self, h: Tensor, start: int) -> Tensor:
        """Run stages ``start..`` from that stage's input ``h``, pool, project."""
        for stage in self.stages[start:]:
            h = stage(h)
        return self.out(h.mean((2, 3)))

    def encode(self, batch: Tensor) -> Tensor:
        return self.features_from(batch, 0)

    def stage_shape(self, stage: int) -> tuple[int, int, int]:
        """``(channels, height, width)`` of stage ``stage``'s input at ``image_size``."""
        h = torch.zeros(1, 3, self.image_size, self.image_size)
        with torch.no_grad():
            for s in self.stages[:stage]:
                h = s(h)
        return int(h.shape[1]), int(h.shape[2]), int(h.shape[3])

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality, "dim": self.dim,
                "image_size": self.image_size, "width": self.width, "seed": self.seed}


class ScratchTextTower(Tower):
    """Token embeddings + a small transformer from random weights (see the module docstring).

    Args:
        tokenizer: a transformers tokenizer (default: the MiniLM tower's WordPiece tokenizer).
        width: token width; ``dim``: output feature width.
        layers, heads: transformer depth and attention heads; ``layers = 0``: a bag of word
            pieces (mean-pooled embeddings, then a residual MLP of width ``2 * width``), which
            suits a few thousand short names better than attention over their word order.
        max_length: tokens kept per text (special tokens included).
        token_mask: share of non-special tokens replaced by ``[MASK]`` in batches prepared while
            gradients are on (training); never under ``torch.no_grad`` (evaluation).
        seed: seed of the initial weights.
    """

    modality = "text"

    def __init__(self, tokenizer: Any = None, width: int = 64, dim: int = 128, layers: int = 2,
                 heads: int = 4, max_length: int = 16, token_mask: float = 0.15,
                 seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= token_mask < 1.0:
            raise ValueError(f"token_mask must be in [0, 1), got {token_mask!r}")
        if not isinstance(layers, int) or layers < 0:
            raise ValueError(f"layers must be an int >= 0 (0: a bag of word pieces), got "
                             f"{layers!r}")
        if tokenizer is None:
            from transformers import AutoTokenizer

            from modalign.encoders.minilm import default_model_dir

            tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
        self.tokenizer = tokenizer
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.embed = nn.Embedding(len(tokenizer), width)
            nn.init.normal_(self.embed.weight, std=0.02)
            self.position: nn.Embedding | None = None
            self.encoder: nn.TransformerEncoder | None = None
            self.mlp: nn.Sequential | None = None
            if layers > 0:
                self.position = nn.Embedding(max_length, width)
                nn.init.normal_(self.position.weight, std=0.02)
                layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                   activation="gelu", batch_first=True,
                                                   norm_first=True)
                self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            else:
                self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width),
                                         nn.GELU(), nn.Linear(2 * width, width))
            self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        finally:
            torch.random.set_rng_state(gen_state)
        self.width, self.dim, self.layers, self.max_length = width, dim, layers, max_length
        self.token_mask, self.seed = token_mask, seed
        self.name = f"scratch-text-w{width}-l{layers}-d{dim}"

    def blocks(self) -> list[nn.Module]:
        if self.encoder is None:
            return [self.embed, self.mlp, self.out]  # type: ignore[list-item]
        assert self.position is not None
        return [nn.ModuleList([self.embed, self.position]), *self.encoder.layers, self.out]

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embed

    def preprocess(self, inputs: Sequence[str]) -> dict[str, Tensor]:
        """Strings -> ``input_ids`` and ``attention_mask`` (masked tokens while training)."""
        batch = self.tokenizer(list(inputs), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        mask_id = getattr(self.tokenizer, "mask_token_id", None)
        if self.token_mask > 0 and torch.is_grad_enabled() and mask_id is not None:
            special = torch.zeros_like(ids, dtype=torch.bool)
            for sid in self.tokenizer.all_special_ids:
                special |= ids == sid
            hit = (torch.rand(ids.shape) < self.token_mask) & ~special & mask.bool()
            ids = ids.masked_fill(hit, int(mask_id))
        return {"input_ids": ids, "attention_mask": mask}

    def encode_embeddings(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Features from input embeddings ``(B, T, width)`` (what inversion optimises)."""
        t = inputs_embeds.shape[1]
        if t > self.max_length:
            raise ValueError(f"inputs_embeds: {t} tokens, more than max_length={self.max_length}")
        keep = attention_mask.bool()
        h = inputs_embeds
        if self.encoder is not None:
            assert self.position is not None
            h = self.encoder(h + self.position.weight[:t], src_key_padding_mask=~keep)
        w = keep.unsqueeze(-1).to(h.dtype)
        h = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        if self.mlp is not None:
            h = h + self.mlp(h)
        return self.out(h)

    def encode(self, batch: dict[str, Tensor]) -> Tensor:
        return self.encode_embeddings(self.embed(batch["input_ids"]), batch["attention_mask"])

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality, "dim": self.dim,
                "width": self.width, "layers": self.layers, "max_length": self.max_length,
                "token_mask": self.token_mask, "seed": self.seed}


def scratch_inversion(tower: ScratchImageTower | ScratchTextTower, *, num_tokens: int = 9,
                      template: str = DEFAULT_TEMPLATE) -> InversionForward:
    """The inversion forward of a scratch tower (its features, before any head).

    Text: one pseudo-token in ``template`` at the word-embedding layer. Image: ``num_tokens``
    pseudo-patches (a square number) tiling the input of the last convolutional stage.

    Examples:
        >>> import torch
        >>> fwd = scratch_inversion(ScratchImageTower(image_size=32), num_tokens=4)
        >>> fwd(torch.zeros(2, 4, fwd.token_dim)).shape
        torch.Size([2, 128])
    """
    tower.eval()
    if isinstance(tower, ScratchTextTower):
        tokens = TemplateTokens.from_tokenizer(tower.tokenizer, template, 1)
        return BidirectionalTextInversion(tower.embed, tower.encode_embeddings, tokens,
                                          name=tower.name)
    if isinstance(tower, ScratchImageTower):
        stage = len(tower.stages) - 1
        c, h, w = tower.stage_shape(stage)

        def rest(x: Tensor) -> Tensor:
            return tower.features_from(x, stage)

        return StageInversion(rest, channels=c, size=(h, w), num_tokens=num_tokens,
                              name=f"{tower.name}:stage{stage}")
    raise ValueError(f"tower must be a ScratchImageTower or ScratchTextTower, got "
                     f"{type(tower).__name__}")

