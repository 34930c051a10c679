"""The trainer asks the losses: the model holds the objective's first temperature itself (no copy
at save time), and a loss that declares ``needs_dataset_size`` gets it, whatever its name."""

from __future__ import annotations

import math

import pytest
import torch

from modalign.losses import LossOutput
from modalign.losses.base import LossModule
from modalign.losses.registry import register_loss
from modalign.model import MultiTowerModel
from modalign.train.loop import Trainer
from train_support import small_config, synthetic_store


@register_loss("test-needs-dataset-size")
class NeedsDatasetSize(LossModule):
    """A loss of a user's own that keeps per-sample state (as iSogCLR does)."""

    needs_dataset_size = True

    def __init__(self, modalities, dataset_size=None):
        super().__init__(modalities)
        self.dataset_size = dataset_size
        self.register_buffer("seen", torch.zeros(dataset_size or 0))

    def compute(self, embeddings, groups, indices):
        x, y = self.select(embeddings)
        return LossOutput((x - y).pow(2).sum(1).mean())


def test_a_loss_that_declares_it_gets_the_dataset_size(tmp_path):
    store = synthetic_store(tmp_path / "store", n_groups=24)
    cfg = small_config(store.path, tmp_path / "run", train={"epochs": 1},
                       objectives=[{"loss": "test-needs-dataset-size",
                                    "modalities": ["image", "text"]}])
    trainer = Trainer(cfg)
    assert trainer.objective.terms[0].dataset_size == len(trainer.data) > 2


def test_the_model_holds_the_objective_temperature_it_saves(tmp_path):
    store = synthetic_store(tmp_path / "store", n_groups=24)
    run = tmp_path / "run"
    cfg = small_config(store.path, run, data={"val_split": ""}, train={"epochs": 2},
                       objectives=[{"loss": "clip", "modalities": ["image", "text"]},
                                   {"loss": "siglip", "modalities": ["image", "text"]}])
    trainer = Trainer(cfg)
    clip_scale = trainer.objective.terms[0].log_logit_scale
    assert trainer.model.log_logit_scale is clip_scale
    trainer.run()
    saved = MultiTowerModel.from_pretrained(run / "model").log_logit_scale
    assert torch.equal(saved, clip_scale.detach())  # the last step's value: no validation
    assert float(saved.detach()) != float(torch.tensor(math.log(1 / 0.07)))  # it was trained


def test_a_fixed_first_temperature_is_held_by_value(tmp_path):
    store = synthetic_store(tmp_path / "store", n_groups=24)
    cfg = small_config(store.path, tmp_path / "run", train={"epochs": 1},
                       objectives=[{"loss": "cua", "modalities": ["image", "text"]}])
    trainer = Trainer(cfg)
    assert not trainer.model.log_logit_scale.requires_grad
    assert float(trainer.model.logit_scale.detach()) == float(
        trainer.objective.terms[0].logit_scale())


def test_a_multi_process_run_warns_about_terms_that_stay_local(tmp_path, monkeypatch):
    from modalign.distributed import runtime as D

    store = synthetic_store(tmp_path / "store", n_groups=24)
    cfg = small_config(store.path, tmp_path / "run", train={"epochs": 1},
                       objectives=[{"loss": "clip", "modalities": ["image", "text"]},
                                   {"loss": "cma", "modalities": ["image", "text"]}])
    # two processes as far as the trainer's construction goes (no process group is started)
    monkeypatch.setattr(D, "setup",
                        lambda device, **kw: D.DistContext(0, 2, 0, torch.device("cpu")))
    monkeypatch.setattr(D, "wrap", lambda module, ctx: module)
    with pytest.warns(UserWarning, match=r"\['cma\[image,text\]'\] declare no cross-process"):
        Trainer(cfg)


def test_a_checkpoint_with_a_stale_model_scale_resumes_with_the_objective_one(tmp_path):
    """Checkpoints written before the model held the objective's temperature stored a model
    scale of their own (the initial value, or the last saved copy); on resume the objective's
    value wins, as the objective is restored after the model."""
    from safetensors.torch import load_file, save_file

    from modalign.train.checkpoint import WEIGHTS, load_checkpoint
    from modalign.train.loop import train

    store = synthetic_store(tmp_path / "store", n_groups=24)
    run = tmp_path / "run"
    train(small_config(store.path, run, train={"epochs": 1}))
    ckpt = load_checkpoint(run / "checkpoints")
    weights = load_file(ckpt.path / WEIGHTS)
    learnt = weights["objective.terms.0.log_logit_scale"].clone()
    weights["model.log_logit_scale"] = torch.tensor(math.log(1 / 0.07))  # a stale copy
    save_file(weights, str(ckpt.path / WEIGHTS))
    trainer = Trainer(small_config(store.path, run, train={"epochs": 2}), resume=True)
    assert trainer._restore()
    assert trainer.model.log_logit_scale is trainer.objective.terms[0].log_logit_scale
    assert torch.equal(trainer.model.log_logit_scale.detach(), learnt)
    assert not torch.equal(learnt, torch.tensor(math.log(1 / 0.07)))
