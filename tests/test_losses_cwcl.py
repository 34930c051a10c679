"""CWCL: loop reference, the reductions of the spec, detached weights, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loss_reference_checks import assert_same_value_and_grad, log_softmax_entry, randn, unit
from modalign.losses import build_loss
from modalign.losses.cwcl import CWCLLoss, cwcl_loss, cwcl_weights


def reference_cwcl(p, q, scale, sharpness=1.0):
    """Obvious loops: soft-target CE frozen->trained, hard CE trained->frozen, averaged."""
    b = p.shape[0]
    pu = [unit(p[i]) for i in range(b)]
    qu = [unit(q[i]) for i in range(b)]
    u_to_v = 0.0
    for i in range(b):
        w = [(((pu[i] @ pu[j]).detach() + 1) / 2) ** sharpness for j in range(b)]
        z = sum(w)
        row = [scale * (pu[i] @ qu[j]) for j in range(b)]
        u_to_v = u_to_v - sum(w[j] / z * log_softmax_entry(row, j) for j in range(b))
    v_to_u = 0.0
    for i in range(b):
        row = [scale * (qu[i] @ pu[j]) for j in range(b)]
        v_to_u = v_to_u - log_softmax_entry(row, i)
    return (u_to_v / b + v_to_u / b) / 2


@pytest.mark.parametrize("sharpness", [1.0, 3.0])
def test_matches_loop_reference(sharpness):
    p, q = randn(6, 5, seed=1), randn(6, 5, seed=2)
    assert_same_value_and_grad(
        lambda a, b: cwcl_loss(a, b, 7.0, sharpness=sharpness).loss,
        lambda a, b: reference_cwcl(a, b, 7.0, sharpness),
        [p, q],
    )


def test_identity_weights_give_one_direction_infonce():
    # Orthogonal frozen rows and a sharp kernel make w the identity (0.5 ** 200 off the diagonal).
    p, q = torch.eye(5, dtype=torch.float64), randn(5, 5, seed=3)
    out = cwcl_loss(p, q, 4.0, sharpness=200.0)
    logits = 4.0 * p @ F.normalize(q, dim=1).T
    expected = F.cross_entropy(logits, torch.arange(5))
    torch.testing.assert_close(out.parts["frozen-to-trained"], expected)


def test_equal_weights_give_uniform_target_ce():
    p = torch.ones(4, 3, dtype=torch.float64)  # all frozen rows equal: every w_ij = 1
    q = randn(4, 3, seed=4)
    logits = 3.0 * F.normalize(p, dim=1) @ F.normalize(q, dim=1).T
    expected = (logits.logsumexp(dim=1) - logits.mean(dim=1)).mean()
    torch.testing.assert_close(cwcl_loss(p, q, 3.0).parts["frozen-to-trained"], expected)


def test_weights_rows_sum_to_one_lie_in_unit_interval_and_are_detached():
    p = randn(7, 4, seed=5).requires_grad_(True)
    raw = (F.normalize(p.detach(), dim=1) @ F.normalize(p.detach(), dim=1).T + 1) / 2
    assert float(raw.min()) >= 0 and float(raw.max()) <= 1 + 1e-12
    torch.testing.assert_close(raw.diagonal(), torch.ones(7, dtype=torch.float64))
    w = cwcl_weights(p)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(7, dtype=torch.float64))
    assert not w.requires_grad
    # The frozen tower only receives gradient through the logits, never through the targets.
    q = randn(7, 4, seed=6)
    (g_ours,) = torch.autograd.grad(cwcl_loss(p, q, 5.0).parts["frozen-to-trained"], p)
    logits = 5.0 * F.normalize(p, dim=1) @ F.normalize(q, dim=1).T
    constant_targets = cwcl_weights(p.detach().clone())
    fixed = -(constant_targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    (g_fixed,) = torch.autograd.grad(fixed, p)
    torch.testing.assert_close(g_ours, g_fixed)


def test_module_uses_declared_names_and_clamps():
    loss = build_loss("cwcl", modalities=["speech", "words"])
    assert isinstance(loss, CWCLLoss)
    emb = {
        "speech": randn(4, 3, seed=7, dtype=torch.float32),
        "words": randn(4, 3, seed=8, dtype=torch.float32),
    }
    out = loss(emb)
    expected = cwcl_loss(emb["speech"], emb["words"], math.exp(math.log(1 / 0.07)))
    torch.testing.assert_close(out.loss, expected.loss)
    with torch.no_grad():
        loss.log_logit_scale.fill_(9.0)
    loss.clamp_()
    assert math.isclose(float(loss.logit_scale().detach()), 100.0, rel_tol=1e-6)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(2, 6), d=st.integers(1, 5), scale=st.floats(0.1, 50.0))
def test_hypothesis_against_reference(b, d, scale):
    p, q = randn(b, d, seed=b * 10 + d), randn(b, d, seed=b * 10 + d + 1)
    assert_same_value_and_grad(
        lambda a, c: cwcl_loss(a, c, scale).loss,
        lambda a, c: reference_cwcl(a, c, scale),
        [p, q],
        rtol=1e-7,
    )


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"frozen": torch.zeros(3, 2)}, "frozen"),
        ({"trained": torch.full((3, 2), float("nan"))}, "trained"),
        ({"trained": torch.ones(4, 2)}, "trained"),
        ({"trained": torch.ones(3, 5)}, "trained"),
        ({"frozen": torch.ones(0, 2)}, "frozen"),
        ({"logit_scale": -1.0}, "logit_scale"),
        ({"sharpness": 0.0}, "sharpness"),
    ],
)
def test_bad_input_names_the_argument(kwargs, word):
    args = {"frozen": torch.ones(3, 2), "trained": torch.ones(3, 2), "logit_scale": 1.0}
    sharp = kwargs.pop("sharpness", 1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        cwcl_loss(args["frozen"], args["trained"], args["logit_scale"], sharpness=sharp)
