"""Image towers run from pseudo-patches (OVI).

ViT: the patch-embedding convolution is bypassed. ``P`` pseudo-patch tokens are tiled over the
``N`` patch positions in raster order by nearest interpolation (patch ``i`` takes token
``floor(i * P / N)``, contiguous runs of about ``N / P`` positions); the learned class token is
prepended and the learned positional embeddings added, then the tower runs as usual and pools its
class token.

CNN (EfficientNet-Lite0): there are no tokens, so the pseudo-patches enter at the input of an early
stage. ``P`` vectors of that stage's channel width form a ``g x g`` map (``P = g * g``), upsampled
by nearest interpolation to the stage's spatial size, and the rest of the network runs from there.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.bridge.inversion.core import PreNormLayer, ProjectedForward
from modalign.errors import ModalignError


def tile_patches(tokens: Tensor, num_patches: int) -> Tensor:
    """Spread ``(B, P, d)`` tokens over ``num_patches`` positions by nearest interpolation.

    Patch ``i`` takes token ``floor(i * P / num_patches)``, as ``F.interpolate(mode="nearest")``.

    Examples:
        >>> import torch
        >>> tile_patches(torch.arange(2.0).view(1, 2, 1), 5)[0, :, 0].tolist()
        [0.0, 0.0, 0.0, 1.0, 1.0]
    """
    p = tokens.shape[1]
    if not 1 <= p <= num_patches:
        raise ValueError(f"the number of pseudo-patches must be in [1, {num_patches}], got {p}")
    index = (torch.arange(num_patches, device=tokens.device) * p) // num_patches
    return tokens[:, index]


def _clip_layer(layer: nn.Module) -> bool:
    """True for a pre-norm CLIP encoder layer whose parts :func:`_class_token_layer` uses."""
    attn = getattr(layer, "self_attn", None)
    return all(hasattr(layer, a) for a in ("layer_norm1", "layer_norm2", "mlp")) and all(
        hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scale"))


def _run_layer(layer: nn.Module, h: Tensor) -> Tensor:
    """One transformers encoder layer without a mask (its signature differs across versions)."""
    params = inspect.signature(layer.forward).parameters
    extra = {"causal_attention_mask": None} if "causal_attention_mask" in params else {}
    out = layer(h, None, **extra)
    return out[0] if isinstance(out, tuple) else out


def _class_token_layer(layer: PreNormLayer, h: Tensor) -> Tensor:
    """A CLIP encoder layer's output at position 0 only, ``(B, 1, d)``: keys and values come
    from every position; the query, the output projection and the MLP run for one row."""
    attn = layer.self_attn
    b, t, _ = h.shape
    x = layer.layer_norm1(h)
    q = attn.q_proj(x[:, :1]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    h0 = h[:, :1] + attn.out_proj(out.transpose(1, 2).reshape(b, 1, -1))
    return h0 + layer.mlp(layer.layer_norm2(h0))


class ViTInversion:
    """OVI forward for a transformers CLIP or SigLIP vision tower.

    Args:
        vision_model: a ``CLIPVisionModel``/``CLIPModel`` (``embeddings.{class_embedding,
            position_embedding}``, ``pre_layrnorm``, ``encoder``, ``post_layernorm``; pooled at
            the class token) or a ``SiglipVisionModel``/``SiglipModel`` (no class token, no
            pre-norm; pooled by its attention-pooling ``head``).
        num_tokens: pseudo-patches ``P`` (see :func:`~modalign.bridge.inversion.official_ovi_tokens`
            for the official choice).

    Examples:
        >>> import torch
        >>> from transformers import CLIPVisionConfig, CLIPVisionModel
        >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                        num_attention_heads=2, image_size=32, patch_size=16)
        >>> ViTInversion(CLIPVisionModel(cfg))(torch.zeros(3, 1, 32)).shape
        torch.Size([3, 32])
    """

    modality = "image"

    def __init__(self, vision_model: nn.Module, num_tokens: int = 1) -> None:
        # The transformers CLIP or SigLIP vision tower (its class differs across transformers
        # versions), read by attribute: checked below, typed loosely.
        tower: Any = getattr(vision_model, "vision_model", vision_model)
        for attr in ("embeddings", "encoder", "post_layernorm"):
            if not hasattr(tower, attr):
                raise ModalignError(f"vision_model must be a transformers CLIP or SigLIP vision "
                                    f"tower; lacks {attr}")
        self.tower = tower.eval()
        emb = tower.embeddings
        self.class_token = hasattr(emb, "class_embedding")
        if not self.class_token and getattr(tower, "head", None) is None:
            raise ModalignError("vision_model: a tower without a class token must have a pooling "
                                "head (SigLIP with vision_use_head=True)")
        self.num_patches = int(emb.num_patches)
        if not 1 <= num_tokens <= self.num_patches:
            raise ModalignError(f"num_tokens must be in [1, {self.num_patches}], got {num_tokens}")
        self.num_tokens = num_tokens
        self.token_dim = int(emb.position_embedding.weight.shape[1])
        layers = getattr(tower.encoder, "layers", None)
        self._layers = layers if layers and all(_clip_layer(m) for m in layers) else None

    def __call__(self, tokens: Tensor) -> Tensor:
        emb = self.tower.embeddings
        h = tile_patches(tokens, self.num_patches)
        if self.class_token:
            cls = emb.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
            h = torch.cat([cls, h], dim=1)
        h = h + emb.position_embedding.weight.to(tokens.dtype)[None]
        pre = getattr(self.tower, "pre_layrnorm", None)
        if pre is not None:
            h = pre(h)
        if self.class_token and self._layers is not None:
            # Only the class token leaves the last layer: every layer before it runs in full,
            # the last one computes keys and values of all positions but the query, output
            # projection and MLP of the class token alone.
            for layer in self._layers[:-1]:
                h = _run_layer(layer, h)
            return self.tower.post_layernorm(_class_token_layer(self._layers[-1], h)[:, 0])
        h = self.tower.encoder(inputs_embeds=h).last_hidden_state
        if self.class_token:
            return self.tower.post_layernorm(h[:, 0])
        return self.tower.head(self.tower.post_layernorm(h))

    def identity(self) -> dict[str, Any]:
        return {"kind": "vit", "tower": type(self.tower).__name__,
                "pooling": "class token" if self.class_token else "attention-pooling head",
                "num_patches": self.num_patches, "num_tokens": self.num_tokens}


def clip_vision_inversion(model: nn.Module, num_tokens: int = 1) -> ProjectedForward | ViTInversion:
    """OVI forward into a transformers model's own joint space.

    ``CLIPModel``: the tower then its ``visual_projection``; ``SiglipModel``: the tower with its
    pooling head (SigLIP has no separate projection).

    Examples:
        >>> import torch
        >>> from transformers import CLIPConfig, CLIPModel
        >>> cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2),
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=2, image_size=32, patch_size=16), projection_dim=8)
        >>> clip_vision_inversion(CLIPModel(cfg))(torch.zeros(2, 1, 32)).shape
        torch.Size([2, 8])
    """
    base = ViTInversion(model, num_tokens)
    projection = getattr(model, "visual_projection", None)
    if projection is None:
        return base
    return ProjectedForward(base, projection.eval(), head_name="visual_projection")


class StageInversion:
    """OVI forward for a CNN: pseudo-patches enter at the input of one stage of the network.

    Args:
        rest: maps the stage input ``(B, C, H, W)`` to pooled features ``(B, dim)`` (the remaining
            blocks, head convolution and pooling), in eval mode.
        channels: ``C``, the stage input's channel count (the pseudo-patch width).
        size: ``(H, W)``, the stage input's spatial size for the tower's image size.
        num_tokens: ``P``, a square number: the pseudo-patches form a ``sqrt(P)`` grid.
        name: the tower and stage, for manifests.
        modality: the tower's modality (``"audio"`` for a spectrogram CNN).

    Examples:
        >>> import torch
        >>> rest = lambda x: x.mean((2, 3))
        >>> StageInversion(rest, channels=8, size=(6, 6), num_tokens=4)(torch.zeros(2, 4, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, rest: Callable[[Tensor], Tensor], channels: int, size: tuple[int, int],
                 num_tokens: int = 1, name: str = "cnn", modality: str = "image") -> None:
        grid = math.isqrt(num_tokens)
        if num_tokens < 1 or grid * grid != num_tokens:
            raise ValueError(f"num_tokens must be a square number (1, 4, 9, ...), got {num_tokens}")
        if grid > min(size):
            raise ValueError(f"num_tokens={num_tokens} needs a grid finer than the stage "
                             f"size {size}")
        self.rest = rest
        self.token_dim = int(channels)
        self.size = (int(size[0]), int(size[1]))
        self.num_tokens = num_tokens
        self.grid = grid
        self.name = name
        self.modality = modality

    def __call__(self, tokens: Tensor) -> Tensor:
        b = tokens.shape[0]
        fmap = tokens.transpose(1, 2).reshape(b, self.token_dim, self.grid, self.grid)
        fmap = nn.functional.interpolate(fmap, size=self.size, mode="nearest")
        return self.rest(fmap)

    def identity(self) -> dict[str, Any]:
        return {"kind": "cnn-stage", "tower": self.name, "channels": self.token_dim,
                "size": list(self.size), "num_tokens": self.num_tokens}
