"""A lean forward of a transformers ``BertModel`` for OTI: the same function over the same weights.

Textual inversion runs a bidirectional text tower (MiniLM, BERT) from a template whose only free
positions are the pseudo-tokens in its slot. :class:`BertTemplateForward` computes exactly what
``BertModel(inputs_embeds=..., attention_mask=ones).last_hidden_state`` computes, in the same
order of operations, and leaves out what does not change the pooled states or their gradient:

* the unused pooler (``BertModel`` runs it on every call), the attention-mask building, the
  no-op dropouts and the per-module Python of the transformers stack;
* the template's fixed positions do not depend on the pseudo-tokens before the first attention,
  so their embedding LayerNorm and their first-layer queries, keys and values are computed once
  per weights, dtype, device and autocast state (:func:`~modalign.bridge.inversion.core.cache_key`)
  and each step runs the embedding and the first projections on the slot positions only;
* each layer's query, key and value products run as one product with the three weights stacked
  (built once per weights).

It serves models laid out as transformers' ``BertModel`` (absolute positions, an encoder without
cross-attention, plain ``nn.Linear`` projections, eval mode); anything else (LoRA-wrapped
projections, training mode) is reported by :func:`lean_bert_unsupported` and the caller keeps the
model's own forward. The float64 tests hold it to the transformers forward within 1e-12, values
and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from modalign.bridge.inversion.core import cache_key
from modalign.bridge.inversion.text_hooks import fill_slot

_LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "intermediate.dense", "output.dense")


def _get(module: nn.Module, dotted: str) -> Any:
    for name in dotted.split("."):
        module = getattr(module, name, None)  # type: ignore[assignment]
        if module is None:
            return None
    return module


def lean_bert_unsupported(model: Any) -> str | None:
    """Why :class:`BertTemplateForward` cannot run ``model`` exactly, or None when it can.

    Examples:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1,
        ...                             num_attention_heads=2, intermediate_size=32)).eval()
        >>> lean_bert_unsupported(bert) is None, lean_bert_unsupported(bert.train())
        (True, 'the model is in training mode (dropout)')
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "bert":
        return f"model_type is {getattr(config, 'model_type', None)!r}, not 'bert'"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return "position embeddings are not absolute"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "the model is a decoder or has cross-attention"
    if getattr(config, "chunk_size_feed_forward", 0):
        return "the feed-forward is chunked"
    emb = getattr(model, "embeddings", None)
    for part in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
        if not isinstance(getattr(emb, part, None), (nn.Embedding, nn.LayerNorm)):
            return f"embeddings lack a plain {part}"
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return "no encoder.layer list"
    for layer in layers:
        for dotted in _LAYER_LINEARS:
            if type(_get(layer, dotted)) is not nn.Linear:
                return f"{dotted} is not a plain nn.Linear (e.g. LoRA-wrapped)"
        for dotted in ("attention.output.LayerNorm", "output.LayerNorm"):
            if not isinstance(_get(layer, dotted), nn.LayerNorm):
                return f"{dotted} is not an nn.LayerNorm"
        if not callable(_get(layer, "intermediate.intermediate_act_fn")):
            return "intermediate.intermediate_act_fn is missing"
    if any(m.training for m in model.modules()):
        return "the model is in training mode (dropout)"
    return None


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class BertTemplateForward:
    """``BertModel`` last hidden states for a template with pseudo-tokens in its slot.

    Args:
        model: a transformers ``BertModel`` (or one laid out alike) in eval mode; check it with
            :func:`lean_bert_unsupported` first.
        ids: the template's token ids (special tokens included, no padding).
        slot: index of the first pseudo-token position.
        num_tokens: pseudo-tokens in the slot.
        follow: returns the model its owner runs now (e.g. ``lambda: tower.model``);
            :meth:`usable` is False once that is another model (a tower whose model was swapped).

    ``forward(tokens)`` maps ``(B, num_tokens, d)`` pseudo-token input embeddings to the last
    hidden states ``(B, len(ids), d)`` of the template with the tokens in its slot, all positions
    attended (no padding), token type 0: what
    ``model(inputs_embeds=embeds, attention_mask=ones).last_hidden_state`` gives.

    Examples:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
        ...                             num_attention_heads=2, intermediate_size=32)).eval()
        >>> lean = BertTemplateForward(bert, ids=(1, 5, 0, 2), slot=2)
        >>> tokens = torch.randn(3, 1, 16)
        >>> x = bert.get_input_embeddings()(torch.tensor([[1, 5, 0, 2]])).repeat(3, 1, 1)
        >>> x[:, 2:3] = tokens
        >>> ref = bert(inputs_embeds=x).last_hidden_state
        >>> torch.allclose(lean.forward(tokens), ref, atol=1e-5)
        True
    """

    def __init__(self, model: Any, ids: tuple[int, ...], slot: int, num_tokens: int = 1, *,
                 follow: Callable[[], Any] | None = None) -> None:
        reason = lean_bert_unsupported(model)
        if reason is not None:
            raise ValueError(f"model: the lean BERT forward cannot run it exactly: {reason}")
        if not 0 <= slot <= len(ids) - num_tokens or num_tokens < 1:
            raise ValueError(f"slot must lie inside ids (length {len(ids)}) with room for "
                             f"{num_tokens} tokens, got slot={slot}")
        self.model = model
        self.follow = follow
        self.ids, self.slot, self.num_tokens = tuple(int(i) for i in ids), slot, num_tokens
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.width = int(config.hidden_size)
        # transformers' scaling of the attention scores (head width ** -0.5 unless a layer says)
        head = self.width // self.heads
        self.scales = [float(getattr(layer.attention.self, "scaling", head ** -0.5))
                       for layer in model.encoder.layer]
        self._cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def usable(self) -> bool:
        """Whether the model is still one this forward runs exactly (eval mode, plain layers,
        still the model its owner runs)."""
        if self.follow is not None and self.follow() is not self.model:
            return False
        return lean_bert_unsupported(self.model) is None

    def _fixed(self, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Stacked projection weights, the fixed positions' embeddings and first-layer
        projections, the slot's embedding offsets: once per weights, dtype, device, autocast."""
        key = cache_key(self.model, dtype, device)
        if key in self._cache:
            return self._cache[key]
        self._cache.clear()
        model, emb = self.model, self.model.embeddings
        s, r, n = self.slot, self.num_tokens, len(self.ids)
        with torch.no_grad():
            qkv = []
            for layer in model.encoder.layer:
                att = layer.attention.self
                qkv.append((torch.cat([att.query.weight, att.key.weight, att.value.weight]),
                            torch.cat([att.query.bias, att.key.bias, att.value.bias])))
            words = emb.word_embeddings(torch.tensor(self.ids, device=device)[None]).to(dtype)
            # the order of transformers' BertEmbeddings: (inputs + token type) + position
            type0 = emb.token_type_embeddings.weight[0].to(dtype)
            pos = emb.position_embeddings.weight[:n].to(dtype)[None]
            fixed_rows = [i for i in range(n) if not s <= i < s + r]
            h = _layer_norm((words + type0) + pos, emb.LayerNorm)[:, fixed_rows]
            first = F.linear(h, *qkv[0])
        fixed = {"qkv": qkv, "type0": type0, "pos_slot": pos[:, s:s + r],
                 "h_before": h[:, :s], "h_after": h[:, s:],
                 "qkv_before": first[:, :s], "qkv_after": first[:, s:],
                 "layers": _layer_parts(model, qkv, self.scales)}
        self._cache[key] = fixed
        return fixed

    def forward(self, tokens: Tensor) -> Tensor:
        """Last hidden states ``(B, len(ids), d)`` with ``tokens`` (B, R, d) in the slot."""
        fixed = self._fixed(tokens.dtype, tokens.device)
        if fixed["layers"] is not None and _manual_ok(tokens):
            if torch.is_grad_enabled() and tokens.requires_grad:
                return _BertStack.apply(tokens, self, fixed)
            with torch.no_grad():
                return _stack_forward(self, fixed, tokens, save=None)
        return self._autograd_forward(tokens, fixed)

    def _autograd_forward(self, tokens: Tensor, fixed: dict[str, Any]) -> Tensor:
        """The forward op by op under autograd (autocast, other devices, other activations)."""
        model = self.model
        b, n, d, heads = tokens.shape[0], len(self.ids), self.width, self.heads
        x = _layer_norm((tokens + fixed["type0"]) + fixed["pos_slot"], model.embeddings.LayerNorm)
        h = fill_slot(x, fixed["h_before"], fixed["h_after"])
        for i, layer in enumerate(model.encoder.layer):
            if i == 0:
                qkv = fill_slot(F.linear(x, *fixed["qkv"][0]), fixed["qkv_before"],
                                fixed["qkv_after"])
            else:
                qkv = F.linear(h, *fixed["qkv"][i])
            q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
            ctx = F.scaled_dot_product_attention(q, k, v, scale=self.scales[i])
            ctx = ctx.transpose(1, 2).reshape(b, n, d)
            out = layer.attention.output
            h = _layer_norm(F.linear(ctx, out.dense.weight, out.dense.bias) + h, out.LayerNorm)
            mid = layer.intermediate
            act = mid.intermediate_act_fn(F.linear(h, mid.dense.weight, mid.dense.bias))
            out = layer.output
            h = _layer_norm(F.linear(act, out.dense.weight, out.dense.bias) + h, out.LayerNorm)
        return h

    __call__ = forward



# torch's CPU flash attention and its backward (what scaled_dot_product_attention runs there)
_FLASH: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD: Any = getattr(torch.ops.aten,
                               "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _layer_parts(model: Any, qkv: list[tuple[Tensor, Tensor]],
                 scales: list[float]) -> list[tuple[Any, ...]] | None:
    """Per layer the weights of the hand-written forward and backward, or None where an
    activation is not torch's GELU (the forward then runs op by op under autograd)."""
    parts = []
    for (w_qkv, b_qkv), layer, scale in zip(qkv, model.encoder.layer, scales):
        act = layer.intermediate.intermediate_act_fn
        # transformers' GELUActivation calls torch's exact GELU (unless built for its Python one)
        if type(act).__name__ != "GELUActivation" or getattr(act, "act", None) is not F.gelu:
            return None
        n1, n2 = layer.attention.output.LayerNorm, layer.output.LayerNorm
        w_o, w_1, w_2 = (layer.attention.output.dense.weight, layer.intermediate.dense.weight,
                         layer.output.dense.weight)
        # the backward's product with the MLP's output weight is the one a packed copy speeds up
        w_2t = w_2.detach().t().contiguous()
        parts.append(((w_qkv, b_qkv, _packed(w_qkv)),
                      (w_o, layer.attention.output.dense.bias, _packed(w_o)), n1,
                      (w_1, layer.intermediate.dense.bias, _packed(w_1)),
                      (w_2, layer.output.dense.bias, _packed(w_2)), n2, scale,
                      (w_2t, None, _packed(w_2t))))
    return parts


_MKL_LINEAR: Any = getattr(torch.ops.mkl, "_mkl_linear", None)
_MKL_PACK: Any = getattr(torch.ops.mkl, "_mkl_reorder_linear_weight", None)


def _packed(weight: Tensor) -> Tensor | None:
    """``weight`` packed once for MKL's GEMM (float32 on the CPU, where torch has MKL), so each
    product skips repacking it: the same products, bitwise, about 1.2x faster for the forward
    products at 96 rows. The packed copy takes about 1.2x the weight's resident memory (torch
    reserves MKL's byte count in elements, 4-13x, but the pages past the packed data are never
    touched); None where unavailable."""
    if (_MKL_LINEAR is None or _MKL_PACK is None or weight.dtype != torch.float32
            or weight.device.type != "cpu" or not torch.backends.mkl.is_available()):
        return None
    return _MKL_PACK(weight.detach().contiguous(), 1)


def _linear(x: Tensor, weight: tuple[Tensor, Tensor | None, Tensor | None]) -> Tensor:
    """``x @ w.T + b`` for 2-d ``x`` (``b`` may be None): MKL's packed GEMM where packed."""
    w, b, packed = weight
    if packed is not None and x.dtype == torch.float32:
        return _MKL_LINEAR(x, packed, w, b, x.shape[0])
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


def _manual_ok(tokens: Tensor) -> bool:
    """The hand-written pass serves float32/float64 on the CPU without autocast."""
    return (tokens.device.type == "cpu" and tokens.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu") and _FLASH is not None
            and _FLASH_BACKWARD is not None)


def _norm(x: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor, Tensor]:
    return torch.native_layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _norm_backward(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor,
                   norm: nn.LayerNorm) -> Tensor:
    return torch.ops.aten.native_layer_norm_backward(
        grad, x, norm.normalized_shape, mean, rstd, norm.weight, norm.bias,
        [True, False, False])[0]


def _stack_forward(lean: BertTemplateForward, fixed: dict[str, Any], tokens: Tensor,
                   save: list[Any] | None) -> Tensor:
    """The embeddings and every layer, the same operations as transformers' BertModel in the
    same order (its no-op dropouts left out); what the backward needs is appended to ``save``."""
    b, r, d = tokens.shape
    n, heads = len(lean.ids), lean.heads
    e = (tokens + fixed["type0"]) + fixed["pos_slot"]
    x, mean0, rstd0 = _norm(e, lean.model.embeddings.LayerNorm)
    h = fill_slot(x, fixed["h_before"], fixed["h_after"]).view(b * n, d)
    if save is not None:
        save.append((e, mean0, rstd0))
    for i, (qkv_w, o_w, n1, w1, w2, n2, scale, _) in enumerate(fixed["layers"]):
        if i == 0:
            slot = _linear(x.reshape(b * r, d), qkv_w).view(b, r, 3 * d)
            qkv = fill_slot(slot, fixed["qkv_before"], fixed["qkv_after"])
        else:
            qkv = _linear(h, qkv_w)
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        att, lse = _FLASH(q, k, v, 0.0, False, scale=scale)
        u1 = _linear(att.transpose(1, 2).reshape(b * n, d), o_w)
        u1 += h
        y1, mean1, rstd1 = _norm(u1, n1)
        z = _linear(y1, w1)
        u2 = _linear(F.gelu(z), w2)
        u2 += y1
        h, mean2, rstd2 = _norm(u2, n2)
        if save is not None:
            save.append((q, k, v, att, lse, u1, mean1, rstd1, z, u2, mean2, rstd2))
    return h.view(b, n, d)


class _BertStack(torch.autograd.Function):
    """The embeddings and layers of :class:`BertTemplateForward` with a hand-written backward to
    the pseudo-tokens only (the weights are constants here): the input-gradient products and the
    backward kernels autograd would run (LayerNorm, GELU, flash attention), without the graph
    of views, copies and accumulations around them."""

    @staticmethod
    def forward(ctx: Any, tokens: Tensor, lean: BertTemplateForward,
                fixed: dict[str, Any]) -> Tensor:
        save: list[Any] = []
        out = _stack_forward(lean, fixed, tokens, save)
        ctx.lean, ctx.fixed, ctx.save, ctx.shape = lean, fixed, save, tokens.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        lean, fixed, save = ctx.lean, ctx.fixed, ctx.save
        b, r, d = ctx.shape
        n, s, heads = len(lean.ids), lean.slot, lean.heads
        g = grad.reshape(b * n, d)
        for i in range(len(fixed["layers"]) - 1, -1, -1):
            (w_qkv, _, _), (w_o, _, _), n1, (w_1, _, _), _, n2, scale, w_2t = fixed["layers"][i]
            q, k, v, att, lse, u1, mean1, rstd1, z, u2, mean2, rstd2 = save[i + 1]
            du2 = _norm_backward(g, u2, mean2, rstd2, n2)
            dz = torch.ops.aten.gelu_backward(_linear(du2, w_2t), z)
            dy1 = dz @ w_1
            dy1 += du2
            du1 = _norm_backward(dy1, u1, mean1, rstd1, n1)
            datt = (du1 @ w_o).view(b, n, heads, d // heads).transpose(1, 2)
            grads = _FLASH_BACKWARD(datt, q, k, v, att, lse, 0.0, False, scale=scale)
            if i == 0:  # the fixed positions' inputs are constants: only the slot's rows
                grads = tuple(t[:, :, s:s + r] for t in grads)
                du1, n = du1.view(b, n, d)[:, s:s + r].reshape(b * r, d), r
            # the three input-gradient products (query, key, value) summed with the residual's
            g = du1
            for j, part in enumerate(grads):
                g = torch.addmm(g, part.transpose(1, 2).reshape(b * n, d), w_qkv[j * d:(j + 1) * d])
        e, mean0, rstd0 = save[0]
        dx = _norm_backward(g.view(b, r, d), e, mean0, rstd0, lean.model.embeddings.LayerNorm)
        return dx, None, None
