"""iSogCLR: surrogate gradient = objective gradient, dF/dtau, state against loops, bounds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from loss_reference_checks import assert_same_value_and_grad, randn
from modalign.losses import build_loss
from modalign.losses.isogclr import ISogCLRLoss, isogclr_anchor_step


def objective(sim, tau, rho):
    """mean_i tau_i log( sum_j exp(h_ij / tau_i) / (B - 1) ) + tau_i rho, with loops."""
    b = sim.shape[0]
    total = 0.0
    for i in range(b):
        inner = sum(torch.exp((sim[i, j] - sim[i, i]) / tau[i]) for j in range(b)) / (b - 1)
        total = total + tau[i] * torch.log(inner) + tau[i] * rho
    return total / b


def test_surrogate_gradient_is_the_objective_gradient_when_gamma_is_one():
    x, y = randn(5, 4, seed=1), randn(5, 4, seed=2)
    tau = torch.tensor([0.3, 0.5, 0.2, 0.8, 0.4], dtype=torch.float64)
    zeros = torch.zeros(5, dtype=torch.float64)

    def ours(a, b):
        sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
        return isogclr_anchor_step(sim, tau, zeros, zeros, gamma=1.0, rho=8.0).surrogate

    def reference(a, b):
        return objective(F.normalize(a, dim=1) @ F.normalize(b, dim=1).T, tau, 8.0)

    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [y.clone().requires_grad_(True) for _ in range(2)]
    g_ours = torch.autograd.grad(ours(xs[0], ys[0]), [xs[0], ys[0]])
    g_ref = torch.autograd.grad(reference(xs[1], ys[1]), [xs[1], ys[1]])
    for go, gr in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(go, gr)
    # The surrogate's value is not the objective (documented); the objective part is.
    sim = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    step = isogclr_anchor_step(sim, tau, zeros, zeros, gamma=1.0, rho=8.0)
    torch.testing.assert_close(step.objective, objective(sim, tau, 8.0))
    assert abs(float(step.surrogate) - float(step.objective)) > 1e-3


def test_tau_gradient_matches_finite_differences():
    sim = F.normalize(randn(6, 3, seed=3), dim=1) @ F.normalize(randn(6, 3, seed=4), dim=1).T
    tau = torch.full((6,), 0.3, dtype=torch.float64)
    zeros = torch.zeros(6, dtype=torch.float64)
    step = isogclr_anchor_step(sim, tau, zeros, zeros, gamma=1.0, rho=2.0)
    h = sim - sim.diagonal()[:, None]

    def per_anchor(t):
        return t * torch.log(torch.exp(h / t[:, None]).sum(1) / 5) + t * 2.0

    eps = 1e-6
    numeric = (per_anchor(tau + eps) - per_anchor(tau - eps)) / (2 * eps)
    torch.testing.assert_close(step.tau_grad, numeric, rtol=1e-6, atol=1e-8)


class LoopState:
    """The no-shift float64 reference of the moving average and the temperature update."""

    def __init__(self, n, tau_init):
        self.s = [[0.0] * n for _ in range(2)]
        self.tau = [[tau_init] * n for _ in range(2)]
        self.u = [[0.0] * n for _ in range(2)]

    def step(self, sim, idx, gamma, rho, eta, beta_u, lo, hi):
        b = sim.shape[0]
        surrogate = 0.0
        for side, rows in enumerate((sim, sim.T)):
            side_total = 0.0
            for r, k in enumerate(idx):
                t = self.tau[side][k]
                h = [rows[r, j] - rows[r, r] for j in range(b)]
                g = sum(math.exp(float(v.detach()) / t) for v in h) / (b - 1)
                s = (1 - gamma) * self.s[side][k] + gamma * g
                w = [math.exp(float(v.detach()) / t) / s for v in h]
                side_total = side_total + sum(w[j] * h[j] for j in range(b)) / (b - 1)
                mean_wh = sum(w[j] * float(h[j].detach()) / t for j in range(b)) / (b - 1)
                grad = math.log(s) + rho - mean_wh
                grad = min(max(grad, -5.0), 5.0)
                self.u[side][k] = (1 - beta_u) * self.u[side][k] + beta_u * grad
                self.tau[side][k] = min(max(t - eta * self.u[side][k], lo), hi)
                self.s[side][k] = s
            surrogate = surrogate + side_total / b
        return surrogate


def test_module_two_steps_match_loop_state_and_running_max_is_invisible():
    kw = {
        "temperature": 0.05,
        "temperature_bounds": (0.01, 1.0),
        "gamma": 0.7,
        "rho": 1.0,
        "eta": 0.05,
        "beta_u": 0.9,
    }
    loss = ISogCLRLoss(["image", "text"], dataset_size=8, **kw)
    ref = LoopState(8, kw["temperature"])
    for step, idx in enumerate(([0, 3, 5, 7], [3, 1, 0, 6])):
        x, y = randn(4, 5, seed=10 + step), randn(4, 5, seed=20 + step)
        before_module, before_ref = copy.deepcopy(loss), copy.deepcopy(ref)

        def ours(a, b, module=before_module, idx=idx):
            return module({"image": a, "text": b}, indices=torch.tensor(idx)).loss

        def reference(a, b, state=before_ref, idx=idx):
            sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
            return copy.deepcopy(state).step(
                sim,
                idx,
                kw["gamma"],
                kw["rho"],
                kw["eta"],
                kw["beta_u"],
                *kw["temperature_bounds"],
            )

        assert_same_value_and_grad(ours, reference, [x, y], rtol=1e-9, atol=1e-12)
        loss({"image": x, "text": y}, indices=torch.tensor(idx))
        ref.step(
            F.normalize(x, dim=1) @ F.normalize(y, dim=1).T,
            idx,
            kw["gamma"],
            kw["rho"],
            kw["eta"],
            kw["beta_u"],
            *kw["temperature_bounds"],
        )
        for side in range(2):
            for k in idx:
                # The stored (s, b) pair is the unshifted estimate s * exp(b) of the loop.
                true_s = float(loss.s[side, k] * torch.exp(loss.b[side, k]))
                assert true_s == pytest.approx(ref.s[side][k], rel=1e-10)
                assert float(loss.tau[side, k]) == pytest.approx(ref.tau[side][k], rel=1e-10)


def test_temperatures_stay_in_bounds_and_eval_mode_writes_nothing():
    loss = build_loss("isogclr", modalities=["a", "b"], dataset_size=6, eta=50.0)
    for seed in range(5):
        emb = {"a": randn(6, 3, seed=seed), "b": randn(6, 3, seed=seed + 50)}
        loss(emb, indices=torch.arange(6))
        assert float(loss.tau.min()) >= 5e-3 and float(loss.tau.max()) <= 1.0
    assert float(loss.tau.min()) != float(loss.tau.max())  # they did move
    loss.eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    out = loss({"a": randn(6, 3, seed=9), "b": randn(6, 3, seed=8)}, indices=torch.arange(6))
    for k, v in loss.state_dict().items():
        assert torch.equal(v, before[k])
    assert {"objective_a", "objective_b", "tau_a", "tau_b"} <= set(out.parts)


@pytest.mark.parametrize(
    ("indices", "word"),
    [
        (None, "indices"),
        (torch.tensor([0, 1]), "indices"),
        (torch.tensor([0, 1, 9]), "indices"),
        (torch.tensor([0, 1, 1]), "indices"),
        (torch.tensor([0.0, 1.0, 2.0]), "indices"),
    ],
)
def test_bad_indices(indices, word):
    loss = ISogCLRLoss(["a", "b"], dataset_size=5)
    with pytest.raises(ValueError, match=word):
        loss({"a": torch.randn(3, 2), "b": torch.randn(3, 2)}, indices=indices)


def test_bad_construction_and_batch_of_one():
    with pytest.raises(ValueError, match="dataset_size"):
        ISogCLRLoss(["a", "b"], dataset_size=1)
    with pytest.raises(ValueError, match="temperature"):
        ISogCLRLoss(["a", "b"], dataset_size=4, temperature=2.0)
    with pytest.raises(ValueError, match="gamma"):
        ISogCLRLoss(["a", "b"], dataset_size=4, gamma=1.5)
    loss = ISogCLRLoss(["a", "b"], dataset_size=4)
    with pytest.raises(ValueError, match="sim"):
        loss({"a": torch.randn(1, 2), "b": torch.randn(1, 2)}, indices=torch.tensor([0]))
    with pytest.raises(ValueError, match="b"):
        loss({"a": torch.randn(2, 2), "b": torch.zeros(2, 2)}, indices=torch.tensor([0, 1]))
