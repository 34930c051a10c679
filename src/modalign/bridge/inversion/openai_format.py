"""Inversion forwards for towers in the OpenAI CLIP layout: open_clip, OpenAI ``clip``, SLIP.

These models keep their weights as the original CLIP code does: the text side has
``token_embedding``, ``positional_embedding``, ``transformer`` (residual blocks of
``nn.MultiheadAttention``), ``ln_final`` and ``text_projection`` (a parameter or a linear layer),
with a causal ``attn_mask`` or none; the image side is either a ``VisionTransformer`` (``conv1``,
``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer``, ``ln_post``, ``proj``)
or a timm ViT trunk (``pos_embed``, ``cls_token``, ``norm_pre``, ``blocks``, ``norm``,
``forward_head``), as in open_clip's SigLIP and in SLIP.

Both forwards run what the model's own ``encode_*`` runs, so they are exact for causal and
non-causal towers alike: every patch for images; for text, the padded context, except that a
causal tower pooled at its EOT (a model-level causal ``attn_mask`` passed to its transformer, as
open_clip's CLIP and SLIP have) runs only the positions up to the EOT (6 of 77 for
``"a photo of {}"``), which no earlier position can see past. The pseudo-tokens replace the
placeholder's token embeddings (text) or the patch-embedding output (images) before the
positional embeddings are added, as in the official code.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from modalign.bridge.inversion.core import cache_key
from modalign.bridge.inversion.image_hooks import tile_patches
from modalign.bridge.inversion.text_hooks import TemplateTokens, fill_slot
from modalign.errors import ModalignError


def _project(x: Tensor, projection: Any) -> Tensor:
    if projection is None:
        return x
    if isinstance(projection, nn.Module):
        return projection(x)
    return x @ projection


def _run_transformer(transformer: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    """Run an OpenAI-layout transformer on batch-first ``x`` (sequence-first inside if needed)."""
    batch_first = bool(getattr(transformer, "batch_first", False))
    if not batch_first:
        x = x.permute(1, 0, 2)
    if "attn_mask" in inspect.signature(transformer.forward).parameters:
        x = transformer(x, attn_mask=attn_mask)
    else:  # the OpenAI ``clip`` package: the mask lives in each block
        x = transformer(x)
    return x if batch_first else x.permute(1, 0, 2)


def _is_causal(mask: Tensor) -> bool:
    """An additive (-inf above the diagonal, 0 elsewhere) or boolean (True above) causal mask."""
    above = torch.ones_like(mask, dtype=torch.bool).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, above))
    return bool(torch.isneginf(mask[above]).all() and (mask[~above] == 0).all())


class OpenAITextInversion:
    """OTI forward for a text tower in the OpenAI layout, run over its full padded context.

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP`` (its ``text`` tower is used when present),
            an OpenAI ``clip`` model or a SLIP model.
        template: the template ids (SOT ... EOT, unpadded) and slot; padded here with 0 to the
            model's context length, as the CLIP tokenizers pad.

    Pooling follows the model: ``text_pool_type``/``pool_type`` ``"argmax"`` (the EOT, largest
    id; the default), ``"last"`` (SigLIP), ``"first"``; then ``text_projection``.

    Examples:
        >>> # fwd = OpenAITextInversion(open_clip_model, TemplateTokens(ids, slot=4))
    """

    modality = "text"

    def __init__(self, model: nn.Module, template: TemplateTokens, pad_id: int = 0) -> None:
        # open_clip, OpenAI clip and SLIP ship no type information: their text tower (the model,
        # or its ``text``) is read by attribute, checked below, typed loosely.
        root: Any = getattr(model, "text", model)
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(root, attr):
                raise ModalignError(f"model must be a CLIP-layout model (open_clip, OpenAI clip, "
                                    f"SLIP) with a text tower; lacks {attr}")
        if getattr(root, "cls_emb", None) is not None:
            raise ModalignError("model: text towers with a CLS embedding (CoCa) are not "
                                "supported")
        self.model = model.eval()
        self.root = root
        context = int(root.positional_embedding.shape[0])
        if len(template.ids) > context:
            raise ModalignError(f"template is {len(template.ids)} tokens, longer than the "
                                f"model's context ({context})")
        self.ids = tuple(template.ids) + (pad_id,) * (context - len(template.ids))
        self.pool_type = str(getattr(root, "text_pool_type", getattr(root, "pool_type", "argmax")))
        if self.pool_type == "argmax":
            self.pool_index = max(range(len(template.ids)), key=lambda i: (template.ids[i], -i))
        elif self.pool_type == "last":
            self.pool_index = context - 1
        elif self.pool_type == "first":
            self.pool_index = 0
        else:
            raise ModalignError(f"model: text pooling {self.pool_type!r} is not supported "
                                "(argmax, last, first)")
        self.template = template
        self.num_tokens = template.num_tokens
        self.token_dim = int(root.token_embedding.weight.shape[1])
        mask = getattr(root, "attn_mask", None)
        takes_mask = "attn_mask" in inspect.signature(root.transformer.forward).parameters
        # EOT truncation: exact when the mask is causal and the transformer takes a sliced mask
        self.length = context
        if (self.pool_type == "argmax" and takes_mask and isinstance(mask, Tensor)
                and mask.shape == (context, context) and _is_causal(mask)):
            self.length = self.pool_index + 1
            if self.length < template.slot + template.num_tokens:
                raise ModalignError("template: the EOT must come after the slot")
        self._fixed: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}

    def _template_embeddings(self, dtype: torch.dtype, device: torch.device
                             ) -> tuple[Tensor, Tensor]:
        key = cache_key(self.root.token_embedding, dtype, device)
        if key not in self._fixed:
            self._fixed.clear()
            t = self.template
            with torch.no_grad():
                ids = torch.tensor(self.ids[: self.length], device=device)[None]
                emb = self.root.token_embedding(ids).to(dtype)
            self._fixed[key] = (emb[:, : t.slot], emb[:, t.slot + t.num_tokens:])
        return self._fixed[key]

    def __call__(self, tokens: Tensor) -> Tensor:
        before, after = self._template_embeddings(tokens.dtype, tokens.device)
        n = self.length
        x = fill_slot(tokens, before, after) + self.root.positional_embedding[:n].to(tokens.dtype)
        mask = getattr(self.root, "attn_mask", None)
        x = _run_transformer(self.root.transformer, x, None if mask is None else mask[:n, :n])
        if getattr(self.root, "final_ln_after_pool", False):
            x = self.root.ln_final(x[:, self.pool_index])
        else:
            x = self.root.ln_final(x)[:, self.pool_index]
        return _project(x, getattr(self.root, "text_projection", None))

    def identity(self) -> dict[str, Any]:
        return {"kind": "openai-layout-text", "tower": type(self.model).__name__,
                "template": self.template.text, "ids": list(self.template.ids),
                "slot": self.template.slot, "num_tokens": self.num_tokens,
                "pool": self.pool_type, "pool_index": self.pool_index, "positions": self.length}


class OpenAIVisionInversion:
    """OVI forward for an image tower in the OpenAI layout or a timm ViT trunk.

    Args:
        model: an open_clip model, an OpenAI ``clip`` model (its ``visual`` is used), or a SLIP
            model (``visual`` a timm ViT, then ``image_projection``).
        num_tokens: pseudo-patches ``P``, tiled over the patch grid by nearest interpolation.

    Examples:
        >>> # fwd = OpenAIVisionInversion(open_clip_model, num_tokens=2)
    """

    modality = "image"

    def __init__(self, model: nn.Module, num_tokens: int = 1) -> None:
        visual = getattr(model, "visual", None)
        if visual is None:
            raise ModalignError("model must have a `visual` image tower (open_clip, OpenAI clip, "
                                "SLIP)")
        self.model = model.eval()
        self.visual = visual
        trunk = getattr(visual, "trunk", visual)
        if hasattr(visual, "conv1") and hasattr(visual, "class_embedding"):
            self.layout = "openai"
            if getattr(visual, "attn_pool", None) is not None:
                raise ModalignError("model: vision towers with an attention pool (CoCa) are not "
                                    "supported")
            self.num_patches = int(visual.positional_embedding.shape[0]) - 1
            self.token_dim = int(visual.class_embedding.shape[0])
        elif hasattr(trunk, "pos_embed") and hasattr(trunk, "blocks"):
            self.layout = "timm"
            self.trunk = trunk
            prefix = int(getattr(trunk, "num_prefix_tokens", 1 if trunk.cls_token is not None
                                 else 0))
            self.num_patches = int(trunk.pos_embed.shape[1]) - (
                0 if getattr(trunk, "no_embed_class", False) else prefix)
            self.token_dim = int(trunk.pos_embed.shape[2])
        else:
            raise ModalignError(f"model.visual: {type(visual).__name__} is neither an OpenAI-"
                                "layout VisionTransformer nor a timm ViT")
        if not 1 <= num_tokens <= self.num_patches:
            raise ModalignError(f"num_tokens must be in [1, {self.num_patches}], got {num_tokens}")
        self.num_tokens = num_tokens

    def __call__(self, tokens: Tensor) -> Tensor:
        x = tile_patches(tokens, self.num_patches)
        if self.layout == "timm":
            return self._timm(x)
        v = self.visual
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        x = _run_transformer(v.transformer, x, None)
        pool = str(getattr(v, "pool_type", "tok"))
        if pool not in ("tok", "avg"):
            raise ModalignError(f"model.visual: pooling {pool!r} is not supported (tok, avg)")

        def global_pool(h: Tensor) -> Tensor:
            return h[:, 0] if pool == "tok" else h[:, 1:].mean(1)

        if getattr(v, "final_ln_after_pool", False):
            pooled = v.ln_post(global_pool(x))
        else:
            pooled = global_pool(v.ln_post(x))
        return _project(pooled, getattr(v, "proj", None))

    def _timm(self, x: Tensor) -> Tensor:
        t = self.trunk
        x = t._pos_embed(x)  # adds positions and the class token as the trunk does
        x = t.norm_pre(x)
        x = t.blocks(x)
        x = t.norm(x)
        x = t.forward_head(x)
        head = getattr(self.visual, "head", None) if self.visual is not t else None
        if head is not None:
            x = head(x)
        return _project(x, getattr(self.model, "image_projection", None))

    def identity(self) -> dict[str, Any]:
        return {"kind": f"{self.layout}-layout-vit", "tower": type(self.model).__name__,
                "num_patches": self.num_patches, "num_tokens": self.num_tokens}
