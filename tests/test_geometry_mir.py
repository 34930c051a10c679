"""MIR: exact sqrtm (vs a float64 eigen reference), Fréchet closed forms, invariances, outliers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modalign.geometry.mir import (
    frechet_distance,
    frechet_distance_from_moments,
    modality_integration_rate,
    replace_norm_outliers,
    sqrtm_psd,
    trace_sqrt_product,
)


def _spd(d: int, seed: int) -> torch.Tensor:
    a = torch.as_tensor(np.random.default_rng(seed).normal(size=(d, d)))
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def reference_sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal square root of a diagonalisable matrix with positive eigenvalues (float64)."""
    vals, vecs = np.linalg.eig(a)
    return np.real(vecs @ np.diag(np.sqrt(vals.astype(complex))) @ np.linalg.inv(vecs))


def official_fast_sqrtm(a: np.ndarray, iters: int = 5) -> np.ndarray:
    """The reference code's default "fast" iteration: Y = (Y + Z^-1 A)/2, Z = (Z + Y^-1 A)/2.

    Started at Y = A, Z = I it sits on a fixed point (an unstable one: in floating point, many
    iterations drift away from it, never towards the square root).
    """
    y, z = a.copy(), np.eye(len(a))
    for _ in range(iters):
        y = 0.5 * (y + np.linalg.inv(z) @ a)
        z = 0.5 * (z + np.linalg.inv(y) @ a)
    return y


def test_sqrtm_psd_squares_back():
    a = _spd(6, 0)
    r = sqrtm_psd(a)
    torch.testing.assert_close(r @ r, a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r, r.T)


def test_trace_sqrt_product_matches_eigen_reference_and_is_not_the_fast_mode_bug():
    s1, s2 = _spd(5, 1), _spd(5, 2)
    prod = (s1 @ s2).numpy()
    ours = trace_sqrt_product(s1, s2)
    assert ours == pytest.approx(np.trace(reference_sqrtm(prod)), rel=1e-9)
    # the product's eigenvalues: trace of the root is the sum of their square roots
    assert ours == pytest.approx(np.sqrt(np.linalg.eigvals(prod).real).sum(), rel=1e-9)
    fast = official_fast_sqrtm(prod)
    np.testing.assert_allclose(fast, prod, rtol=1e-6)  # the fast mode returns its input
    assert abs(ours - np.trace(fast)) > 0.1 * abs(ours)


def test_frechet_identical_and_diagonal_closed_form():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    sd1, sd2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    value = frechet_distance_from_moments(mu1.double(), torch.diag(sd1**2).double(),
                                          mu2.double(), torch.diag(sd2**2).double())
    expected = float(((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum())
    assert value == pytest.approx(expected, rel=1e-12)


def test_frechet_invariant_to_shared_rotation_and_translation():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 5)), rng.normal(size=(250, 5)) * 1.5 + 0.3
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    shift = rng.normal(size=5)
    assert frechet_distance(x @ q + shift, y @ q + shift) == pytest.approx(
        frechet_distance(x, y), rel=1e-9)


def test_mir_scale_invariance_log10_and_identical_sets():
    rng = np.random.default_rng(5)
    v, t = rng.normal(size=(400, 6)) + 0.5, rng.normal(size=(300, 6)) * 2
    r = modality_integration_rate([v, v * 0.5], [t, t * 0.5])
    assert r.mir == pytest.approx(math.log10(sum(r.fid_per_layer)))
    r2 = modality_integration_rate([7 * v, 3.5 * v], [7 * t, 3.5 * t])
    assert r2.mir == pytest.approx(r.mir, rel=1e-10)
    same = modality_integration_rate([v], [v], replace_outliers=False)
    assert same.fid_per_layer[0] == pytest.approx(0.0, abs=1e-9)


def test_mir_without_outliers_equals_fid_of_text_scaled_sets():
    rng = np.random.default_rng(6)
    v, t = rng.normal(size=(200, 3)), rng.normal(size=(200, 3)) + 1
    alpha = 1.0 / np.linalg.norm(t, axis=1).mean()
    r = modality_integration_rate([v], [t], replace_outliers=False)
    assert r.fid_per_layer[0] == pytest.approx(frechet_distance(v * alpha, t * alpha), rel=1e-10)


def test_outlier_replacement_changes_only_outlier_rows():
    rng = np.random.default_rng(7)
    x = torch.as_tensor(rng.normal(size=(200, 4)))
    x[[5, 77]] *= 40
    new, mask = replace_norm_outliers(x)
    assert mask.nonzero().flatten().tolist() == [5, 77]
    torch.testing.assert_close(new[~mask], x[~mask])
    torch.testing.assert_close(new[5], x.median(dim=0).values)


def test_mir_bad_input():
    with pytest.raises(ValueError, match="same non-zero number of layers"):
        modality_integration_rate([np.ones((3, 2))], [])
    with pytest.raises(ValueError, match="mean norm"):
        modality_integration_rate([np.ones((3, 2))], [np.zeros((3, 2))])
    with pytest.raises(ValueError, match="square"):
        sqrtm_psd(torch.ones(2, 3))
