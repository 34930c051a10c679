"""Symile (Saporta et al., NeurIPS 2024): contrastive loss on the multilinear inner product.

``MIP(a, b, c, ...) = sum_k a_k b_k c_k ...``. Each modality in turn is the anchor; its candidates
are elementwise products of the other modalities' rows, and the positive is the product of its own
sample's rows. The loss is the mean over anchors of the CE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.losses._support import checked, pick
from modalign.losses.base import ScaledLoss
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_positive

Negatives = Literal["n", "n_squared"]


def multilinear_inner_product(*vectors: Tensor) -> Tensor:
    """``sum_k prod_m v_m[..., k]`` over the last dim, broadcasting the leading dims.

    Examples:
        >>> multilinear_inner_product(torch.ones(3), torch.full((3,), 2.0), torch.arange(3.0))
        tensor(6.)
    """
    if len(vectors) < 2:
        raise ValueError(f"vectors must hold at least 2 tensors, got {len(vectors)}")
    prod = vectors[0]
    for v in vectors[1:]:
        prod = prod * v
    return prod.sum(dim=-1)


def all_tuple_products(others: Sequence[Tensor]) -> Tensor:
    """Elementwise products of every tuple of rows ``(j_1, ..., j_K)``: shape (B^K, d).

    Column order: ``c = o * B + j`` where row ``j`` is taken from ``others[0]`` and row
    ``(j + o_k) mod B`` from ``others[k]``, with ``o`` the mixed-radix number of the offsets
    ``(o_1, ..., o_{K-1})``. Offset block 0 is the all-equal tuples, so the positive of anchor i is
    column i. Memory is O(B^K d): use it for small batches.
    """
    b = others[0].shape[0]
    blocks = others[0].unsqueeze(0)  # (1, B, d): offset blocks x rows
    for other in others[1:]:
        rolled = torch.stack([torch.roll(other, -o, dims=0) for o in range(b)])  # (B, B, d)
        blocks = (blocks.unsqueeze(1) * rolled.unsqueeze(0)).reshape(-1, b, other.shape[1])
    return blocks.reshape(-1, others[0].shape[1])


def _check_permutations(permutations: Tensor, m: int, b: int) -> None:
    if permutations.shape != (m, m, b) or permutations.is_floating_point():
        raise ValueError(f"permutations must be an integer tensor of shape ({m}, {m}, {b})")
    if not torch.equal(permutations.sort(dim=-1).values.cpu(), torch.arange(b).expand(m, m, b)):
        raise ValueError("permutations[a, r] must be a permutation of range(batch)")


def symile_loss(
    modalities: Sequence[Tensor],
    logit_scale: Tensor | float,
    *,
    negatives: Negatives = "n",
    permutations: Tensor | None = None,
) -> LossOutput:
    """Symile over M >= 2 modalities (rows are samples); inputs are used as given (no normalising).

    ``negatives="n"``: for anchor a, every other modality r is row-shuffled by
    ``permutations[a, r]`` (random when None), the shuffled rows are multiplied into B candidates,
    and the diagonal is set back to the true positive MIP (B - 1 negatives per anchor).
    ``negatives="n_squared"``: all B^(M-1) tuples of the other modalities are candidates (any
    M >= 2; M = 2 is one direction of CLIP per anchor). Parts: ``anchor_<m>`` per modality index.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> xs = [torch.randn(4, 8, generator=g) for _ in range(3)]
        >>> ident = torch.arange(4).expand(3, 3, 4)
        >>> sorted(symile_loss(xs, 10.0, permutations=ident).parts)
        ['anchor_0', 'anchor_1', 'anchor_2']
    """
    if len(modalities) < 2:
        raise ValueError(f"modalities must hold at least 2 tensors, got {len(modalities)}")
    checked(modalities[0], "modalities[0]")
    b, d = modalities[0].shape
    for m, x in enumerate(modalities[1:], start=1):
        checked(x, f"modalities[{m}]", rows=b, dim=d)
    check_positive("logit_scale", logit_scale)
    if negatives not in ("n", "n_squared"):
        raise ValueError(f"negatives must be 'n' or 'n_squared', got {negatives!r}")
    n_mod = len(modalities)
    if negatives == "n":
        if permutations is None:
            permutations = torch.stack(
                [torch.stack([torch.randperm(b) for _ in range(n_mod)]) for _ in range(n_mod)]
            )
        _check_permutations(permutations, n_mod, b)
        permutations = permutations.to(modalities[0].device)
    labels = torch.arange(b, device=modalities[0].device)
    positive = multilinear_inner_product(*modalities)
    eye = torch.eye(b, dtype=torch.bool, device=modalities[0].device)
    parts: dict[str, Tensor] = {}
    for a, anchor in enumerate(modalities):
        others = [x for r, x in enumerate(modalities) if r != a]
        if negatives == "n":
            assert permutations is not None  # drawn above when not given
            shuffled = [x[permutations[a, r]] for r, x in enumerate(modalities) if r != a]
            candidates = shuffled[0]
            for x in shuffled[1:]:
                candidates = candidates * x
            logits = torch.where(eye, positive.unsqueeze(1), anchor @ candidates.T)
        else:
            logits = anchor @ all_tuple_products(others).T
        parts[f"anchor_{a}"] = F.cross_entropy(logit_scale * logits, labels)
    return LossOutput(torch.stack(list(parts.values())).mean(), parts)


def observed_rows(masks: Sequence[Tensor | None], batch: int) -> Tensor:
    """Rows observed in every modality, from per-modality boolean masks (None = all observed)."""
    keep = torch.ones(batch, dtype=torch.bool)
    for m, mask in enumerate(masks):
        if mask is None:
            continue
        if mask.dtype != torch.bool or mask.shape != (batch,):
            raise ValueError(f"observed[{m}] must be a boolean tensor of shape ({batch},)")
        keep = keep & mask.cpu()
    return keep


@register_loss("symile")
class SymileLoss(ScaledLoss):
    """Symile over the declared modalities with a learnable temperature (0.07 at init).

    ``observed`` (optional, in ``forward``) maps a modality to a boolean mask of present rows: every
    Symile term needs all M modalities, so a sample missing any of them is left out of the loss (as
    anchor and as candidate). If no row is complete the loss is 0 (still connected to the inputs).

    Examples:
        >>> loss = SymileLoss(["audio", "image", "text"], negatives="n_squared")
        >>> emb = {m: torch.randn(4, 8) for m in ["audio", "image", "text"]}
        >>> loss(emb).loss.ndim
        0
    """

    max_modalities = None

    def __init__(self, modalities: Sequence[str], *, negatives: Negatives = "n",
                 generator: torch.Generator | None = None, **options: Any) -> None:
        super().__init__(modalities, **options)
        if negatives not in ("n", "n_squared"):
            raise ValueError(f"negatives must be 'n' or 'n_squared', got {negatives!r}")
        self.negatives: Negatives = negatives
        self.generator = generator

    def forward(
        self,
        embeddings: Mapping[str, Tensor],
        *,
        groups: Tensor | None = None,
        indices: Tensor | None = None,
        observed: Mapping[str, Tensor] | None = None,
    ) -> LossOutput:
        self.check_call(groups, indices)
        xs = pick(embeddings, self.modalities, normalize=False)
        checked(xs[0], self.modalities[0])
        names = [f"anchor_{m}" for m in self.modalities]
        if observed is not None:
            unknown = set(observed) - set(self.modalities)
            if unknown:
                raise ValueError(f"observed names unknown modalities {sorted(unknown)}")
            keep = observed_rows([observed.get(m) for m in self.modalities], xs[0].shape[0])
            if not bool(keep.any()):
                zero = xs[0].sum() * 0.0  # a zero that keeps every input in the graph
                for x in xs[1:]:
                    zero = zero + x.sum() * 0.0
                return LossOutput(zero, dict.fromkeys(names, zero))
            xs = [x[keep.to(x.device)] for x in xs]
        perms = None
        if self.negatives == "n":
            b, n_mod = xs[0].shape[0], len(xs)
            perms = torch.stack(
                [torch.randperm(b, generator=self.generator) for _ in range(n_mod * n_mod)]
            ).reshape(n_mod, n_mod, b)
        out = symile_loss(xs, self.logit_scale(), negatives=self.negatives, permutations=perms)
        parts = {name: out.parts[f"anchor_{i}"] for i, name in enumerate(names)}
        return LossOutput(out.loss, parts)
