"""iSogCLR / ATI (Qiu et al., ICML 2023): per-sample temperatures learned by robust optimisation.

Anchor i (of either modality) has its own temperature ``tau_i`` and the objective
``F_i = tau_i log( (1/(B-1)) sum_j exp(h_ij / tau_i) ) + tau_i rho``, ``h_ij = s_ij - s_ii``
(the KL-DRO dual). The network sees a surrogate whose *gradient* is that of ``F`` with a
moving-average estimate of the inner sum; the temperatures take a momentum step on ``dF/dtau``
outside autograd. State (one entry per dataset sample) is indexed by ``indices``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from modalign.errors import ModalignError
from modalign.losses._support import check_fraction, pick, unit_rows
from modalign.losses.base import LossModule, ScaleOptions, caller_stacklevel
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import check_positive, validation_enabled


@dataclass(frozen=True)
class AnchorStep:
    """One side's result: the surrogate loss, the objective value, and the new per-anchor state."""

    surrogate: Tensor
    objective: Tensor
    s: Tensor
    b: Tensor
    tau_grad: Tensor


def isogclr_anchor_step(
    sim: Tensor, tau: Tensor, s_old: Tensor, b_old: Tensor, *, gamma: float, rho: float
) -> AnchorStep:
    """One iSogCLR step for the anchors on the rows of ``sim`` (B, B), positives on the diagonal.

    ``h = sim - diag``, ``h~ = h / tau`` (detached); running max ``b = max(b_old, max_j h~)``;
    ``e = exp(h~ - b)``; ``g = sum_j e / (B - 1)`` (j = i included, as in the reference code);
    ``s = (1 - gamma) s_old exp(b_old - b) + gamma g``; ``w = e / s``. The surrogate
    ``mean_i sum_j w_ij h_ij / (B - 1)`` has the gradient of ``F`` with respect to the embeddings
    (its value is not ``F``); ``objective`` is ``mean_i F_i`` on this batch alone, detached;
    ``tau_grad = log s + b + rho - sum_j w_ij h~_ij / (B - 1)`` is ``dF_i/dtau_i``.
    """
    b = sim.shape[0]
    if b < 2:
        raise ValueError(f"sim must have at least 2 rows (the loss needs negatives), got {b}")
    h = sim - sim.diagonal().unsqueeze(1)
    h_scaled = h.detach() / tau.unsqueeze(1)
    b_new = torch.maximum(b_old, h_scaled.max(dim=1).values)
    e = (h_scaled - b_new.unsqueeze(1)).exp()
    g = e.sum(dim=1) / (b - 1)
    s_new = (1 - gamma) * s_old * (b_old - b_new).exp() + gamma * g
    w = e / s_new.unsqueeze(1)
    surrogate = ((w * h).sum(dim=1) / (b - 1)).mean()
    tau_grad = s_new.log() + b_new + rho - (w * h_scaled).sum(dim=1) / (b - 1)
    lse = h_scaled.logsumexp(dim=1) - math.log(b - 1)
    objective = (tau * (lse + rho)).mean()
    return AnchorStep(surrogate, objective, s_new, b_new, tau_grad)


@register_loss("isogclr")
class ISogCLRLoss(LossModule):
    """iSogCLR with per-sample temperatures for both modalities; needs ``indices`` in ``forward``.

    Defaults: ``temperature = 0.01`` (every tau_i at the start), ``temperature_bounds =
    (0.005, 1)``, ``gamma = 0.8``, ``rho = 6``, ``eta = 0.03``, ``beta_u = 0.9``, ``dF/dtau``
    clipped to ``[-5, 5]``: one source, the reference's bimodal launch command
    (``run_sogclrdro.sh``: ``--tau_init 0.01 --sogclr_gamma 0.8 --rho_init 6.0 --eta_init 0.03
    --eta_sched const``; ``beta_u`` and the bounds from its code; its argparse defaults differ:
    ``rho_init 8.0``, ``eta_init 0.001``). The temperatures are not a
    gradient-trained log scale: they take their own momentum step (``learnable_temperature=False``
    keeps them at ``temperature``). In training mode every call updates the state of the samples in
    ``indices``; in eval mode the state is read, not written. ``loss`` is the gradient surrogate;
    the parts hold the objective values (``objective_<m>``) and the mean temperature of the batch
    (``tau_<m>``). ``tau_init``, ``tau_min`` and ``tau_max`` are the older spellings of
    ``temperature`` and ``temperature_bounds``.

    Examples:
        >>> loss = ISogCLRLoss(["image", "text"], dataset_size=10)
        >>> emb = {"image": torch.randn(4, 8), "text": torch.randn(4, 8)}
        >>> out = loss(emb, indices=torch.tensor([0, 3, 5, 9]))
        >>> sorted(out.parts)[:2]
        ['objective_image', 'objective_text']
    """

    needs_indices = True
    needs_dataset_size = True
    older_keywords = ("tau_init", "tau_min", "tau_max")
    scale_defaults = ScaleOptions(temperature=0.01, temperature_bounds=(5e-3, 1.0))

    s: Tensor
    b: Tensor
    tau: Tensor
    u: Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        dataset_size: int | None = None,
        *,
        gamma: float = 0.8,
        rho: float = 6.0,
        eta: float = 0.03,
        beta_u: float = 0.9,
        grad_clip: float = 5.0,
        **options: Any,
    ) -> None:
        _read_older_temperature_keywords(options)
        super().__init__(modalities, **options)
        if dataset_size is None:
            raise ModalignError("isogclr needs dataset_size (the number of training samples: "
                                "its per-sample state); the trainer passes it")
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 2:
            raise ValueError(f"dataset_size must be an integer >= 2, got {dataset_size!r}")
        opts = self.scale_options
        if opts.init_logit_bias is not None:
            raise ModalignError("isogclr has no logit bias; leave init_logit_bias unset")
        tau_init, (tau_min, tau_max) = opts.temperature, opts.temperature_bounds
        for name, value in (("tau_min", tau_min), ("eta", eta), ("grad_clip", grad_clip)):
            check_positive(name, value)
        if not tau_min <= tau_init <= tau_max:
            raise ValueError(f"temperature must lie in temperature_bounds {opts.temperature_bounds}"
                             f", got {tau_init}")
        if not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        check_fraction(gamma, "gamma")
        check_fraction(beta_u, "beta_u")
        if gamma == 0:
            raise ValueError("gamma must be > 0 (with 0 the estimate never moves)")
        self.dataset_size = dataset_size
        self.tau_min, self.tau_max, self.gamma, self.rho = tau_min, tau_max, gamma, rho
        self.eta, self.beta_u, self.grad_clip = eta, beta_u, grad_clip
        self.register_buffer("s", torch.zeros(2, dataset_size, dtype=torch.float64))
        self.register_buffer("b", torch.zeros(2, dataset_size, dtype=torch.float64))
        self.register_buffer(
            "tau", torch.full((2, dataset_size), float(tau_init), dtype=torch.float64)
        )
        self.register_buffer("u", torch.zeros(2, dataset_size, dtype=torch.float64))

    def _check_indices(self, indices: Tensor | None, batch: int) -> Tensor:
        if indices is None:
            raise ValueError("indices is required by isogclr: the dataset index of every row")
        if indices.shape != (batch,) or indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor of shape ({batch},)")
        if validation_enabled():  # the value checks read the indices on the host
            if bool(((indices < 0) | (indices >= self.dataset_size)).any()):
                raise ValueError(f"indices must lie in [0, {self.dataset_size}) (dataset_size)")
            if indices.unique().numel() != batch:
                raise ValueError("indices must be distinct within a batch")
        return indices.to(self.s.device).long()

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        x_raw, y_raw = pick(embeddings, self.modalities)
        x = unit_rows(x_raw, self.modalities[0])
        y = unit_rows(y_raw, self.modalities[1], rows=x.shape[0], dim=x.shape[1])
        idx = self._check_indices(indices, x.shape[0])
        sim = x @ y.T
        total = sim.new_zeros(())
        parts: dict[str, Tensor] = {}
        for side, (name, rows) in enumerate(zip(self.modalities, (sim, sim.T), strict=True)):
            tau = self.tau[side, idx]
            step = isogclr_anchor_step(
                rows.double(),
                tau,
                self.s[side, idx],
                self.b[side, idx],
                gamma=self.gamma,
                rho=self.rho,
            )
            total = total + step.surrogate.to(sim.dtype)
            parts[f"surrogate_{name}"] = step.surrogate.detach().to(sim.dtype)
            parts[f"objective_{name}"] = step.objective.detach().to(sim.dtype)
            parts[f"tau_{name}"] = tau.mean().to(sim.dtype)
            if self.training:
                self._update(side, idx, step)
        return LossOutput(total, parts)

    @torch.no_grad()
    def _update(self, side: int, idx: Tensor, step: AnchorStep) -> None:
        grad = step.tau_grad.detach().clamp(-self.grad_clip, self.grad_clip)
        u = (1 - self.beta_u) * self.u[side, idx] + self.beta_u * grad
        self.u[side, idx] = u
        if self.scale_options.learnable_temperature:
            tau = (self.tau[side, idx] - self.eta * u).clamp(self.tau_min, self.tau_max)
            self.tau[side, idx] = tau
        self.s[side, idx] = step.s.detach()
        self.b[side, idx] = step.b.detach()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every temperature in ``[tau_min, tau_max]`` (they are updated in ``forward``)."""
        self.tau.clamp_(self.tau_min, self.tau_max)


_OLDER_KEYWORDS = {"tau_init": "temperature", "tau_min": "temperature_bounds",
                   "tau_max": "temperature_bounds"}


def _read_older_temperature_keywords(options: dict[str, Any]) -> None:
    """Rewrite ``tau_init`` / ``tau_min`` / ``tau_max`` in place, with a ``FutureWarning``."""
    old = [k for k in _OLDER_KEYWORDS if k in options]
    if not old:
        return
    warnings.warn(f"isogclr: {old} are deprecated; use 'temperature' (the initial tau) and "
                  "'temperature_bounds' = (tau_min, tau_max)", FutureWarning,
                  stacklevel=caller_stacklevel())
    if "tau_init" in options:
        options["temperature"] = options.pop("tau_init")
    if "tau_min" in options or "tau_max" in options:
        lo, hi = options.get("temperature_bounds", ISogCLRLoss.scale_defaults.temperature_bounds)
        options["temperature_bounds"] = (options.pop("tau_min", lo), options.pop("tau_max", hi))
