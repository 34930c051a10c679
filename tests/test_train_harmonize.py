"""Cross-modality gradient harmonization: the projection and curriculum against a per-sample
loop, the harmonized backward equal to plain training when nothing fires, and a three-modality
run reporting how often it fired."""

from __future__ import annotations

import pytest
import torch

from modalign.errors import ModalignError
from modalign.io import read_jsonl
from modalign.train.loop import Trainer
from modalign.train.recipes.harmonize import HarmonizeConfig, harmonize_gradients, threshold_at
from train_support import assert_resumes_bitwise, small_config, synthetic_store

THREE = [{"loss": "clip", "modalities": ["text", "image"]},
         {"loss": "clip", "modalities": ["text", "audio"]}]


def test_projection_and_curriculum_match_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    gp, gq = torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(
        32, 5, generator=g, dtype=torch.float64)
    grads = {"p": {"t": gp, "x": torch.ones(32, 2, dtype=torch.float64)}, "q": {"t": gq}}
    out, stats = harmonize_gradients(grads, {"t": [("p", "q")]}, drop_below=-0.5)
    fired = dropped = 0
    for i in range(32):
        a, b = gp[i], gq[i]
        dot = float(a @ b)
        cos = dot / float(a.norm() * b.norm())
        ea, eb = a.clone(), b.clone()
        if dot < 0:
            fired += 1
            ea, eb = a - dot / float(b @ b) * b, b - dot / float(a @ a) * a
            assert float(ea @ b) == pytest.approx(0.0, abs=1e-12)  # no conflict left
        if cos < -0.5:
            dropped += 1
            ea, eb = torch.zeros_like(a), torch.zeros_like(b)
            assert out["p"]["x"][i].abs().sum() == 0  # every key's rows of the sample
        else:
            assert out["p"]["x"][i].tolist() == [1.0, 1.0]
        torch.testing.assert_close(out["p"]["t"][i], ea, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["q"]["t"][i], eb, rtol=1e-12, atol=1e-12)
    assert stats == {"fired": fired, "pairs": 32, "dropped": dropped, "samples": 32}
    assert 0 < dropped < fired < 32
    cfg = HarmonizeConfig(enabled=True, drop_below=0.2, curriculum_steps=10)
    assert [threshold_at(cfg, s) for s in (0, 5, 10, 20)] == pytest.approx([0.2, -0.4, -1, -1])


def test_harmonized_backward_equals_plain_training_when_nothing_is_changed(tmp_path):
    synthetic_store(tmp_path / "store", audio_dim=5)
    common = {"data": {"keys": ["image", "text", "audio"]}, "objectives": THREE,
              "train": {"epochs": 1, "num_threads": 1}}
    plain = Trainer(small_config(tmp_path / "store", tmp_path / "a", **common))
    off = Trainer(small_config(tmp_path / "store", tmp_path / "b", **common,
                               harmonize={"enabled": True, "project": False}))
    for step in range(3):
        plain.train_step(0, step)
        off.train_step(0, step)
    for (name, p), q in zip(plain.model.named_parameters(), off.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(off.logit_scales(), plain.logit_scales())
    assert off.harmonize is not None and int(off.harmonize.pairs) == 3 * 8


def test_three_modalities_train_and_report_how_often_it_fired(tmp_path):
    synthetic_store(tmp_path / "store", audio_dim=5)
    # trained, then stopped at step 3 and resumed: weights and counts end bit for bit the same
    weights = assert_resumes_bitwise(
        lambda run: small_config(tmp_path / "store", run,
                                 data={"keys": ["image", "text", "audio"]}, objectives=THREE,
                                 harmonize={"enabled": True, "drop_below": 0.0,
                                            "curriculum_steps": 4},
                                 train={"epochs": 2, "num_threads": 1, "checkpoint_every": 1,
                                        "keep_checkpoints": 9}), tmp_path, stop_at=3)
    assert int(weights["harmonize"]["pairs"]) > 0
    rows = read_jsonl(tmp_path / "full" / "log.jsonl")
    rates = [r["harmonize"] for r in rows]
    # the last epoch's row holds the run's shares: the saved counts divided out
    h = {k: int(v) for k, v in weights["harmonize"].items()}
    assert len(rates) == 2 and rates[-1] == pytest.approx(
        {"fired": h["fired"] / h["pairs"], "dropped": h["dropped"] / h["samples"]}, abs=1e-12)
    assert rates[-1]["fired"] > 0
    with pytest.raises(ModalignError, match="two or more pairwise objective terms"):
        Trainer(small_config(tmp_path / "store", tmp_path / "r2",
                             harmonize={"enabled": True}))
    with pytest.raises(ModalignError, match=r"harmonize.drop_below must be in \[-1, 1\]"):
        small_config(tmp_path / "store", tmp_path / "r3",
                     harmonize={"enabled": True, "drop_below": 2.0})
    with pytest.raises(ModalignError, match="cannot be combined"):
        small_config(tmp_path / "store", tmp_path / "r4", harmonize={"enabled": True},
                     negatives={"k": 2})
