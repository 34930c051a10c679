"""Contrastive distillation from a teacher (DCD): the loss against a naive float64 reference, the
entropy weights, a smaller student trained from a saved teacher, and the bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modalign.errors import ModalignError
from modalign.train.loop import Trainer, train
from modalign.train.recipes.distill import dcd_loss, entropy_weights
from train_support import assert_resumes_bitwise, small_config, synthetic_store


def _naive(y, t, offset, alpha, T):
    """Row by row: entropy weights of softmax(t), MSE of logits / T, weighted cross-entropy."""
    n, k = y.shape
    ents = []
    for i in range(n):
        z = sum(math.exp(v) for v in t[i].tolist())
        p = [math.exp(v) / z for v in t[i].tolist()]
        ents.append(-sum(q * math.log(q) for q in p))
    mse = sum((float(t[i, j]) / T - float(y[i, j]) / T) ** 2 for i in range(n) for j in range(k))
    ce = 0.0
    for i in range(n):
        lse = math.log(sum(math.exp(v) for v in y[i].tolist()))
        ce += ents[i] / sum(ents) * (lse - float(y[i, offset + i]))
    return alpha * T * T * mse / (n * k) + (1 - alpha) * ce


def test_dcd_loss_matches_the_naive_reference_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    y = (3 * torch.randn(3, 7, generator=g, dtype=torch.float64)).requires_grad_()
    t = 5 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    for alpha, T in ((0.2, 1.0), (0.0, 2.0), (1.0, 0.5)):
        got = dcd_loss(y, t, 2, entropy_weights(t), alpha, T)
        assert got.item() == pytest.approx(_naive(y.detach(), t, 2, alpha, T), rel=1e-12)
    assert torch.autograd.gradcheck(lambda yy: dcd_loss(yy, t, 2, entropy_weights(t), 0.2, 2.0),
                                    (y,))
    # a uniform teacher weighs every sample 1/B; a teacher equal to the student: no MSE term
    assert torch.allclose(entropy_weights(torch.zeros(4, 5)), torch.full((4,), 0.25))
    same = dcd_loss(t, t, 0, entropy_weights(t), 1.0, 1.0)
    assert same.item() == 0.0
    ce = dcd_loss(t, t, 0, entropy_weights(t), 0.0, 1.0)
    w = entropy_weights(t)
    ref = (w * F.cross_entropy(t, torch.arange(3), reduction="none")).sum()
    assert ce.item() == pytest.approx(ref.item(), rel=1e-12)


def _teacher(tmp_path):
    synthetic_store(tmp_path / "store")
    cfg = small_config(tmp_path / "store", tmp_path / "teacher",
                       model={"head": "mlp", "hidden_dim": 32, "joint_dim": 16},
                       train={"epochs": 3, "num_threads": 1})
    return train(cfg).model_dir


def test_a_smaller_student_trains_from_a_saved_teacher(tmp_path):
    teacher = _teacher(tmp_path)
    cfg = small_config(tmp_path / "store", tmp_path / "student", model={"joint_dim": 4},
                       distill={"teacher": str(teacher), "alpha": 0.5},
                       train={"epochs": 2, "num_threads": 1})
    trainer = Trainer(cfg)
    first = trainer.train_step(0, 0)
    assert math.isfinite(first["distill"]) and first["distill"] > 0
    # the teacher is frozen and not trained: its weights do not move
    before = {k: v.clone() for k, v in trainer.distill.teacher.state_dict().items()}
    trainer.train_step(0, 1)
    after = trainer.distill.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    result = trainer.run()
    assert result.summary["steps"] == 8
    assert trainer.model.config.joint_dim == 4
    # stopped at step 3 and resumed: the student and its logit scale end bit for bit the same
    weights = assert_resumes_bitwise(
        lambda run: small_config(tmp_path / "store", run, model={"joint_dim": 4},
                                 distill={"teacher": str(teacher), "alpha": 0.5},
                                 train={"epochs": 2, "num_threads": 1, "checkpoint_every": 1,
                                        "keep_checkpoints": 9}), tmp_path / "resume", stop_at=3)
    assert "log_logit_scale" in weights["distill"]


def test_bad_teachers_are_refused_naming_the_key(tmp_path):
    synthetic_store(tmp_path / "store")
    with pytest.raises(ModalignError, match=r"distill.teacher='.*nowhere'.*does not exist"):
        Trainer(small_config(tmp_path / "store", tmp_path / "r1",
                             distill={"teacher": str(tmp_path / "nowhere")}))
    synthetic_store(tmp_path / "other", image_dim=5)
    other = train(small_config(tmp_path / "other", tmp_path / "t",
                               train={"epochs": 1, "num_threads": 1})).model_dir
    with pytest.raises(ModalignError, match="reads image features of size 5; the training data "
                                            "has 12"):
        Trainer(small_config(tmp_path / "store", tmp_path / "r2",
                             distill={"teacher": str(other)}))
    with pytest.raises(ModalignError, match=r"distill.alpha must be in \[0, 1\]"):
        small_config(tmp_path / "store", tmp_path / "r3", distill={"teacher": "x", "alpha": -1})
