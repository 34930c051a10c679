"""CLSR (contrastive latent space reconstruction) as the objective ``loss = "clsr"``: the loss
against a naive float64 reference (values and gradients), its reduction to CLIP, and training
from the config with bitwise resume."""

from __future__ import annotations

import math

import pytest
import torch

from modalign.errors import ModalignError
from modalign.losses.clip import clip_loss
from modalign.train.recipes.clsr import CLSRLoss, separability_terms
from train_support import assert_resumes_bitwise, small_config, synthetic_store


def _naive_side(q, other, s, lam):
    """Row by row: -log exp(s q_i.o_i) / (sum_j exp(s q_i.o_j) + lam sum_{j!=i} exp(s q_i.q_j))."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = s * float(q[i] @ other[i])
        den = sum(math.exp(s * float(q[i] @ other[j])) for j in range(q.shape[0]))
        den += lam * sum(math.exp(s * float(q[i] @ q[j])) for j in range(q.shape[0]) if j != i)
        total += -(pos - math.log(den))
    return total / q.shape[0]


def test_clsr_matches_the_naive_reference_and_reduces_to_clip():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    s = torch.tensor(4.0, dtype=torch.float64)
    la, lb = separability_terms(x, y, s, 0.5)
    assert float(la) == pytest.approx(_naive_side(x, y, 4.0, 0.5), rel=1e-12)
    assert float(lb) == pytest.approx(_naive_side(y, x, 4.0, 0.5), rel=1e-12)
    xx = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: sum(separability_terms(a, y, s, 0.5)), (xx,))
    # without intra-modal negatives the separability term is the CLIP loss
    la0, lb0 = separability_terms(x, y, s, 0.0)
    assert float((la0 + lb0) / 2) == pytest.approx(float(clip_loss(x, y, s).loss), rel=1e-12)

    loss = CLSRLoss(["audio", "text"], dim=5, hidden_dim=7, intra_weight=0.5,
                    rec_weight=0.3).double()
    with torch.no_grad():
        loss.log_logit_scale.fill_(math.log(4.0))
    out = loss({"audio": x * 3, "text": y})  # the loss normalises its inputs
    with torch.no_grad():
        rec = sum(float(((loss.reconstruct["a_to_b"](x[i]) - y[i]) ** 2).sum()
                        + ((loss.reconstruct["b_to_a"](y[i]) - x[i]) ** 2).sum())
                  for i in range(6)) / 6
    assert float(out.parts["reconstruction"].detach()) == pytest.approx(rec, rel=1e-12)
    assert float(out.loss.detach()) == pytest.approx(
        (_naive_side(x, y, 4.0, 0.5) + _naive_side(y, x, 4.0, 0.5)) / 2 + 0.3 * rec, rel=1e-12)
    with torch.no_grad():  # the adaptive temperature stays in its bounds
        loss.log_logit_scale.fill_(9.0)
    loss.clamp_()
    assert float(loss.logit_scale().detach()) == pytest.approx(100.0)
    with pytest.raises(ModalignError, match="intra_weight"):
        CLSRLoss(["audio", "text"], dim=5, intra_weight=-1)


def test_clsr_trains_from_the_config_and_resumes_bitwise(tmp_path):
    synthetic_store(tmp_path / "store")

    def make(run):
        return small_config(tmp_path / "store", run,
                            objectives=[{"loss": "clsr", "modalities": ["image", "text"],
                                         "intra_weight": 0.5, "rec_weight": 0.5}],
                            train={"epochs": 2, "num_threads": 1, "checkpoint_every": 1,
                                   "keep_checkpoints": 9})

    weights = assert_resumes_bitwise(make, tmp_path, stop_at=3)
    # the reconstruction networks (joint_dim 8 in and out) are trained and saved
    w = next(v for k, v in weights["objective"].items() if k.endswith("a_to_b.0.weight"))
    assert w.shape[1] == 8
    with pytest.raises(ModalignError, match="unknown parameters"):
        small_config(tmp_path / "store", tmp_path / "x",
                     objectives=[{"loss": "clsr", "modalities": ["image", "text"],
                                  "intra": 0.5}])
