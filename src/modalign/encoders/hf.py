"""Adapters for transformers ``CLIPModel`` and ``SiglipModel``: an image and a text tower each.

A folder saved with ``save_pretrained`` (model, image processor and tokenizer) loads offline; a hub
name loads from the hub cache or, with a network, from the hub. Without either, loading fails at
once with a message naming the local-folder alternative.

The towers return the projected embeddings of the model (``get_image_features`` /
``get_text_features``), not normalised. CLIP text is padded to the longest caption of the batch;
SigLIP text is padded to the model's full length, as SigLIP was trained.

The CLIP towers also give token features (``token_counts`` / ``encode_tokens``, for
``embed --tokens``), each token projected as the tower projects its pooled output, so one token
of every row *is* the tower's vector:

- image: the ViT's last-layer states, ``[CLS]`` first then the patches in row-major order
  (``1 + (image_size / patch_size)^2`` tokens), each through ``post_layernorm`` and
  ``visual_projection``; token 0 equals :meth:`HFImageTower.encode`;
- text: the last-layer states after ``final_layer_norm`` of every non-padding token (start and
  end tokens included), each through ``text_projection``; the end-of-text token (the row's last)
  equals :meth:`HFTextTower.encode`.

SigLIP pools its image by an attention head (no token is the pooled vector), so its towers give
no tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modalign.encoders.base import tower_identity
from modalign.encoders.hub import folder_weights_hash, quiet_loading, resolve_model_dir
from modalign.encoders.images import ImageInput, to_rgb
from modalign.encoders.tower import Tower

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FAMILIES = ("clip", "siglip")


def _model_class(family: str) -> type[PreTrainedModel]:
    from transformers import CLIPModel, SiglipModel

    return {"clip": CLIPModel, "siglip": SiglipModel}[family]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "tokenizer.model")


def _require_processor_files(folder: Path, argument: str) -> None:
    """A model folder must hold its image processor and tokenizer, not only the weights."""
    if not folder.is_dir():  # a hub name for from_pretrained to download
        return
    missing = []
    if not (folder / "preprocessor_config.json").is_file():
        missing.append("the image processor (preprocessor_config.json)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ValueError(f"{argument}: {str(folder)!r} lacks {' and '.join(missing)}; save them "
                         "with save_pretrained next to the model")


def _pooled(output: Any) -> torch.Tensor:
    """Projected features from ``get_*_features`` (a tensor, or an output's ``pooler_output``)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _HFTower(Tower):
    """Shared state of the two towers of one transformers model."""

    # A CLIPModel or SiglipModel, or peft's LoRA wrapper of one (apply_lora), which forwards
    # attribute reads to it: its submodules are read by name (vision_model, text_projection, ...),
    # which nn.Module's attribute typing cannot follow.
    model: Any

    def __init__(self, model: PreTrainedModel, name: str, family: str, folder: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.family = family
        self.folder = folder
        self._weights_hash: str | None = None

    def _identity(self, preprocessing: str) -> dict[str, Any]:
        if self._weights_hash is None:
            self._weights_hash = folder_weights_hash(self.folder)
        return tower_identity(self, architecture=type(self.model).__name__,
                              weights_hash=self._weights_hash, preprocessing=preprocessing,
                              pooling="model's projected features")


class HFImageTower(_HFTower):
    """The image tower of a ``CLIPModel`` / ``SiglipModel``.

    ``model`` is the whole transformers model (shared with the text tower), ``image_processor`` the
    folder's image processor; :attr:`patch_embedding` is the ViT's patch-embedding convolution and
    ``model.vision_model`` the ViT (``embeddings``, ``encoder.layers``, ...).

    Examples:
        (Not run as a doctest: it needs a downloaded CLIP or SigLIP model folder.)

        >>> towers = load_hf_towers("path/to/clip-folder", family="clip")  # doctest: +SKIP
        >>> image = towers["image"]                                          # doctest: +SKIP
        >>> vectors = image.encode(image.preprocess(["cat.png"]))            # doctest: +SKIP
    """

    modality = "image"

    def __init__(self, model: PreTrainedModel, image_processor: Any, name: str, family: str,
                 folder: str) -> None:
        super().__init__(model, name, family, folder)
        self.image_processor = image_processor
        self.dim = int(self.model.config.projection_dim if family == "clip"
                       else self.model.config.vision_config.hidden_size)

    @property
    def patch_embedding(self) -> nn.Module:
        """The convolution that turns pixels into patch tokens."""
        return self.model.vision_model.embeddings.patch_embedding

    def preprocess(self, inputs: Sequence[ImageInput]) -> torch.Tensor:
        """Images (paths or PIL, alpha on white) -> ``pixel_values`` from the image processor."""
        if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Sequence) or not inputs:
            raise ValueError("inputs must be a non-empty list of image paths or PIL images")
        images = [to_rgb(x) for x in inputs]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` ``(B, 3, H, W)`` -> projected image features ``(B, dim)``."""
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            raise ValueError("batch must be the (B, 3, H, W) pixel_values that preprocess returns")
        return _pooled(self.model.get_image_features(pixel_values=batch))

    def blocks(self) -> list[nn.Module]:
        """Patch and position embeddings, each ViT layer, then the output norm and projection."""
        vision = self.model.vision_model
        first = [vision.embeddings] + ([vision.pre_layrnorm] if hasattr(vision, "pre_layrnorm")
                                        else [])
        last = [vision.post_layernorm]
        if self.family == "clip":
            last.append(self.model.visual_projection)
        elif getattr(vision, "head", None) is not None:
            last.append(vision.head)
        return [nn.ModuleList(first), *vision.encoder.layers, nn.ModuleList(last)]

    def identity(self) -> dict[str, Any]:
        return self._identity(f"{type(self.image_processor).__name__} of the model folder")


class HFTextTower(_HFTower):
    """The text tower of a ``CLIPModel`` / ``SiglipModel``.

    ``model`` is the whole transformers model, ``tokenizer`` the folder's tokenizer;
    :attr:`token_embedding` is the token-embedding layer and ``model.text_model.embeddings`` takes
    ``inputs_embeds`` (the text transformer itself does not, in transformers 5).
    """

    modality = "text"

    def __init__(self, model: PreTrainedModel, tokenizer: Any, name: str, family: str,
                 folder: str) -> None:
        super().__init__(model, name, family, folder)
        self.tokenizer = tokenizer
        text_config = self.model.config.text_config
        self.max_length = int(text_config.max_position_embeddings)
        if family == "clip":
            self.dim = int(model.config.projection_dim)
        else:
            self.dim = int(getattr(text_config, "projection_size", None) or text_config.hidden_size)

    @property
    def token_embedding(self) -> nn.Embedding:
        """Token ids -> input embeddings."""
        return self.model.text_model.embeddings.token_embedding

    def preprocess(self, inputs: Sequence[str]) -> dict[str, torch.Tensor]:
        """Strings -> token batch (``input_ids`` and, for CLIP, ``attention_mask``)."""
        if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs:
            raise ValueError("inputs must be a non-empty list of strings")
        if not all(isinstance(t, str) for t in inputs):
            raise ValueError("inputs must be strings")
        padding = "max_length" if self.family == "siglip" else True
        tokens = self.tokenizer(list(inputs), padding=padding, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        keep = ("input_ids",) if self.family == "siglip" else ("input_ids", "attention_mask")
        return {k: tokens[k] for k in keep}

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token batch from :meth:`preprocess` -> projected text features ``(B, dim)``."""
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError("batch must be the dict that preprocess returns (input_ids, ...)")
        return _pooled(self.model.get_text_features(**batch))

    def blocks(self) -> list[nn.Module]:
        """Token and position embeddings, each transformer layer, then the final norm and head."""
        text = self.model.text_model
        last = [text.final_layer_norm]
        if self.family == "clip":
            last.append(self.model.text_projection)
        elif getattr(text, "head", None) is not None:
            last.append(text.head)
        return [text.embeddings, *text.encoder.layers, nn.ModuleList(last)]

    def identity(self) -> dict[str, Any]:
        pad = "to the model's length" if self.family == "siglip" else "to the longest"
        return self._identity(f"{type(self.tokenizer).__name__}, padded {pad}, "
                              f"truncated at {self.max_length}")


class CLIPImageTower(HFImageTower):
    """The image tower of a ``CLIPModel``, with patch-token features (see the module docstring).

    Examples:
        (Not run as a doctest: it needs a downloaded CLIP model folder.)

        >>> image = load_hf_towers("path/to/clip-folder")["image"]            # doctest: +SKIP
        >>> states, mask = image.encode_tokens(image.preprocess(["cat.png"]))  # doctest: +SKIP
    """

    def token_counts(self, inputs: Sequence[ImageInput]) -> list[int]:
        """Tokens per image: ``[CLS]`` plus one per patch (the same for every image)."""
        vision = self.model.config.vision_config
        return [1 + (int(vision.image_size) // int(vision.patch_size)) ** 2] * len(inputs)

    def encode_tokens(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` -> projected tokens ``(B, 1 + patches, dim)`` and an all-true mask."""
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            raise ValueError("batch must be the (B, 3, H, W) pixel_values that preprocess returns")
        vision = self.model.vision_model
        states = vision(pixel_values=batch, return_dict=True).last_hidden_state
        tokens = self.model.visual_projection(vision.post_layernorm(states))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


class CLIPTextTower(HFTextTower):
    """The text tower of a ``CLIPModel``, with token features (see the module docstring)."""

    def token_counts(self, inputs: Sequence[str]) -> list[int]:
        """Tokens per text (start and end tokens included, after truncation)."""
        ids = self.tokenizer(list(inputs), truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def encode_tokens(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token batch -> projected token states ``(B, T, dim)`` and the attention mask."""
        if not isinstance(batch, dict) or "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError("batch must be the dict that preprocess returns "
                             "(input_ids, attention_mask)")
        states = self.model.text_model(**batch, return_dict=True).last_hidden_state
        return self.model.text_projection(states), batch["attention_mask"].bool()


def load_hf_towers(path_or_name: str, family: str = "clip") -> dict[str, _HFTower]:
    """Load a transformers ``CLIPModel`` (``family="clip"``) or ``SiglipModel`` as two towers.

    Args:
        path_or_name: a folder saved with ``save_pretrained`` holding the model, its image processor
            and its tokenizer; or a hub name (hub cache, or a network).
        family: ``"clip"`` or ``"siglip"``.

    Returns ``{"image": HFImageTower, "text": HFTextTower}`` sharing one model, in eval mode.

    Examples:
        (Not run as a doctest: it needs a downloaded SigLIP model folder.)

        >>> towers = load_hf_towers("path/to/siglip-folder", family="siglip")  # doctest: +SKIP
        >>> sorted(towers)                                                     # doctest: +SKIP
        ['image', 'text']
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    argument = f"hf-{family}:PATH_OR_NAME"
    class_name = {"clip": "CLIPModel", "siglip": "SiglipModel"}[family]
    folder = resolve_model_dir(path_or_name, argument=argument,
                               kind=f"a transformers {class_name}")
    from transformers import AutoImageProcessor, AutoTokenizer

    _require_processor_files(Path(folder), argument)
    with quiet_loading():
        model = _model_class(family).from_pretrained(folder)
    model.eval()
    try:
        image_processor = AutoImageProcessor.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{argument}: {folder!r} must also hold the image processor and the "
                         f"tokenizer (save_pretrained them next to the model): {e}") from e
    name = f"hf-{family}:{path_or_name}"
    image_cls, text_cls = ((CLIPImageTower, CLIPTextTower) if family == "clip"
                           else (HFImageTower, HFTextTower))
    return {"image": image_cls(model, image_processor, name, family, folder),
            "text": text_cls(model, tokenizer, name, family, folder)}
