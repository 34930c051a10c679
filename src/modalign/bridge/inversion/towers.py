"""Build the inversion forward for a tower of ``modalign.encoders``.

* ``minilm`` (bidirectional BERT): the template at the word-embedding layer, the tower's own
  pooling and normalisation.
* ``effnet-lite0`` (CNN): pseudo-patches at the input of MBConv block ``stage`` (default 0, the
  stem's output, the CNN counterpart of a ViT's patch-embedding output), as a ``sqrt(P)`` grid.
* ``hf-clip`` towers: the exact fast causal text forward or the ViT forward, each followed by the
  model's own projection (what the tower's ``encode`` returns). SigLIP towers are not supported.
"""

from __future__ import annotations

from typing import Any

import torch

from modalign.bridge.inversion.core import InversionForward
from modalign.bridge.inversion.fast_causal import clip_text_inversion
from modalign.bridge.inversion.image_hooks import StageInversion, clip_vision_inversion
from modalign.bridge.inversion.text_hooks import BidirectionalTextInversion, TemplateTokens

DEFAULT_TEMPLATE = "a photo of {}"
DEFAULT_PLACEHOLDER = "£"
DEFAULT_CNN_TOKENS = 16


def effnet_stage_inversion(encoder: Any, stage: int = 0,
                           num_tokens: int = DEFAULT_CNN_TOKENS) -> StageInversion:
    """OVI forward for the built-in EfficientNet-Lite0 tower, entering at block ``stage``.

    The stage's size is that of the tower's ``image_size`` input (48 x 48 x 32 at 96 px for
    ``stage=0``). The output is the tower's pooled 1280-d feature, as ``encode`` gives.

    Examples:
        >>> import torch
        >>> from modalign.encoders import load_encoder
        >>> fwd = effnet_stage_inversion(load_encoder("effnet-lite0", image_size=64), num_tokens=4)
        >>> (fwd.token_dim, fwd.size, fwd(torch.zeros(1, 4, 32)).shape)
        (32, (32, 32), torch.Size([1, 1280]))
    """
    net = getattr(encoder, "net", None)
    if net is None or not hasattr(net, "features_from"):
        raise ValueError(f"encoder must be the effnet-lite0 tower (with net.features_from); "
                         f"got {type(encoder).__name__}")
    blocks = len(net._blocks)
    if not 0 <= stage < blocks:
        raise ValueError(f"stage must be in [0, {blocks - 1}] (the MBConv block whose input is "
                         f"optimised), got {stage}")
    net.eval()
    size = int(getattr(encoder, "image_size", 96))
    param = next(net.parameters())
    with torch.no_grad():
        h = net.stem(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device))
        for block in net._blocks[:stage]:
            h = block(h)

    def rest(x: torch.Tensor) -> torch.Tensor:
        return net.features_from(x, stage)

    name = f"{getattr(encoder, 'name', 'cnn')}:block{stage}"
    return StageInversion(rest, channels=int(h.shape[1]), size=(int(h.shape[2]), int(h.shape[3])),
                          num_tokens=num_tokens, name=name,
                          modality=str(getattr(encoder, "modality", "image")))


def encoder_inversion(encoder: Any, *, template: str = DEFAULT_TEMPLATE,
                      num_tokens: int | None = None, placeholder: str = DEFAULT_PLACEHOLDER,
                      stage: int = 0) -> InversionForward:
    """The inversion forward for ``encoder`` (its tower features, before any trained head).

    Args:
        encoder: a tower from ``modalign.encoders.load_encoder``.
        template: text template with one ``{}`` (text towers).
        num_tokens: pseudo-tokens ``R`` (text, default 1) or pseudo-patches ``P`` (ViT default 1,
            CNN default 16).
        placeholder: a one-token string marking the slot while tokenizing (text towers).
        stage: the CNN block whose input is optimised.

    Examples:
        >>> from modalign.encoders import load_encoder
        >>> fwd = encoder_inversion(load_encoder("minilm"))
        >>> (fwd.modality, fwd.num_tokens, fwd.token_dim)
        ('text', 1, 384)
    """
    if hasattr(encoder, "encode_embeddings") and hasattr(encoder, "tokenizer"):
        tokens = TemplateTokens.from_tokenizer(encoder.tokenizer, template, num_tokens or 1,
                                               placeholder)
        return BidirectionalTextInversion.from_encoder(encoder, tokens)
    if hasattr(encoder, "net") and hasattr(encoder.net, "features_from"):
        return effnet_stage_inversion(encoder, stage, num_tokens or DEFAULT_CNN_TOKENS)
    if getattr(encoder, "family", None) == "clip" and hasattr(encoder, "model"):
        if encoder.modality == "text":
            tokens = TemplateTokens.from_tokenizer(encoder.tokenizer, template, num_tokens or 1,
                                                   placeholder)
            return clip_text_inversion(encoder.model, tokens)
        return clip_vision_inversion(encoder.model, num_tokens or 1)
    name = getattr(encoder, "name", None) or type(encoder).__name__
    raise ValueError(f"encoder: no inversion hook for {name}; "
                     "supported: the minilm and effnet-lite0 towers and hf-clip towers (for a bare "
                     "transformers CLIP model use CausalTextInversion or ViTInversion)")
