"""CLIP-Refine's two terms (Yamaguchi et al., CVPR 2025): RaFA and HyCD.

Notation: ``a``, ``b`` are the image and text features of a pair (raw, i.e. not normalised, in
the official code), ``S = A B^T`` the student's and ``S'`` the frozen teacher's similarities.

* **RaFA** (random feature alignment): one reference ``r_k ~ N(0, I_d)`` per pair, shared by
  both modalities; the official code takes ``mse(A, R) + mse(B, R)`` (means over ``B * d``
  elements), i.e. ``(2 / d) * mean_k 1/2 (|a_k - r_k|^2 + |b_k - r_k|^2)``. Since
  ``1/2 (|a - r|^2 + |b - r|^2) = 1/4 |a - b|^2 + |(a + b)/2 - r|^2``, its expectation over ``r``
  is ``1/4 |a - b|^2 + |(a + b)/2|^2 + d``: alignment plus shrinkage of the pair's midpoint. On
  unit-norm features it is the constant ``1 + d``: through a normalisation its expected gradient
  vanishes, which is why ``normalize`` is an option (default off, as the official code).
* **HyCD** (hybrid contrastive distillation): targets ``Q = alpha I + (1 - alpha)
  softmax_row(S' / T)``; loss ``T^2 / 2 [KL(Q || softmax(S / T)) + KL(Q~ || softmax(S^T / T))]``,
  rows averaged (``Q~`` from ``S'^T``). ``alpha = 1`` is ``T^2`` times the symmetric InfoNCE on
  ``S / T``; ``alpha = 0`` is plain CLIP-KD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.errors import ModalignError


def rafa_loss(image: Tensor, text: Tensor, *, normalize: bool = False,
              generator: torch.Generator | None = None, reference: Tensor | None = None) -> Tensor:
    """RaFA in the official form: ``mse(image, R) + mse(text, R)``, one shared ``R ~ N(0, I)``.

    Args:
        image: ``(B, d)`` image features.
        text: ``(B, d)`` text features of the same pairs.
        normalize: L2-normalise the features first (the paper's description; the expected
            gradient is then zero).
        generator: random generator for ``R``.
        reference: ``(B, d)`` reference vectors to use instead of drawing ``R`` (tests).

    Examples:
        >>> a = torch.zeros(2, 3)
        >>> float(rafa_loss(a, a, reference=torch.ones(2, 3)))
        2.0
    """
    _check_pair(image, text)
    if normalize:
        image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    if reference is None:
        reference = torch.randn(image.shape, generator=generator, dtype=image.dtype,
                                device=image.device if generator is None else "cpu"
                                ).to(image.device)
    elif reference.shape != image.shape:
        raise ModalignError(f"reference: expected shape {tuple(image.shape)}, got "
                            f"{tuple(reference.shape)}")
    return F.mse_loss(image, reference) + F.mse_loss(text, reference)


def hycd_loss(image: Tensor, text: Tensor, teacher_image: Tensor, teacher_text: Tensor, *,
              alpha: float = 0.5, temperature: float = 1.0, normalize: bool = False) -> Tensor:
    """HyCD: KL from the mixed targets ``alpha I + (1 - alpha) softmax(S'/T)`` to the student.

    Args:
        image, text: ``(B, d)`` student features of B pairs.
        teacher_image, teacher_text: the frozen teacher's features of the same pairs.
        alpha: weight of the ground-truth identity in the targets, in ``[0, 1]``.
        temperature: ``T``; logits are ``S / T`` (raw dot products in the official code, T = 1).
        normalize: L2-normalise all features first (then use a small T, e.g. 0.01).

    Examples:
        >>> x = torch.randn(4, 8)
        >>> abs(float(hycd_loss(x, x, x, x, alpha=0.0))) < 1e-6  # student = teacher, alpha = 0
        True
    """
    _check_pair(image, text)
    _check_pair(teacher_image, teacher_text)
    if not 0.0 <= alpha <= 1.0:
        raise ModalignError(f"alpha={alpha!r}: expected a number in [0, 1]")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ModalignError(f"temperature={temperature!r}: expected a finite number > 0")
    if normalize:
        image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
        teacher_image = F.normalize(teacher_image, dim=1)
        teacher_text = F.normalize(teacher_text, dim=1)
    logits = image @ text.T / temperature
    with torch.no_grad():
        t_logits = (teacher_image @ teacher_text.T / temperature).to(logits.dtype)
        eye = torch.eye(len(logits), dtype=logits.dtype, device=logits.device)
        q_rows = alpha * eye + (1 - alpha) * t_logits.softmax(dim=1)
        q_cols = alpha * eye + (1 - alpha) * t_logits.T.softmax(dim=1)
    kl_rows = _kl_rows(q_rows, logits.log_softmax(dim=1))
    kl_cols = _kl_rows(q_cols, logits.T.log_softmax(dim=1))
    return (kl_rows + kl_cols) / 2 * temperature**2


def _kl_rows(q: Tensor, log_p: Tensor) -> Tensor:
    """Mean over rows of ``KL(q_i || p_i)`` (``0 log 0 = 0``)."""
    return (torch.special.xlogy(q, q) - q * log_p).sum(dim=1).mean()


def _check_pair(image: Tensor, text: Tensor) -> None:
    if not isinstance(image, Tensor) or image.ndim != 2 or image.shape != getattr(text, "shape",
                                                                                  None):
        raise ModalignError(f"image and text: expected (B, d) tensors of one shape, got "
                            f"{getattr(image, 'shape', None)} and {getattr(text, 'shape', None)}")
