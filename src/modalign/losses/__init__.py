"""Contrastive objectives. Every loss takes embeddings keyed by modality and returns LossOutput."""

from modalign.losses.output import LossOutput
from modalign.losses.registry import available_losses, build_loss, register_loss

__all__ = ["LossOutput", "available_losses", "build_loss", "register_loss"]
