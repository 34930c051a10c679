"""CLIP-Refine's RaFA and HyCD and the CMA loss against naive references (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from modalign.errors import ModalignError
from modalign.losses import build_loss
from modalign.losses.clip import clip_loss
from modalign.losses.cma import cma_loss
from modalign.refine.losses import hycd_loss, rafa_loss


def _pairs(seed: int, b: int = 6, d: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(4)]


# ---------------------------------------------------------------------------- RaFA


def naive_rafa(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Paper form: mean_k 1/2 (|a-r|^2 + |b-r|^2); the official MSE sum is (2/d) times it."""
    total = sum(0.5 * ((a[k] - r[k]).pow(2).sum() + (b[k] - r[k]).pow(2).sum())
                for k in range(len(a)))
    return total / len(a)


def test_rafa_official_form_and_identity() -> None:
    a, b, r, _ = _pairs(0)
    a.requires_grad_(True)
    got = rafa_loss(a, b, reference=r)
    want = naive_rafa(a, b, r) * 2 / a.shape[1]
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    (ga,) = torch.autograd.grad(got, a)
    (wa,) = torch.autograd.grad(naive_rafa(a, b, r) * 2 / a.shape[1], a)
    assert torch.allclose(ga, wa, atol=1e-12)
    # 1/2(|a-r|^2+|b-r|^2) = 1/4|a-b|^2 + |(a+b)/2 - r|^2, row by row
    lhs = 0.5 * ((a - r).pow(2).sum(1) + (b - r).pow(2).sum(1))
    rhs = 0.25 * (a - b).pow(2).sum(1) + ((a + b) / 2 - r).pow(2).sum(1)
    assert torch.allclose(lhs, rhs, atol=1e-12)


def test_rafa_monte_carlo_mean() -> None:
    a, b, _, _ = _pairs(1, b=4, d=3)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([rafa_loss(a, b, generator=g) for _ in range(4000)])
    d = a.shape[1]
    expected = (2 / d) * float((0.25 * (a - b).pow(2).sum(1)
                                + ((a + b) / 2).pow(2).sum(1) + d).mean())
    assert float(draws.mean()) == pytest.approx(expected, rel=0.03)


def test_rafa_normalized_expected_value_is_constant() -> None:
    a, b, _, _ = _pairs(2, b=3, d=4)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([rafa_loss(a, b, normalize=True, generator=g) for _ in range(4000)])
    assert float(draws.mean()) == pytest.approx((2 / 4) * (1 + 4), rel=0.03)


# ---------------------------------------------------------------------------- HyCD


def naive_hycd(a, b, ta, tb, alpha, t):
    def one_direction(s, st):
        total = 0.0
        for i in range(len(s)):
            q = [alpha * (i == j) + (1 - alpha) * math.exp(st[i, j] / t)
                 / sum(math.exp(st[i, k] / t) for k in range(len(s))) for j in range(len(s))]
            lse = torch.logsumexp(s[i] / t, dim=0)
            for j in range(len(s)):
                if q[j] > 0:
                    total = total + q[j] * (math.log(q[j]) - (s[i, j] / t - lse))
        return total / len(s)

    s, st = a @ b.T, (ta @ tb.T).detach()
    return (one_direction(s, st) + one_direction(s.T, st.T)) / 2 * t * t


@pytest.mark.parametrize("alpha,t", [(0.5, 1.0), (0.0, 2.0), (1.0, 0.5), (0.3, 0.7)])
def test_hycd_against_loop(alpha: float, t: float) -> None:
    a, b, ta, tb = _pairs(3)
    a.requires_grad_(True)
    got = hycd_loss(a, b, ta, tb, alpha=alpha, temperature=t)
    want = naive_hycd(a, b, ta, tb, alpha, t)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    (ga,) = torch.autograd.grad(got, a)
    (wa,) = torch.autograd.grad(want, a)
    assert torch.allclose(ga, wa, atol=1e-10)


def test_hycd_special_cases() -> None:
    a, b, ta, tb = _pairs(4)
    ce = clip_loss(a, b, 1.0, normalize=False).loss
    assert float(hycd_loss(a, b, ta, tb, alpha=1.0)) == pytest.approx(float(ce), rel=1e-10)
    assert abs(float(hycd_loss(a, b, a, b, alpha=0.0))) < 1e-12
    perm = torch.randperm(len(a))
    assert float(hycd_loss(a[perm], b[perm], ta[perm], tb[perm])) == pytest.approx(
        float(hycd_loss(a, b, ta, tb)), rel=1e-10)
    with pytest.raises(ModalignError, match="alpha"):
        hycd_loss(a, b, ta, tb, alpha=1.5)
    with pytest.raises(ModalignError, match="temperature"):
        hycd_loss(a, b, ta, tb, temperature=0.0)


# ---------------------------------------------------------------------------- CMA


def naive_cma(x, y, s, lam):
    x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    logits = s * x @ y.T
    n = len(x)
    row = sum(-torch.log_softmax(logits[i], 0)[i] - lam * torch.logsumexp(logits[i], 0)
              for i in range(n)) / n
    col = sum(-torch.log_softmax(logits[:, j], 0)[j] - lam * torch.logsumexp(logits[:, j], 0)
              for j in range(n)) / n
    return (row + col) / 2


@pytest.mark.parametrize("lam", [0.0, 0.001, 0.5, 1.0])
def test_cma_against_loop(lam: float) -> None:
    a, b, _, _ = _pairs(5)
    a.requires_grad_(True)
    got = cma_loss(a, b, 7.0, lam).loss
    want = naive_cma(a, b, 7.0, lam)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    (ga,) = torch.autograd.grad(got, a)
    (wa,) = torch.autograd.grad(want, a)
    assert torch.allclose(ga, wa, atol=1e-10)


def test_cma_identities() -> None:
    a, b, _, _ = _pairs(6)
    assert float(cma_loss(a, b, 5.0, 0.0).loss) == pytest.approx(
        float(clip_loss(a, b, 5.0).loss), rel=1e-10)
    # per direction: mean(-L_kk + (1 - lam) LSE)
    lam = 0.3
    logits = 5.0 * torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(
        b, dim=1).T
    row = (-logits.diagonal() + (1 - lam) * logits.logsumexp(1)).mean()
    col = (-logits.diagonal() + (1 - lam) * logits.logsumexp(0)).mean()
    assert float(cma_loss(a, b, 5.0, lam).loss) == pytest.approx(float((row + col) / 2),
                                                                 rel=1e-10)


def test_cma_label_aware_masks_same_class() -> None:
    a, b, _, _ = _pairs(7, b=4)
    groups = torch.tensor([0, 0, 1, 2])
    got = cma_loss(a, b, 3.0, 0.0, groups=groups, label_aware=True).loss
    # rows 0 and 1 share a class: each loses the other from its softmax
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0, 1] = keep[1, 0] = False
    logits = 3.0 * torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(
        b, dim=1).T
    masked = logits.masked_fill(~keep, float("-inf"))
    want = ((masked.logsumexp(1) - logits.diagonal()).mean()
            + (masked.logsumexp(0) - logits.diagonal()).mean()) / 2
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    with pytest.raises(ValueError, match="groups"):
        cma_loss(a, b, 3.0, label_aware=True)


def test_cma_registered_for_train_configs() -> None:
    loss = build_loss("cma", modalities=["image", "text"], lam=0.01)
    emb = {"image": torch.randn(4, 3), "text": torch.randn(4, 3)}
    out = loss(emb)
    out.loss.backward()
    assert loss.log_logit_scale.grad is not None


def test_cma_in_an_objective_list() -> None:
    from modalign.losses import build_objective

    obj = build_objective([{"loss": "clip", "modalities": ["image", "text"]},
                           {"loss": "cma", "modalities": ["image", "text"], "weight": 0.5,
                            "lam": 0.01, "label_aware": True}])
    emb = {"image": torch.randn(6, 4), "text": torch.randn(6, 4)}
    out = obj(emb, groups=torch.tensor([0, 0, 1, 1, 2, 2]))
    assert set(out.parts) >= {"clip[image,text]", "cma[image,text]"}
    obj.clamp_()  # unclamped scale: bounds are infinite, clamp_ is a no-op
