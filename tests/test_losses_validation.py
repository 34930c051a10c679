"""The shared input checks: each names the argument; validation can be switched off."""

from __future__ import annotations

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
