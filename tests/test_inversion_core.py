"""The inversion loop: AdamW against a hand-written per-sample loop, batch independence, seeding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modalign.bridge.inversion import (
    InversionSettings,
    ProjectedForward,
    cosine_loss,
    initial_tokens,
    invert,
    sample_seed,
)

torch.set_num_threads(1)


class TanhForward:
    """A small nonlinear tower from 2 pseudo-tokens of width 5 to 4-d features."""

    modality = "text"
    num_tokens = 2
    token_dim = 5

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        gen = torch.Generator().manual_seed(3)
        self.w1 = torch.randn(10, 16, generator=gen, dtype=dtype)
        self.w2 = torch.randn(16, 4, generator=gen, dtype=dtype)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(tokens.flatten(1) @ self.w1) @ self.w2

    def identity(self) -> dict:
        return {"kind": "tanh"}


def naive_adamw_inversion(target, forward, init, s: InversionSettings):
    """One sample, AdamW written out step by step (decoupled decay, bias-corrected moments)."""
    t = init.clone()
    m = torch.zeros_like(t)
    v = torch.zeros_like(t)
    b1, b2 = s.betas
    for k in range(1, s.steps + 1):
        x = t.clone().requires_grad_(True)
        feat = forward(x[None])[0]
        loss = 1 - torch.dot(feat / feat.norm(), target / target.norm())
        (g,) = torch.autograd.grad(loss, [x])
        t = t * (1 - s.lr * s.weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**k)
        v_hat = v / (1 - b2**k)
        t = t - s.lr * m_hat / (v_hat.sqrt() + s.eps)
    return t


def test_invert_matches_a_hand_written_adamw_loop_per_sample():
    fwd = TanhForward()
    targets = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = InversionSettings(steps=25, lr=2e-2, weight_decay=0.01, seed=7, batch_size=3)
    res = invert(targets, fwd, s, keys=["a", "b", "c", "d", "e"])
    init = initial_tokens(["a", "b", "c", "d", "e"], 2, 5, seed=7, std=0.02, dtype=torch.float64)
    for i in range(5):
        ref = naive_adamw_inversion(targets[i], fwd, init[i], s)
        torch.testing.assert_close(res.tokens[i], ref, rtol=0, atol=1e-10)
        feat = F.normalize(fwd(ref[None])[0], dim=0)
        torch.testing.assert_close(res.features[i], feat, rtol=0, atol=1e-10)
        cos = torch.dot(feat, F.normalize(targets[i], dim=0))
        torch.testing.assert_close(res.final_cosine[i], cos, rtol=0, atol=1e-10)


def test_defaults_are_the_official_ones():
    s = InversionSettings()
    assert (s.steps, s.lr, s.weight_decay, s.init_std) == (150, 2e-2, 0.01, 0.02)


def test_a_sample_alone_equals_the_same_sample_in_a_batch_of_8():
    fwd = TanhForward()
    targets = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keys = [f"item{i}" for i in range(8)]
    s = InversionSettings(steps=30, batch_size=8)
    batch = invert(targets, fwd, s, keys=keys)
    alone = invert(targets[5:6], fwd, s, keys=keys[5:6])
    torch.testing.assert_close(alone.tokens[0], batch.tokens[5], rtol=0, atol=1e-12)
    torch.testing.assert_close(alone.features[0], batch.features[5], rtol=0, atol=1e-12)
    # and the batch size used internally does not matter either
    small = invert(targets, fwd, InversionSettings(steps=30, batch_size=3), keys=keys)
    torch.testing.assert_close(small.tokens, batch.tokens, rtol=0, atol=1e-12)


def test_the_loss_is_a_sum_so_gradients_do_not_scale_with_the_batch():
    fwd = TanhForward()
    tokens = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(4, 4, dtype=torch.float64)
    (g_batch,) = torch.autograd.grad(cosine_loss(fwd(tokens), targets).sum(), [tokens])
    for i in range(4):
        (g_one,) = torch.autograd.grad(cosine_loss(fwd(tokens[i:i + 1]), targets[i:i + 1]).sum(),
                                       [tokens])
        torch.testing.assert_close(g_batch[i], g_one[i], rtol=0, atol=1e-12)


def test_initial_tokens_follow_keys_and_seed():
    a = initial_tokens(["x", "y", "z"], 1, 64, seed=0, std=0.02)
    b = initial_tokens(["z", "x"], 1, 64, seed=0, std=0.02)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, initial_tokens(["x", "y", "z"], 1, 64, seed=1, std=0.02))
    big = initial_tokens(list(range(200)), 1, 64, seed=0, std=0.02)
    assert abs(big.std().item() - 0.02) < 0.001 and abs(big.mean().item()) < 0.001
    assert sample_seed(0, 1) == sample_seed(0, "1")  # keys are compared as text


def test_optimisation_reaches_the_target_and_the_curve_falls():
    fwd = TanhForward()
    targets = fwd(torch.randn(6, 2, 5, dtype=torch.float64))  # reachable targets
    res = invert(targets, fwd, InversionSettings(steps=300, lr=0.05))
    assert res.loss_curve.shape == (300,)
    assert res.loss_curve[-1] < 0.2 * res.loss_curve[0]
    assert res.final_cosine.min() > 0.95
    torch.testing.assert_close(res.features.norm(dim=-1), torch.ones(6, dtype=torch.float64))


def test_zero_steps_returns_the_initial_tokens():
    fwd = TanhForward()
    res = invert(torch.randn(3, 4, dtype=torch.float64), fwd, InversionSettings(steps=0, seed=4))
    init = initial_tokens([0, 1, 2], 2, 5, seed=4, std=0.02, dtype=torch.float64)
    assert torch.equal(res.tokens, init) and res.loss_curve.shape == (0,)


def test_the_head_is_applied_and_gets_no_gradient():
    head = torch.nn.Linear(4, 3).double()
    fwd = ProjectedForward(TanhForward(), head, head_name="lin")
    res = invert(torch.randn(2, 3, dtype=torch.float64), fwd, InversionSettings(steps=3))
    assert res.features.shape == (2, 3)
    assert head.weight.grad is None
    assert fwd.identity() == {"kind": "tanh", "head": "lin"}


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"steps": -1}, "steps"), ({"lr": 0.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay"),
     ({"batch_size": 0}, "batch_size"), ({"init_std": -0.1}, "init_std"),
     ({"betas": (0.9, 1.0)}, "betas")],
)
def test_bad_settings_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        InversionSettings(**kwargs)


def test_bad_inputs_name_the_argument():
    fwd = TanhForward()
    with pytest.raises(ValueError, match="targets"):
        invert(torch.randn(4), fwd)
    with pytest.raises(ValueError, match="targets"):
        invert(torch.zeros(2, 4, dtype=torch.long), fwd)
    with pytest.raises(ValueError, match="keys"):
        invert(torch.randn(2, 4, dtype=torch.float64), fwd, keys=["a"])
    with pytest.raises(ValueError, match="forward"):
        invert(torch.randn(2, 4), object())  # type: ignore[arg-type]


class ClosureForward:
    """A tower reached only through a closure (as the CNN stage forward holds it)."""

    modality = "image"
    num_tokens = 2
    token_dim = 5

    def __init__(self) -> None:
        torch.manual_seed(5)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 16), torch.nn.GELU(),
                                  torch.nn.Linear(16, 4)).double()
        self.seen: list[bool] = []

        def rest(x: torch.Tensor) -> torch.Tensor:
            self.seen.append(any(p.requires_grad for p in net.parameters()))
            return net(x)

        self.rest = rest
        self.net_for_test = net

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rest(tokens)

    def identity(self) -> dict:
        return {"kind": "closure"}


def test_tower_weights_are_frozen_while_inverting_and_restored_after():
    fwd = ClosureForward()
    head = torch.nn.Linear(4, 3).double()
    head.bias.requires_grad_(False)  # a caller's own frozen parameter stays frozen
    targets = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = InversionSettings(steps=20, lr=2e-2, seed=2, batch_size=2)
    res = invert(targets, ProjectedForward(fwd, head), s, keys=[0, 1, 2])
    assert fwd.seen and not any(fwd.seen)
    assert all(p.requires_grad for p in fwd.net_for_test.parameters())
    assert head.weight.requires_grad and not head.bias.requires_grad
    # Same tokens as the step-by-step AdamW loop, run with the weights requiring grad.
    init = initial_tokens([0, 1, 2], 2, 5, seed=2, std=0.02, dtype=torch.float64)
    for i in range(3):
        ref = naive_adamw_inversion(targets[i], lambda t: head(fwd(t)), init[i], s)
        torch.testing.assert_close(res.tokens[i], ref, rtol=0, atol=1e-10)


def test_weights_are_restored_when_the_forward_fails():
    class BoomError(RuntimeError):
        pass

    class Failing(ClosureForward):
        def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
            super().__call__(tokens)
            raise BoomError

    fwd = Failing()
    with pytest.raises(BoomError):
        invert(torch.randn(2, 4, dtype=torch.float64), fwd, InversionSettings(steps=2))
    assert fwd.seen == [False]  # frozen during the call
    assert all(p.requires_grad for p in fwd.net_for_test.parameters())


class TransposedForward(TanhForward):
    """Reads the tokens transposed, so autograd hands back a non-contiguous gradient."""

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(tokens.transpose(1, 2).contiguous().flatten(1) @ self.w1) @ self.w2


def test_a_gradient_in_another_layout_updates_the_right_entries():
    fwd = TransposedForward()
    probe = torch.zeros(1, 2, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fwd(probe).sum(), [probe])
    assert not grad.is_contiguous()  # the case the optimiser step must handle
    targets = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    s = InversionSettings(steps=15, lr=2e-2, seed=1, batch_size=3)
    res = invert(targets, fwd, s)
    init = initial_tokens([0, 1, 2], 2, 5, seed=1, std=0.02, dtype=torch.float64)
    for i in range(3):
        ref = naive_adamw_inversion(targets[i], fwd, init[i], s)
        torch.testing.assert_close(res.tokens[i], ref, rtol=0, atol=1e-10)
