"""The shared input checks: each names the argument; validation can be switched off."""

from __future__ import annotations

import re

import pytest
import torch

from modalign.losses.validation import (
    check_embedding,
    check_finite_scalar,
    check_groups,
    check_modalities,
    check_pair,
    check_positive,
    set_validation,
    validation,
    validation_enabled,
)


@pytest.mark.parametrize(
    ("tensor", "normalize", "needle"),
    [
        ([[1.0, 2.0]], False, "image must be a torch.Tensor"),
        (torch.ones(3), False, "image must have shape (batch, dim)"),
        (torch.ones(3, 2, dtype=torch.long), False, "image must be a floating-point tensor"),
        (torch.ones(3, 0), False, "image has dim 0"),
        (torch.ones(0, 4), False, "image is an empty batch"),
        (torch.tensor([[1.0, float("nan")]]), False, "image contains NaN or inf (first in row 0)"),
        (torch.tensor([[1.0, 1.0], [float("-inf"), 0.0]]), False, "first in row 1"),
        (torch.tensor([[1.0, 1.0], [0.0, 0.0]]), True, "image has a row of zero norm (row 1)"),
    ],
)
def test_check_embedding(tensor, normalize, needle):
    with pytest.raises(ValueError) as err:
        check_embedding("image", tensor, normalize=normalize)
    assert needle in str(err.value)


@pytest.mark.parametrize("normalize", [False, True])
def test_finiteness_from_one_reduction_names_the_row_and_passes_an_overflowing_sum(normalize):
    # The sum (or a row norm) of finite float32 values overflows: the entries are checked one
    # by one and pass; NaN or inf anywhere still raises, naming its row.
    big = torch.full((3, 4), 3e38)
    assert not torch.isfinite(big.sum()) and not torch.isfinite(torch.linalg.norm(big, dim=1)).all()
    norms = check_embedding("image", big, normalize=normalize)
    assert (norms is None) == (not normalize)
    for value, row in ((float("nan"), 2), (float("inf"), 0), (float("-inf"), 1)):
        bad = big.clone()
        bad[row, 3] = value
        with pytest.raises(ValueError, match=f"image contains NaN or inf \\(first in row {row}\\)"):
            check_embedding("image", bad, normalize=normalize)


def test_check_embedding_returns_the_row_norms_it_checked():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    norms = check_embedding("x", x, normalize=True)
    assert torch.equal(norms, torch.tensor([5.0, 2.0], dtype=torch.float64))
    assert check_embedding("x", x, normalize=False) is None
    with validation(False):
        assert check_embedding("x", x, normalize=True) is None


def test_check_embedding_accepts_good_input_and_empty_when_allowed():
    check_embedding("image", torch.randn(3, 2), normalize=True)
    check_embedding("image", torch.zeros(3, 2), normalize=False)
    check_embedding("image", torch.ones(0, 4), normalize=True, allow_empty=True)


def test_check_pair():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    check_pair(["a", "b"], [a, b])
    with pytest.raises(ValueError, match="b has batch size 2 but a has 3"):
        check_pair(["a", "b"], [a, torch.randn(2, 4)])
    with pytest.raises(ValueError, match="b has dim 5 but a has 4"):
        check_pair(["a", "b"], [a, torch.randn(3, 5)])
    check_pair(["a", "b"], [a, torch.randn(2, 4)], same_batch=False)
    with pytest.raises(ValueError, match=r"b has dtype torch\.float64"):
        check_pair(["a", "b"], [a, b.double()])


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), torch.tensor(0.0)])
def test_check_positive(value):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        check_positive("temperature", value)


def test_check_scalars_accept_good_values_and_reject_shapes():
    check_positive("t", 0.5)
    check_positive("t", torch.tensor(2.0, requires_grad=True))
    check_finite_scalar("bias", -10)
    with pytest.raises(ValueError, match="bias must be a finite number"):
        check_finite_scalar("bias", float("nan"))
    with pytest.raises(ValueError, match="t must be a scalar"):
        check_positive("t", torch.ones(2))
    with pytest.raises(ValueError, match="t must be a number"):
        check_positive("t", "hot")


def test_check_groups():
    check_groups("groups", torch.tensor([0, 1, 1]), 3)
    with pytest.raises(ValueError, match=r"groups must have shape \(3,\)"):
        check_groups("groups", torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="groups must hold integer group ids"):
        check_groups("groups", torch.tensor([0.0, 1.0, 1.0]), 3)
    with pytest.raises(ValueError, match=r"groups must be an integer torch\.Tensor"):
        check_groups("groups", [0, 1, 1], 3)


def test_check_modalities_is_always_on():
    missing = r"embeddings is missing modalities \['text'\]"
    with validation(False), pytest.raises(ValueError, match=missing):
        check_modalities("embeddings", {"image": torch.ones(1, 1)}, ["image", "text"])


def test_switching_validation_off_and_back():
    assert validation_enabled()
    with validation(False):
        assert not validation_enabled()
        check_embedding("image", torch.zeros(0, 3), normalize=True)
        check_positive("t", -1.0)
    assert validation_enabled()
    set_validation(False)
    try:
        check_groups("groups", torch.tensor([0]), 5)
    finally:
        set_validation(True)
    with pytest.raises(ValueError):
        check_positive("t", -1.0)


def _value_check_cases():
    """(loss, good call, bad call, message) for the losses whose input checks read tensor values
    (index ranges, mixing weights): a host synchronisation on an accelerator."""
    from modalign.losses.geodesic_mixup import m2mix_loss
    from modalign.losses.isogclr import ISogCLRLoss
    from modalign.losses.m3col import m3col_loss
    from modalign.losses.one_to_k import one_to_k_loss

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    emb = {"image": x, "text": y}
    iso = ISogCLRLoss(["image", "text"], dataset_size=10).eval()  # no state update
    perm = torch.tensor([1, 0, 3, 2])
    return {
        "isogclr": (lambda: iso(emb, indices=torch.tensor([0, 1, 2, 3])),
                    lambda: iso(emb, indices=torch.tensor([0, 1, 2, 10])),
                    "indices must lie in [0, 10) (dataset_size)"),
        "m3col": (lambda: m3col_loss(x, y, 10.0, perm, torch.full((4,), 0.7)),
                  lambda: m3col_loss(x, y, 10.0, perm, torch.full((4,), 1.5)),
                  "mix_weights must lie in [0, 1]"),
        "m2mix": (lambda: m2mix_loss(x, y, 10.0, torch.full((4,), 0.3)),
                  lambda: m2mix_loss(x, y, 10.0, torch.full((4,), -0.1)),
                  "lam must lie in [0, 1]"),
        "one_to_k": (lambda: one_to_k_loss(x[:2], y, torch.tensor([0, 0, 1, 1]), 10.0),
                     lambda: one_to_k_loss(x[:2], y, torch.tensor([0, 0, 1, 2]), 10.0),
                     "anchor_rows must hold anchor rows in [0, 2)"),
    }


@pytest.mark.parametrize("name", ["isogclr", "m3col", "m2mix", "one_to_k"])
def test_value_checks_raise_on_the_first_call_and_read_nothing_when_validation_is_off(
        name, monkeypatch):
    good, bad, message = _value_check_cases()[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        bad()  # validation is on by default: the very first call checks
    reference = good().loss

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    # The trainer runs the forward with validation off between its scheduled checks: then no
    # check reads a tensor value (bool/int/float/item: a device synchronisation on a GPU).
    for method in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    with validation(False):
        unchecked = good().loss
    monkeypatch.undo()
    assert torch.equal(unchecked, reference)
