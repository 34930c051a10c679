"""SLAP / BYOL: loop reference, range, stop-gradient, weights and argument order, EMA update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loss_reference_checks import assert_same_value_and_grad, randn, unit
from modalign.losses import build_loss
from modalign.losses.slap import byol_distance, ema_update_, slap_loss


def reference_distance(q, z):
    return sum(2 - 2 * (unit(q[i]) @ unit(z[i]).detach()) for i in range(q.shape[0])) / q.shape[0]


def reference_slap(qa, qb, za, zb, w):
    cross = (reference_distance(qa, zb) + reference_distance(qb, za)) / 2
    uni = (reference_distance(qa, za) + reference_distance(qb, zb)) / 2
    return w * cross + (1 - w) * uni


@pytest.mark.parametrize("w", [0.5, 0.2, 1.0])
def test_matches_loop_reference(w):
    inputs = [randn(5, 4, seed=s) for s in range(4)]
    assert_same_value_and_grad(
        lambda *t: slap_loss(*t, cross_weight=w).loss, lambda *t: reference_slap(*t, w), inputs
    )


def test_argument_order_weights_the_right_terms_regression():
    # Cross terms aligned (0), unimodal terms anti-aligned (4): only w = 1 gives 0. The reference
    # code passed (q_t, q_a, ...) to a (q_a, q_t, ...) signature, swapping the two groups.
    za = torch.eye(3, dtype=torch.float64)
    zb = -za
    qa, qb = zb.clone(), za.clone()  # q_a points at z_b, q_b at z_a
    out = slap_loss(qa, qb, za, zb, cross_weight=1.0)
    assert float(out.loss) == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(out.parts["a-to-a"], torch.tensor(4.0, dtype=torch.float64))
    out = slap_loss(qa, qb, za, zb, cross_weight=0.25)
    assert float(out.loss) == pytest.approx(0.75 * 4.0)


def test_range_zero_iff_aligned_and_no_gradient_to_targets():
    q, z = randn(6, 3, seed=1), randn(6, 3, seed=2)
    cos = [float(q[i] @ z[i] / (q[i].norm() * z[i].norm())) for i in range(6)]  # row by row
    assert float(byol_distance(q, z)) == pytest.approx(sum(2 - 2 * c for c in cos) / 6, abs=1e-12)
    assert float(byol_distance(3 * z, z)) == pytest.approx(0.0, abs=1e-12)
    assert float(byol_distance(-z, z)) == pytest.approx(4.0)
    z_leaf = z.clone().requires_grad_(True)
    q_leaf = q.clone().requires_grad_(True)
    slap_loss(q_leaf, q_leaf * 2, z_leaf, z_leaf * 0.5).loss.backward()
    assert z_leaf.grad is None and q_leaf.grad is not None


def test_without_unimodal_terms_only_cross_terms_count():
    inputs = [randn(4, 3, seed=s) for s in range(4)]
    out = slap_loss(*inputs, unimodal=False)
    torch.testing.assert_close(out.loss, (out.parts["a-to-b"] + out.parts["b-to-a"]) / 2)
    assert sorted(out.parts) == ["a-to-b", "b-to-a"]


def test_ema_update_formula_copy_and_frozen():
    torch.manual_seed(0)
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.normal_()
        online.running_mean.normal_()
        online.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update_(target, online, 0.9)
    torch.testing.assert_close(target.weight, 0.9 * before["weight"] + 0.1 * online.weight)
    torch.testing.assert_close(
        target.running_mean, 0.9 * before["running_mean"] + 0.1 * online.running_mean
    )
    assert int(target.num_batches_tracked) == 7
    frozen = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update_(target, online, 1.0)
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, frozen[k])
    ema_update_(target, online, 0.0)
    torch.testing.assert_close(target.weight, online.weight)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(target, online, 1.5)
    with pytest.raises(ValueError, match="same parameter"):
        ema_update_(nn.Linear(3, 3), online, 0.5)


def test_module_target_keys():
    loss = build_loss("slap", modalities=["audio", "text"], target_keys=["a_ema", "t_ema"])
    emb = {
        k: randn(3, 4, seed=i, dtype=torch.float32)
        for i, k in enumerate(["audio", "text", "a_ema", "t_ema"])
    }
    expected = slap_loss(emb["audio"], emb["text"], emb["a_ema"], emb["t_ema"])
    torch.testing.assert_close(loss(emb).loss, expected.loss)
    with pytest.raises(ValueError, match="t_ema"):
        loss({k: v for k, v in emb.items() if k != "t_ema"})


def test_bad_input():
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="target"):
        byol_distance(x, torch.ones(2, 2))
    with pytest.raises(ValueError, match="prediction"):
        byol_distance(torch.zeros(3, 2), x)
    with pytest.raises(ValueError, match="cross_weight"):
        slap_loss(x, x, x, x, cross_weight=-0.1)
