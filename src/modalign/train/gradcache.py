"""GradCache: a contrastive step over a batch too large to embed with gradients at once.

With ``train.accumulate = k > 1`` the local batch is cut into ``k`` micro-batches. Their
embeddings are computed without gradients, the loss on the whole batch gives the gradient with
respect to every embedding, and each micro-batch is then re-embedded with gradients and
back-propagated with its slice of that gradient (Gao et al., 2021). The parameters' gradients are
those of the full-batch loss (up to rounding), while only one micro-batch's activations are held.

Examples:
    >>> import torch
    >>> from modalign.losses.output import LossOutput
    >>> head = torch.nn.Linear(3, 2)
    >>> x = torch.randn(8, 3)
    >>> embed = lambda module, sl: {"a": module(x[sl])}
    >>> loss = lambda emb: LossOutput((emb["a"] ** 2).sum())
    >>> out = gradcache_backward(head, embed, loss, batch=8, k=4)
    >>> g = head.weight.grad.clone(); head.zero_grad()
    >>> loss(embed(head, slice(None))).loss.backward()
    >>> torch.allclose(g, head.weight.grad)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from modalign.losses.output import LossOutput

Embed = Callable[[nn.Module, slice], dict[str, torch.Tensor]]
"""``(module, rows) -> {key: embeddings}`` of the local batch's rows ``rows``."""


def gradcache_backward(module: nn.Module, embed: Embed,
                       loss: Callable[[dict[str, torch.Tensor]], LossOutput], *,
                       batch: int, k: int) -> LossOutput:
    """Back-propagate ``loss`` of the whole local batch one micro-batch at a time.

    Args:
        module: the trained module (a DDP wrapper synchronises only on the last micro-batch).
        embed: embeds a slice of the local batch with a module.
        loss: the objective on the embeddings of the whole local batch.
        batch: rows of the local batch (divisible by ``k``).
        k: number of micro-batches.

    Returns:
        The loss on the whole batch (its backward has already been run).
    """
    if k < 1 or batch % k:
        raise ValueError(f"k={k}: expected a positive divisor of the batch of {batch} rows")
    size = batch // k
    slices = [slice(i * size, (i + 1) * size) for i in range(k)]
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    with torch.no_grad():
        parts = [embed(inner, sl) for sl in slices]
    cached = {key: torch.cat([p[key] for p in parts]).requires_grad_() for key in parts[0]}
    out = loss(cached)
    out.loss.backward()
    for i, sl in enumerate(slices):
        no_sync = getattr(module, "no_sync", None)  # DDP's: no all-reduce before the last slice
        sync = nullcontext() if (i == k - 1 or no_sync is None) else no_sync()
        with sync:
            emb = embed(module, sl)
            terms = [(emb[key] * grad[sl]).sum() for key in emb
                     if (grad := cached[key].grad) is not None]
            if terms:
                torch.stack(terms).sum().backward()
    return out
