"""Exact fast OTI forward for causal text towers with EOS pooling (transformers CLIP).

With causal attention, position ``t`` only sees positions ``<= t``. Two consequences, both exact:

* the pooled EOS state does not depend on anything after EOS, so only ``eos + 1`` positions are
  run instead of the padded context (6 of 77 for ``"a photo of {}"`` with R = 1);
* the positions before the pseudo-tokens (SOT and the template's leading words) never see them,
  so their keys and values at every layer are computed once (they are the same for every sample)
  and each step runs only the slot and what follows it, attending to the cached prefix.

In the last layer only the EOS row's query, attention output and MLP are needed, since only that
row is pooled. The result equals the full-length forward up to floating-point rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.bridge.inversion.core import PreNormLayer, ProjectedForward, cache_key
from modalign.bridge.inversion.text_hooks import TemplateTokens, fill_slot
from modalign.errors import ModalignError

# transformers model types whose text tower is causal with EOS pooling (what this path computes).
CAUSAL_TEXT_MODEL_TYPES = ("clip", "clip_text_model")


def eos_position(ids: tuple[int, ...] | list[int], eos_token_id: int | None = None) -> int:
    """The pooled position: the first ``eos_token_id``, or the largest id (OpenAI convention).

    Examples:
        >>> eos_position([49406, 320, 999, 49407, 0, 0])
        3
        >>> eos_position([5, 9, 7, 9], eos_token_id=9)
        1
    """
    ids = list(ids)
    if not ids:
        raise ValueError("ids must not be empty")
    if eos_token_id is None or eos_token_id == 2:  # 2: configs saved before the EOS id fix
        return max(range(len(ids)), key=lambda i: (ids[i], -i))
    if eos_token_id not in ids:
        raise ValueError(f"ids must contain eos_token_id={eos_token_id}")
    return ids.index(eos_token_id)


class CausalTextInversion:
    """OTI forward for a transformers CLIP text tower, running only what can change.

    Args:
        text_model: ``CLIPTextModel`` (or a module with ``text_model``, e.g. ``CLIPModel``):
            ``embeddings.{token,position}_embedding``, ``encoder.layers`` of pre-LN blocks,
            ``final_layer_norm``. Put in eval mode. Other model types (SigLIP's non-causal text
            tower with last-token pooling and a head) are refused: use
            :func:`modalign.bridge.inversion.towers.text_model_inversion`, which routes them to
            the exact full-sequence path.
        template: the template's token ids and slot; must end at or after its EOS.
        eos_token_id: the pooled token; default the config's ``eos_token_id`` (the largest id
            when that is the legacy value 2 or missing).
        cache_prefix: compute the positions before the slot once (exact); False runs them at
            every step (still truncated at EOS).

    Examples:
        >>> import torch
        >>> from transformers import CLIPTextConfig, CLIPTextModel
        >>> cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
        ...                      num_hidden_layers=2, num_attention_heads=2, eos_token_id=99)
        >>> fwd = CausalTextInversion(CLIPTextModel(cfg), TemplateTokens((98, 5, 6, 0, 99), 3))
        >>> fwd(torch.zeros(4, 1, 32)).shape
        torch.Size([4, 32])
    """

    modality = "text"

    def __init__(self, text_model: nn.Module, template: TemplateTokens, *,
                 eos_token_id: int | None = None, cache_prefix: bool = True) -> None:
        # The transformers CLIP text tower (CLIPTextModel, or the CLIPTextTransformer inside it
        # before transformers 5), read by attribute: checked below, typed loosely.
        tower: Any = getattr(text_model, "text_model", text_model)
        for attr in ("embeddings", "encoder", "final_layer_norm"):
            if not hasattr(tower, attr):
                raise ModalignError(f"text_model must be a transformers CLIP text tower (with "
                                    f"embeddings, encoder, final_layer_norm); lacks {attr}")
        model_type = getattr(getattr(tower, "config", None), "model_type", None)
        if model_type not in CAUSAL_TEXT_MODEL_TYPES:
            raise ModalignError(
                f"text_model: the causal fast path serves only CLIP text towers (model_type "
                f"{' or '.join(CAUSAL_TEXT_MODEL_TYPES)}), got model_type={model_type!r}; a "
                "non-causal tower (SigLIP) would be run with the wrong mask, cut at EOS and lose "
                "its pooling and head. Use text_model_inversion(), which picks the exact path")
        self.tower = tower.eval()
        if eos_token_id is None:
            eos_token_id = getattr(tower.config, "eos_token_id", None)
        self.template = template
        self.pool_index = eos_position(template.ids, eos_token_id)
        if self.pool_index < template.slot + template.num_tokens - 1:
            raise ValueError(f"template's EOS (position {self.pool_index}) must come after the "
                             f"slot (positions {template.slot}..)")
        self.cache_prefix = cache_prefix
        self.num_tokens = template.num_tokens
        self.token_dim = int(tower.embeddings.token_embedding.weight.shape[1])
        self._cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def _fixed(self, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Template embeddings, positions and (if cached) the prefix keys/values, once per
        weights, dtype, device and autocast state (see :func:`cache_key`)."""
        key = cache_key(self.tower, dtype, device)
        if key in self._cache:
            return self._cache[key]
        self._cache.clear()
        t, end = self.template, self.pool_index + 1
        emb = self.tower.embeddings
        with torch.no_grad():
            ids = torch.tensor(t.ids[:end], device=device)[None]
            tok = emb.token_embedding(ids).to(dtype)
            pos = emb.position_embedding.weight[:end].to(dtype)[None]
            fixed: dict[str, Any] = {
                "prefix": tok[:, : t.slot], "suffix": tok[:, t.slot + t.num_tokens:],
                "pos": pos, "past": None,
            }
            if self.cache_prefix and t.slot > 0:
                h = fixed["prefix"] + pos[:, : t.slot]
                past = []
                for layer in self.tower.encoder.layers:
                    h, k, v = causal_block(layer, h, None, last_only=False)
                    past.append((k, v))
                fixed["past"] = past
        self._cache[key] = fixed
        return fixed

    def __call__(self, tokens: Tensor) -> Tensor:
        fixed = self._fixed(tokens.dtype, tokens.device)
        slot = self.template.slot
        if fixed["past"] is None:
            h = fill_slot(tokens, fixed["prefix"], fixed["suffix"]) + fixed["pos"]
            pasts: list[Any] = [None] * len(self.tower.encoder.layers)
        else:
            h = fill_slot(tokens, fixed["prefix"][:, :0], fixed["suffix"]) + fixed["pos"][:, slot:]
            pasts = fixed["past"]
        layers = self.tower.encoder.layers
        for i, (layer, past) in enumerate(zip(layers, pasts)):
            h, _, _ = causal_block(layer, h, past, last_only=i == len(layers) - 1)
        return self.tower.final_layer_norm(h[:, -1])

    def identity(self) -> dict[str, Any]:
        return {"kind": "causal-text", "tower": type(self.tower).__name__,
                "template": self.template.text, "ids": list(self.template.ids),
                "slot": self.template.slot, "num_tokens": self.num_tokens,
                "pool_index": self.pool_index}


def causal_block(layer: PreNormLayer, h: Tensor, past: tuple[Tensor, Tensor] | None, *,
                 last_only: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One pre-LN CLIP encoder layer on ``h`` (B, S, d) that follows ``past`` keys/values.

    Returns the new hidden states (only the last row when ``last_only``) and this layer's keys
    and values of ``h``'s positions, shape ``(B, heads, S, head_dim)``.
    """
    attn = layer.self_attn
    b, s, d = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    x = layer.layer_norm1(h)

    def split(t: Tensor) -> Tensor:
        return t.view(b, -1, heads, head_dim).transpose(1, 2)

    k, v = split(attn.k_proj(x)), split(attn.v_proj(x))
    rows = x[:, -1:] if last_only else x
    q = split(attn.q_proj(rows))
    keys, values = k, v
    n_past = 0
    if past is not None:
        n_past = past[0].shape[2]
        keys = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
    q_pos = torch.arange(s - q.shape[2], s, device=h.device) + n_past
    k_pos = torch.arange(n_past + s, device=h.device)
    mask = k_pos[None, :] <= q_pos[:, None]  # True = attend
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scale)
    out = attn.out_proj(out.transpose(1, 2).reshape(b, q.shape[2], d))
    res = (h[:, -1:] if last_only else h) + out
    res = res + layer.mlp(layer.layer_norm2(res))
    return res, k, v


def clip_text_inversion(model: nn.Module, template: TemplateTokens, *,
                        cache_prefix: bool = True) -> ProjectedForward | CausalTextInversion:
    """OTI forward into a transformers ``CLIPModel``'s own joint space (its ``text_projection``).

    A bare ``CLIPTextModel`` (no projection) gives the tower forward alone.

    Examples:
        >>> import torch
        >>> from transformers import CLIPConfig, CLIPModel
        >>> cfg = CLIPConfig(text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, eos_token_id=99),
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=2, image_size=32, patch_size=16), projection_dim=8)
        >>> fwd = clip_text_inversion(CLIPModel(cfg), TemplateTokens((98, 5, 0, 99), 2))
        >>> fwd(torch.zeros(2, 1, 32)).shape
        torch.Size([2, 8])
    """
    base = CausalTextInversion(model, template, cache_prefix=cache_prefix)
    projection = getattr(model, "text_projection", None)
    if projection is None:
        return base
    return ProjectedForward(base, projection.eval(), head_name="text_projection")
