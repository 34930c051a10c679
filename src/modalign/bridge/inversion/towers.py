"""Build the inversion forward for a tower of ``modalign.encoders``.

* ``minilm`` (bidirectional BERT): the template at the word-embedding layer, the tower's own
  pooling and normalisation.
* ``effnet-lite0`` (CNN): pseudo-patches at the input of MBConv block ``stage`` (default 0, the
  stem's output, the CNN counterpart of a ViT's patch-embedding output), as a ``sqrt(P)`` grid.
* ``hf-clip`` towers: the exact fast causal text forward or the ViT forward, each followed by the
  model's own projection (what the tower's ``encode`` returns);
* ``hf-siglip`` towers: the full padded text sequence (non-causal, last-token pooling and head;
  exact, nothing cut) or the ViT forward with its attention-pooling head;
* ``open_clip`` towers (and OpenAI ``clip`` or SLIP models): the OpenAI-layout forwards of
  :mod:`modalign.bridge.inversion.openai_format`.

:func:`official_ovi_tokens` gives OVI's ``P`` for an architecture from the official configs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from modalign.bridge.inversion.core import InversionForward, cache_key
from modalign.bridge.inversion.fast_causal import CAUSAL_TEXT_MODEL_TYPES, clip_text_inversion
from modalign.bridge.inversion.image_hooks import StageInversion, clip_vision_inversion
from modalign.bridge.inversion.openai_format import OpenAITextInversion, OpenAIVisionInversion
from modalign.bridge.inversion.text_hooks import BidirectionalTextInversion, TemplateTokens
from modalign.errors import ModalignError

if TYPE_CHECKING:
    from modalign.encoders.effnet import EfficientNetLite0

DEFAULT_TEMPLATE = "a photo of {}"
DEFAULT_PLACEHOLDER = "£"
DEFAULT_CNN_TOKENS = 16


_CONV_BN = (("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
            ("_project_conv", "_bn2"), ("_conv_head", "_bn1"))
"""(convolution, BatchNorm after it) attribute pairs of the built-in EfficientNet modules."""


_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def fold_batchnorm(net: _ModuleT) -> _ModuleT:
    """A frozen eval-mode copy of the built-in EfficientNet with every BatchNorm folded into the
    convolution before it (``w' = w g / sqrt(var + eps)``, ``b' = (b - mean) g / sqrt(var + eps)
    + beta``): the same function up to rounding, with one elementwise pass less per layer.

    Examples:
        >>> import torch
        >>> from modalign.encoders.effnet import EfficientNetLite0
        >>> net = EfficientNetLite0().eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> torch.allclose(fold_batchnorm(net).features(x), net.features(x), atol=1e-5)
        True
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(net).eval()
    for module in list(out.modules()):
        for conv_name, bn_name in _CONV_BN:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return out.requires_grad_(False)


def effnet_stage_inversion(encoder: Any, stage: int = 0,
                           num_tokens: int = DEFAULT_CNN_TOKENS, *,
                           fold_bn: bool = False) -> StageInversion:
    """OVI forward for the built-in EfficientNet-Lite0 tower, entering at block ``stage``.

    The stage's size is that of the tower's ``image_size`` input (48 x 48 x 32 at 96 px for
    ``stage=0``). The output is the tower's pooled 1280-d feature, as ``encode`` gives.
    ``fold_bn=True`` runs a copy with the BatchNorms folded into the convolutions
    (:func:`fold_batchnorm`): about 1.3x faster per step on the CPU, the same function up to
    float32 rounding (a few 1e-6 relative per forward), which Adam's early, nearly sign-like
    steps amplify, so the trajectory is not the exact one of the tower as given.

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

    folded: dict[tuple[Any, ...], EfficientNetLite0] = {}

    def rest(x: torch.Tensor) -> torch.Tensor:
        if not fold_bn:
            return net.features_from(x, stage)
        # The tower with each eval-mode BatchNorm folded into the convolution before it: one
        # pass less per layer, forward and backward. Rebuilt when the tower's weights or
        # BatchNorm statistics change.
        stats = tuple((b.data_ptr(), b._version) for b in net.buffers())
        key = (*cache_key(net, x.dtype, x.device), stats, net.training)
        if key not in folded:
            folded.clear()
            folded[key] = fold_batchnorm(net) if not net.training else net
        return folded[key].features_from(x, stage)

    name = f"{getattr(encoder, 'name', 'cnn')}:block{stage}" + (":folded-bn" if fold_bn else "")
    return StageInversion(rest, channels=int(h.shape[1]), size=(int(h.shape[2]), int(h.shape[3])),
                          num_tokens=num_tokens, name=name,
                          modality=str(getattr(encoder, "modality", "image")))


# OVI's P in the official configs (configs/ovi/*.yaml): (family, patch size, ViT width) -> P.
OFFICIAL_OVI_TOKENS: dict[tuple[str, int, int], int] = {
    ("openai", 32, 768): 1,    # CLIP ViT-B/32
    ("openai", 14, 1024): 4,   # CLIP ViT-L/14
    ("openclip", 32, 768): 1,  # OpenCLIP ViT-B-32 datacomp_xl_s13b_b90k
    ("openclip", 14, 1024): 2,  # OpenCLIP ViT-L-14 datacomp_xl_s13b_b90k
    ("siglip", 16, 768): 4,    # ViT-B-16-SigLIP webli
    ("slip", 16, 768): 1,      # SLIP ViT-B/16
    ("slip", 16, 1024): 2,     # SLIP ViT-L/16
}
OVI_FAMILIES = ("openai", "openclip", "siglip", "slip")


def official_ovi_tokens(family: str, patch_size: int, width: int) -> int:
    """OVI's pseudo-patches ``P`` for an architecture, from the official configs; 1 and a warning
    for an architecture the paper did not run.

    Args:
        family: ``"openai"`` (OpenAI CLIP weights), ``"openclip"`` (other CLIP weights, e.g.
            LAION/DataComp), ``"siglip"`` or ``"slip"``.
        patch_size: the ViT's patch size in pixels.
        width: the ViT's token width.

    Examples:
        >>> official_ovi_tokens("openai", 14, 1024), official_ovi_tokens("openclip", 14, 1024)
        (4, 2)
    """
    if family not in OVI_FAMILIES:
        raise ModalignError(f"family must be one of {', '.join(OVI_FAMILIES)}, got {family!r}")
    p = OFFICIAL_OVI_TOKENS.get((family, int(patch_size), int(width)))
    if p is None:
        warnings.warn(f"no official OVI setting for a {family} ViT with patch {patch_size} and "
                      f"width {width}; using P=1 (set the number of pseudo-patches to override)",
                      stacklevel=2)
        return 1
    return p


def vit_geometry(model: nn.Module) -> tuple[int, int]:
    """``(patch_size, width)`` of a transformers CLIP/SigLIP, open_clip, OpenAI clip or SLIP ViT.

    Examples:
        >>> from transformers import CLIPVisionConfig, CLIPVisionModel
        >>> vit_geometry(CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16)))
        (16, 32)
    """
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", config)
    if vision is not None and hasattr(vision, "patch_size"):
        return int(vision.patch_size), int(vision.hidden_size)
    # open_clip / OpenAI clip / SLIP towers ship no type information: read by attribute
    visual: Any = getattr(model, "visual", model)
    if hasattr(visual, "conv1"):
        return int(visual.conv1.kernel_size[0]), int(visual.conv1.out_channels)
    trunk = getattr(visual, "trunk", visual)
    patch = getattr(getattr(trunk, "patch_embed", None), "proj", None)
    if patch is not None:
        return int(patch.kernel_size[0]), int(patch.out_channels)
    raise ModalignError(f"model: cannot read the ViT patch size and width of "
                        f"{type(model).__name__}")


def text_model_inversion(model: nn.Module, template: TemplateTokens
                         ) -> InversionForward:
    """OTI forward into a transformers CLIP or SigLIP model's joint space, exact for each.

    CLIP (causal, EOS pooling) takes the fast causal path; SigLIP (non-causal, last-token pooling,
    head) runs the full padded template every step. Other model types are refused.

    Examples:
        >>> import torch
        >>> from transformers import SiglipTextConfig, SiglipTextModel
        >>> cfg = SiglipTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8)
        >>> fwd = text_model_inversion(SiglipTextModel(cfg), TemplateTokens((5, 6, 0, 1, 1, 1,
        ...                            1, 1), slot=2))
        >>> fwd(torch.zeros(2, 1, 16)).shape
        torch.Size([2, 16])
    """
    tower = getattr(model, "text_model", model)
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    if model_type in CAUSAL_TEXT_MODEL_TYPES:
        return clip_text_inversion(model, template)
    if model_type in ("siglip", "siglip_text_model"):
        return BidirectionalTextInversion.from_siglip(model, template)
    raise ModalignError(f"model: no text inversion for transformers model_type={model_type!r}; "
                        "supported: clip, siglip")


def vision_model_inversion(model: nn.Module, num_tokens: int = 1
                           ) -> InversionForward:
    """OVI forward into a transformers CLIP/SigLIP or an OpenAI-layout model's joint space."""
    if hasattr(model, "visual"):
        return OpenAIVisionInversion(model, num_tokens)
    return clip_vision_inversion(model, num_tokens)


def _ids_of(tokenizer: Any) -> Any:
    """``text -> {"input_ids": ids}`` for a transformers tokenizer, an open_clip tokenizer
    (strings -> padded id tensor) or any callable returning either."""
    def call(text: str) -> Mapping[str, list[int]]:
        out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1, ids.shape[-1])[0].tolist()
        elif ids and isinstance(ids[0], (list, tuple)):
            ids = ids[0]
        return {"input_ids": [int(i) for i in ids]}
    return call


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
    family = getattr(encoder, "family", None)
    model = getattr(encoder, "model", None)
    if family in ("clip", "siglip") and model is not None:
        if encoder.modality == "text":
            pad = int(encoder.max_length) if family == "siglip" else None
            tokens = TemplateTokens.from_tokenizer(encoder.tokenizer, template, num_tokens or 1,
                                                   placeholder, pad_to=pad)
            return text_model_inversion(model, tokens)
        return clip_vision_inversion(model, num_tokens or 1)
    if model is not None and hasattr(model, "visual") and hasattr(encoder, "modality"):
        # open_clip and SLIP towers (any OpenAI-layout model wrapped as a tower)
        if encoder.modality == "text":
            tokens = TemplateTokens.from_tokenizer(_ids_of(encoder.tokenizer), template,
                                                   num_tokens or 1, placeholder)
            return OpenAITextInversion(model, tokens)
        return OpenAIVisionInversion(model, num_tokens or 1)
    name = getattr(encoder, "name", None) or type(encoder).__name__
    raise ModalignError(f"encoder: no inversion hook for {name}; supported: the minilm and "
                        "effnet-lite0 towers, hf-clip, hf-siglip and open_clip towers (for a bare "
                        "model use text_model_inversion, vision_model_inversion or the "
                        "OpenAI-layout classes)")
