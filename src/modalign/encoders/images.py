"""Image inputs for towers: paths or PIL images to RGB (alpha on white), resized and cropped."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modalign.errors import ModalignError

ImageInput = str | os.PathLike[str] | Image.Image


def to_rgb(image: ImageInput, background: tuple[int, int, int] = (255, 255, 255),
           min_side: int | None = None) -> Image.Image:
    """Open ``image`` (a path or a PIL image) as RGB, compositing transparency on ``background``.

    With ``min_side``, a large file is decoded at reduced size (JPEG draft mode, else an integer
    ``reduce``) while its shorter side stays at least ``min_side``: a 12000 x 12000 photo never
    needs its full-resolution pixels in memory twice. Files beyond Pillow's decompression-bomb
    limit are refused with a :class:`~modalign.errors.ModalignError` naming the file.

    Examples:
        >>> from PIL import Image
        >>> im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
        >>> to_rgb(im).getpixel((0, 0))
        (255, 255, 255)
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image path {str(path)!r} is not a file")
        try:
            with Image.open(path) as opened:
                if min_side:
                    opened.draft("RGB", (min_side, min_side))
                opened.load()
                image = opened.copy() if not min_side else _reduce(opened, min_side)
        except Image.DecompressionBombError as e:
            raise ModalignError(f"image {path}: refused as a possible decompression bomb "
                                f"({e})") from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a file path or a PIL.Image, got {type(image).__name__}")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _reduce(image: Image.Image, min_side: int) -> Image.Image:
    factor = min(image.size) // min_side
    return image.reduce(factor) if factor >= 2 else image.copy()


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and crop the centre ``size x size`` square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def images_to_tensor(images: Sequence[ImageInput], size: int) -> torch.Tensor:
    """Stack ``images`` into a ``(B, 3, size, size)`` float32 tensor of 0..255 RGB pixel values.

    Examples:
        >>> from PIL import Image
        >>> images_to_tensor([Image.new("RGB", (10, 20), (255, 0, 0))], size=8).shape
        torch.Size([1, 3, 8, 8])
    """
    if isinstance(images, (str, os.PathLike, Image.Image)) or not isinstance(images, Sequence):
        raise ValueError("images must be a list of file paths or PIL images")
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got an empty list")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (pixels), got {size!r}")
    arrays = [np.asarray(resize_center_crop(to_rgb(im, min_side=2 * size), size), dtype=np.float32)
              for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
