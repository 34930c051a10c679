"""Embeddings on disk: encode a dataset with towers, read arrays back memory-mapped."""

from modalign.embed.encode import embed_dataset
from modalign.embed.store import Embeddings, EmbeddingStore

__all__ = ["EmbeddingStore", "Embeddings", "embed_dataset"]
