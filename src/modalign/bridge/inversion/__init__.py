"""Modality inversion (OTI: image -> text, OVI: text -> image) after "Cross the Gap".

Pseudo-tokens at a tower's token layer are optimised so that the tower (and a trained head) maps
them onto a target feature of the other modality; the result is a feature of the tower's
modality that stands for the target, for intra-modal tasks done inter-modally.

Examples:
    >>> import torch
    >>> from transformers import CLIPVisionConfig, CLIPVisionModel
    >>> from modalign.bridge.inversion import InversionSettings, ViTInversion, invert
    >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                        num_attention_heads=2, image_size=32, patch_size=16)
    >>> res = invert(torch.randn(2, 32), ViTInversion(CLIPVisionModel(cfg)),
    ...              InversionSettings(steps=5))
    >>> res.features.shape, res.final_cosine.shape
    (torch.Size([2, 32]), torch.Size([2]))
"""

from modalign.bridge.inversion.core import (
    InversionForward,
    InversionResult,
    InversionSettings,
    ProjectedForward,
    cache_key,
    cosine_loss,
    initial_tokens,
    invert,
    sample_seed,
)
from modalign.bridge.inversion.fast_causal import (
    CausalTextInversion,
    clip_text_inversion,
    eos_position,
)
from modalign.bridge.inversion.image_hooks import (
    StageInversion,
    ViTInversion,
    clip_vision_inversion,
    tile_patches,
)
from modalign.bridge.inversion.openai_format import OpenAITextInversion, OpenAIVisionInversion
from modalign.bridge.inversion.text_hooks import (
    BidirectionalTextInversion,
    TemplateTokens,
)
from modalign.bridge.inversion.towers import (
    OFFICIAL_OVI_TOKENS,
    effnet_stage_inversion,
    encoder_inversion,
    official_ovi_tokens,
    text_model_inversion,
    vision_model_inversion,
    vit_geometry,
)

__all__ = [
    "OFFICIAL_OVI_TOKENS",
    "BidirectionalTextInversion",
    "CausalTextInversion",
    "InversionForward",
    "InversionResult",
    "InversionSettings",
    "OpenAITextInversion",
    "OpenAIVisionInversion",
    "ProjectedForward",
    "StageInversion",
    "TemplateTokens",
    "ViTInversion",
    "cache_key",
    "clip_text_inversion",
    "clip_vision_inversion",
    "cosine_loss",
    "effnet_stage_inversion",
    "encoder_inversion",
    "eos_position",
    "initial_tokens",
    "invert",
    "official_ovi_tokens",
    "sample_seed",
    "text_model_inversion",
    "tile_patches",
    "vision_model_inversion",
    "vit_geometry",
]
