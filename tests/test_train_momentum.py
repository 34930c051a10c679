"""ALBEF momentum distillation: the loss against a naive float64 reference, the EMA and queue
updates, training from the config and bitwise resume (the distributed check is in
``test_train_recipes_distributed.py``)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from modalign.errors import ModalignError
from modalign.io import write_json_atomic
from modalign.train.checkpoint import load_checkpoint
from modalign.train.loop import Trainer, check_resume, train
from modalign.train.recipes.momentum import (
    MomentumConfig,
    MomentumDistillation,
    alpha_at,
    soft_target_loss,
)
from train_support import small_config, synthetic_store


def _naive_loss(z, m, keys, offset, scale, alpha):
    """Row by row with Python sums: -sum_j y_ij log p_ij, y = alpha q + (1 - alpha) onehot."""
    total = 0.0
    for i in range(z.shape[0]):
        logits = [scale * float(z[i] @ keys[j]) for j in range(keys.shape[0])]
        mlogits = [scale * float(m[i] @ keys[j]) for j in range(keys.shape[0])]
        lse = math.log(sum(math.exp(v) for v in logits))
        mse = math.log(sum(math.exp(v) for v in mlogits))
        for j in range(keys.shape[0]):
            y = alpha * math.exp(mlogits[j] - mse) + (1 - alpha) * (j == offset + i)
            total -= y * (logits[j] - lse)
    return total / z.shape[0]


def test_soft_target_loss_matches_the_naive_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)

    def unit(*s):
        return nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)

    z, m, keys = unit(4, 5), unit(4, 5), unit(11, 5)
    z.requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    for alpha in (0.0, 0.4, 1.0):
        got = soft_target_loss(z, m, keys, 3, scale, alpha)
        assert got.item() == pytest.approx(_naive_loss(z.detach(), m, keys, 3, 7.0, alpha),
                                           rel=1e-12)
    # gradients (z and the scale; the targets carry none) against autograd of a dense rewrite
    got = soft_target_loss(z, m, keys, 3, scale, 0.4)
    gz, gs = torch.autograd.grad(got, (z, scale))
    onehot = torch.zeros(4, 11, dtype=torch.float64)
    onehot[range(4), range(3, 7)] = 1.0
    y = 0.4 * torch.softmax(7.0 * m @ keys.T, 1) + 0.6 * onehot
    ref = -(y * torch.log_softmax(scale * z @ keys.T, 1)).sum(1).mean()
    rz, rs = torch.autograd.grad(ref, (z, scale))
    torch.testing.assert_close(gz, rz, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gs, rs, rtol=1e-12, atol=1e-14)
    # the targets do not depend on z: finite differences agree with the analytic gradient
    assert torch.autograd.gradcheck(lambda zz: soft_target_loss(zz, m, keys, 3, scale, 0.4), (z,))


def test_ema_update_queues_and_the_alpha_ramp():
    student = nn.Linear(3, 2, dtype=torch.float64)
    student.bias.requires_grad_(False)  # frozen parameters are not averaged
    cfg = MomentumConfig(decay=0.9, queue_size=5)
    rec = MomentumDistillation(student, ["a", "b"], 2, cfg).double()
    before = rec.ema.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
        student.bias.add_(1.0)
    rec.update(student)
    torch.testing.assert_close(rec.ema.weight, 0.9 * before + 0.1 * student.weight.detach())
    assert not torch.equal(rec.ema.bias, student.bias)
    # queue: three steps of 2 rows each wrap around a queue of 5, oldest rows out
    seen = []
    for step in range(3):
        batch = {k: torch.full((2, 2), 10.0 * step + i, dtype=torch.float64)
                 for i, k in enumerate("ab")}
        rec.begin_step(student, lambda _m, b=batch: b)
        loss = rec.loss({k: v.clone() for k, v in batch.items()}, 0.5)
        assert loss.isfinite()
        rec.enqueue()
        seen.append(int(rec.filled))
    assert seen == [2, 4, 5]
    assert int(rec.ptr) == 1
    # step 0 -> rows 0-1, step 1 -> rows 2-3, step 2 -> rows 4 and 0 (overwriting step 0's)
    assert rec.queue[0, :, 0].tolist() == [20.0, 0.0, 10.0, 10.0, 20.0]
    assert rec.queue[1, :, 0].tolist() == [21.0, 1.0, 11.0, 11.0, 21.0]
    cfg = MomentumConfig(decay=0.99, alpha=0.4, alpha_ramp_steps=-1)
    assert [alpha_at(cfg, s, 4) for s in (0, 2, 4, 9)] == [0.0, 0.2, 0.4, 0.4]
    assert alpha_at(MomentumConfig(decay=0.99, alpha_ramp_steps=0), 0, 4) == 0.4


def test_config_keys_are_checked(tmp_path):
    with pytest.raises(ModalignError, match=r"momentum.queue_size=4 must be 0 or at least"):
        small_config(tmp_path, tmp_path, momentum={"decay": 0.99, "queue_size": 4})
    with pytest.raises(ModalignError, match=r"momentum.decay must be in \[0, 1\)"):
        small_config(tmp_path, tmp_path, momentum={"decay": 1.0})
    with pytest.raises(ModalignError, match=r"momentum.alpha must be in"):
        small_config(tmp_path, tmp_path, momentum={"decay": 0.9, "alpha": 2})
    with pytest.raises(ModalignError, match=r"\[momentum\] has unknown keys \['queue'\]"):
        small_config(tmp_path, tmp_path, momentum={"queue": 3})


def test_trains_from_the_config_and_resumes_bitwise(tmp_path):
    synthetic_store(tmp_path / "store")
    mom = {"decay": 0.9, "queue_size": 16, "alpha": 0.4}
    common = {"epochs": 3, "num_threads": 1, "checkpoint_every": 5, "keep_checkpoints": 9}
    full = small_config(tmp_path / "store", tmp_path / "full", momentum=mom, train=common)
    result = train(full)
    assert result.summary["steps"] == 12
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoints")
    w = ckpt.weights["momentum"]
    assert int(w["filled"]) == 16 and int(w["ptr"]) == (12 * 8) % 16
    # the EMA copy moved away from its initialisation and differs from the student
    head = next(k for k in ckpt.weights["model"] if k.endswith("weight") and "head" in k)
    assert not torch.equal(w[f"ema.{head}"], ckpt.weights["model"][head])
    # the same run stopped after its step-5 checkpoint (later ones removed), then resumed:
    # the same weights, queues and EMA, bit for bit
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    root = tmp_path / "part" / "checkpoints"
    for later in root.glob("ckpt-*"):
        if int(later.name.split("-")[1]) > 5:
            shutil.rmtree(later)
    write_json_atomic(root / "latest.json", {"checkpoint": "ckpt-000000005", "step": 5})
    train(small_config(tmp_path / "store", tmp_path / "part", momentum=mom,
                       train={**common}), resume=True)
    other = load_checkpoint(root)
    assert other.step == 12
    for module in ("model", "objective", "momentum"):
        for k, v in ckpt.weights[module].items():
            assert torch.equal(other.weights[module][k], v), f"{module}.{k}"


def test_three_keys_use_every_ordered_pair(tmp_path):
    synthetic_store(tmp_path / "store", audio_dim=5)
    cfg = small_config(tmp_path / "store", tmp_path / "run",
                       data={"keys": ["image", "text", "audio"]},
                       momentum={"decay": 0.9, "queue_size": 8},
                       train={"epochs": 1, "num_threads": 1})
    trainer = Trainer(cfg)
    logged = trainer.train_step(0, 0)
    assert math.isfinite(logged["momentum"]) and logged["momentum"] > 0
    assert trainer.momentum is not None and int(trainer.momentum.filled) == 8


def test_a_run_from_before_the_recipe_sections_still_resumes(tmp_path):
    synthetic_store(tmp_path / "store")
    cfg = small_config(tmp_path / "store", tmp_path / "run",
                       train={"epochs": 1, "num_threads": 1})
    train(cfg)
    resolved = tmp_path / "run" / "config.resolved.json"
    data = json.loads(resolved.read_text())
    for section in ("momentum", "distill", "negatives", "harmonize"):
        del data["config"][section]
    resolved.write_text(json.dumps(data))
    check_resume(tmp_path / "run", cfg)  # no refusal: missing sections are their defaults
    on = small_config(tmp_path / "store", tmp_path / "run", momentum={"decay": 0.9},
                      train={"epochs": 1, "num_threads": 1})
    with pytest.raises(ModalignError, match=r"momentum.decay: 0.0 -> 0.9"):
        check_resume(tmp_path / "run", on)
