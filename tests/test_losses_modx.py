"""Mod-X: loop reference, KL = 0 at new == old, cognition-aligned rows, reductions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loss_reference_checks import assert_same_value_and_grad, log_softmax_entry, randn, unit
from modalign.losses import build_loss
from modalign.losses.modx import aligned_row_kl, modx_loss


def reference_kl_rows(new_rows, old_rows, reduction):
    b = len(new_rows)
    total = 0.0
    for i in range(b):
        old = [v.detach() for v in old_rows[i]]
        if max(range(b), key=lambda j: float(old[j])) != i:
            old = [v.detach() for v in new_rows[i]]  # cognition align
        for j in range(b):
            p = math.exp(float(log_softmax_entry(old, j)))
            total = total + p * (log_softmax_entry(old, j) - log_softmax_entry(new_rows[i], j))
    return total / b if reduction == "mean" else total


def reference_modx(nx, ny, ox, oy, temperature=1.0, reduction="mean"):
    b = nx.shape[0]
    n = [[unit(nx[i]) @ unit(ny[j]) / temperature for j in range(b)] for i in range(b)]
    o = [[unit(ox[i]) @ unit(oy[j]) / temperature for j in range(b)] for i in range(b)]
    n_t = [[n[j][i] for j in range(b)] for i in range(b)]
    o_t = [[o[j][i] for j in range(b)] for i in range(b)]
    return (reference_kl_rows(n, o, reduction) + reference_kl_rows(n_t, o_t, reduction)) / 2


def inputs_with_misread_rows():
    nx, ny = randn(5, 4, seed=1), randn(5, 4, seed=2)
    ox = nx + 0.3 * randn(5, 4, seed=3)
    oy = ox.clone()
    oy[1], oy[2] = ox[2], ox[1]  # the old model swaps samples 1 and 2: those rows are misread
    return [nx, ny, ox, oy]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_matches_loop_reference(reduction, temperature):
    assert_same_value_and_grad(
        lambda *t: modx_loss(*t, 1 / temperature, reduction=reduction).loss,
        lambda *t: reference_modx(*t, temperature, reduction),
        inputs_with_misread_rows(),
    )


def test_zero_when_new_equals_old_and_sum_scales_with_batch():
    nx, ny = randn(6, 3, seed=4), randn(6, 3, seed=5)
    assert float(modx_loss(nx, ny, nx, ny).loss) == pytest.approx(0.0, abs=1e-12)
    args = inputs_with_misread_rows()
    mean = modx_loss(*args, reduction="mean").loss
    torch.testing.assert_close(modx_loss(*args, reduction="sum").loss, 5 * mean)


def test_aligned_rows_contribute_zero_and_carry_no_gradient_regression():
    # The reference code copied the new row *with its graph* into the target; here the target is
    # detached, misread rows add exactly 0 and their gradient is exactly 0.
    nx, ny, ox, oy = (t.clone().requires_grad_(True) for t in inputs_with_misread_rows())
    new = F.normalize(nx, dim=1) @ F.normalize(ny, dim=1).T
    old = F.normalize(ox, dim=1) @ F.normalize(oy, dim=1).T
    misread = old.detach().argmax(dim=1) != torch.arange(5)
    assert misread.tolist() == [False, True, True, False, False]
    per_row_total = aligned_row_kl(new, old).sum()
    lp_old, lp_new = old.detach().log_softmax(dim=1), new.log_softmax(dim=1)
    keep = (lp_old.exp() * (lp_old - lp_new)).sum(dim=1)[~misread].sum()
    torch.testing.assert_close(per_row_total, keep)  # misread rows add exactly 0
    out = modx_loss(nx, ny, ox, oy)
    out.loss.backward()
    assert ox.grad is None and oy.grad is None  # the old model gets no gradient
    g_rows = torch.autograd.grad(aligned_row_kl(new, old.detach()).sum(), nx)[0]
    assert torch.all(g_rows[misread] == 0)


def test_module_uses_old_keys():
    loss = build_loss("modx", modalities=["img", "txt"])
    t = inputs_with_misread_rows()
    emb = dict(zip(["img", "txt", "img_old", "txt_old"], t, strict=True))
    torch.testing.assert_close(loss(emb).loss, modx_loss(*t).loss)
    with pytest.raises(ValueError, match="img_old"):
        loss({"img": t[0], "txt": t[1]})


def test_bad_input():
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="old_x"):
        modx_loss(x, x, torch.ones(2, 2), x)
    with pytest.raises(ValueError, match="new_y"):
        modx_loss(x, torch.full((3, 2), float("inf")), x, x)
    with pytest.raises(ValueError, match="logit_scale"):
        modx_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        modx_loss(x, x, x, x, reduction="batchmean")  # type: ignore[arg-type]
