"""Diffusion-Link (Nam et al., 2025): a denoising diffusion model over the target modality's
embeddings that carries source embeddings into the target distribution.

The paper's code is not public; this module follows its description and fills the rest in
(choices marked *ours*, after Diffusion Bridge's DDPM code):

* Preprocessing (*ours*): per modality ``z = rho * normalise(e - mu)``, ``mu`` the training
  mean of the unit embeddings, ``rho = 5``.
* DDPM with the cosine schedule (``T = 1000``): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``;
  the denoiser ``f(x_t, t)`` predicts ``x_0``. Network: ``Linear(d, h)``, three residual blocks
  ``x + Linear(SiLU(Linear(LN(x)))) + W_b temb(t)`` (``temb`` = sinusoidal features through an
  MLP), ``Linear(h, d)``.
* Losses (paper): the *cross-sample prediction* loss ``|f(x_t, t) - y_k|^2`` where ``x_t`` is the
  *source* ``a_k`` noised to step ``t`` and ``y_k`` its paired target (with probability 1/2 the
  source is ``y_k`` itself, the plain denoising loss), plus the *topology* loss
  ``|C(y_hat) - C(y)|_F^2 / B^2`` with ``C`` the in-batch cosine matrix, weight ``lambda_topo``.
* Inference: noise the source to ``t_start = 600`` (``noise_source``; Diffusion Bridge inserts
  the clean embedding instead), then deterministic DDIM (eta = 0) in ``ddim_steps = 5`` steps; each
  ``x_0`` estimate is put back on the radius-``rho`` sphere (*ours*). The output is mapped back
  to the target's joint space: ``normalise(x_0 / rho * s_Y + mu_Y)``, ``s_Y`` the mean norm of the
  centred training targets.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.errors import ModalignError

T_STEPS = 1000


def cosine_alpha_bar(t: Tensor, steps: int = T_STEPS, s: float = 0.008) -> Tensor:
    """Cosine schedule: ``abar(t) = f(t) / f(0)``, ``f(t) = cos^2((t / T + s) / (1 + s) pi / 2)``.

    Examples:
        >>> a = cosine_alpha_bar(torch.tensor([0.0, 1000.0]))
        >>> round(float(a[0]), 6), float(a[1]) < 1e-6
        (1.0, True)
    """
    f = torch.cos(((t.double() / steps) + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return (f / f0).clamp(min=0.0, max=1.0)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Forward noising ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (``t`` per row).

    Examples:
        >>> x0 = torch.ones(2, 3)
        >>> torch.equal(q_sample(x0, torch.zeros(2), torch.randn(2, 3)), x0)
        True
    """
    a = cosine_alpha_bar(t).to(x0.dtype).view(-1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of the step (``dim`` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().view(-1, 1) * freqs.view(1, -1)
    return torch.cat([args.sin(), args.cos()], dim=1)


class Denoiser(nn.Module):
    """``f(x_t, t) -> x_0``: three residual MLP blocks with a timestep embedding.

    Examples:
        >>> Denoiser(6, hidden=16)(torch.randn(4, 6), torch.tensor([1, 2, 3, 4])).shape
        torch.Size([4, 6])
    """

    def __init__(self, dim: int, hidden: int = 1024, blocks: int = 3) -> None:
        super().__init__()
        if hidden % 2:
            raise ModalignError(f"hidden={hidden}: expected an even width")
        self.hidden = hidden
        self.inp = nn.Linear(dim, hidden)
        self.temb = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(blocks))
        self.fc1 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(blocks))
        self.tproj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(blocks))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.temb(timestep_features(t, self.hidden))
        h = self.inp(x)
        for norm, fc1, fc2, tp in zip(self.norms, self.fc1, self.fc2, self.tproj, strict=True):
            h = h + fc2(F.silu(fc1(norm(h)))) + tp(temb)
        return self.out(h)


def topology_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``|C(pred) - C(target)|_F^2 / B^2``, ``C`` the in-batch cosine matrix.

    Examples:
        >>> y = torch.randn(5, 4)
        >>> q = torch.linalg.qr(torch.randn(4, 4))[0]
        >>> float(topology_loss(y @ q, y)) < 1e-10
        True
    """
    cp, ct = F.normalize(pred, dim=1), F.normalize(target, dim=1)
    return ((cp @ cp.T - ct @ ct.T) ** 2).sum() / len(pred) ** 2


def preprocess(x: Tensor, mean: Tensor, rho: float) -> Tensor:
    """``rho * normalise(normalise(x) - mean)``."""
    return rho * F.normalize(F.normalize(x.float(), dim=1) - mean, dim=1)


def fit_denoiser(source: Tensor, target: Tensor, settings: dict[str, Any]) -> Denoiser:
    """Train the denoiser on preprocessed matched rows (``source[i]`` pairs ``target[i]``)."""
    gen = torch.Generator().manual_seed(settings["seed"])
    torch.manual_seed(settings["seed"])
    net = Denoiser(source.shape[1], hidden=settings["hidden"])
    opt = torch.optim.AdamW(net.parameters(), lr=settings["lr"], weight_decay=0.0)
    steps, batch = settings["steps"], min(settings["batch_size"], len(source))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    for _ in range(steps):
        idx = torch.randint(0, len(source), (batch,), generator=gen)
        a, y = source[idx], target[idx]
        own = torch.rand(batch, generator=gen) < 0.5
        start = torch.where(own.view(-1, 1), y, a)
        t = torch.randint(1, T_STEPS + 1, (batch,), generator=gen)
        x_t = q_sample(start, t, torch.randn(start.shape, generator=gen))
        pred = net(x_t, t)
        loss = ((pred - y) ** 2).sum(1).mean()
        if settings["lambda_topo"]:
            loss = loss + settings["lambda_topo"] * topology_loss(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def ddim_sample(net: Denoiser, x: Tensor, settings: dict[str, Any], *,
                generator: torch.Generator | None = None) -> Tensor:
    """Noise preprocessed sources to ``t_start`` (if ``noise_source``) and run DDIM (eta = 0).

    Returns the final ``x_0`` estimate on the radius-``rho`` sphere.
    """
    t_start, n, rho = int(settings["t_start"]), int(settings["ddim_steps"]), settings["rho"]
    steps = torch.linspace(t_start, 0, n + 1).round().long()
    if settings["noise_source"]:
        noise = torch.randn(x.shape, generator=generator)
        x_t = q_sample(x, torch.full((len(x),), t_start), noise)
    else:
        x_t = x
    x0 = x
    for i in range(n):
        t, t_next = steps[i], steps[i + 1]
        a = cosine_alpha_bar(t.view(1)).float()
        x0 = rho * F.normalize(net(x_t, t.expand(len(x_t))), dim=1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt().clamp(min=1e-8)
        a_next = cosine_alpha_bar(t_next.view(1)).float()
        x_t = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x0
