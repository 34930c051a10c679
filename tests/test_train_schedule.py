"""The shared settings bases: every class keeps its field names, defaults and positional
arguments, and the training config hands the shared fields on unchanged."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields

import pytest

from modalign.errors import ModalignError
from modalign.late.model import LateSettings
from modalign.model import HeadSettings, ModelConfig
from modalign.refine.core import RefineConfig
from modalign.train.config import (
    SECTIONS,
    LateOptions,
    ModelSection,
    OptimConfig,
    TrainConfig,
    TrainSection,
)
from modalign.train.recipes.fdt import FDTOptions, FDTSettings
from modalign.train.schedule import (
    LoopSettings,
    OptimizerSettings,
    TokenRunSettings,
    field_values,
)

LOOP = {"epochs": 10, "batch_size": 256, "seed": 0, "max_steps": 0, "checkpoint_every": 0,
        "keep_checkpoints": 2}
OPTIM = {"lr": 1e-3, "weight_decay": 0.1}
HEAD = {"joint_dim": 256, "head": "linear", "head_depth": 2, "hidden_dim": 512,
        "head_init": "xavier", "cone_offset": 1.0, "input_norm": "l2", "center_features": True,
        "temperature": 0.07}
LATE = {"query": "text:alias", "documents": ["image", "text:name"], "dim": 64,
        "temperature": 0.5, "scoring": "maxsim"}
FDT = {"codes": 1024, "dim": 256, "hidden_dim": 512, "weighting": "sparsemax",
       "temperature": 10.0}
RUN = {"store": "", "run_dir": "", "train_split": "train"}

# Every field and default of each class as it was written out in full before the bases.
EXPECTED = {
    TrainSection: {**LOOP, "accumulate": 1, "unfreeze": {}, "precision": "fp32",
                   "device": "auto", "num_threads": 0, "progress": True},
    OptimConfig: {**OPTIM, "tower_lr": 1e-5, "betas": [0.9, 0.98], "eps": 1e-6,
                  "warmup_steps": 20, "schedule": "cosine", "grad_clip": 0.0},
    ModelSection: {"towers": {}, **HEAD},
    SECTIONS["late"]: {"enabled": False, **LATE},
    SECTIONS["fdt"]: {"enabled": False, **FDT},
    LateSettings: {**RUN, **LATE, **LOOP, **OPTIM, "batch_size": 64, "weight_decay": 0.0},
    FDTSettings: {**RUN, **LOOP, **OPTIM, "keys": ["image", "text"], **FDT,
                  "logit_temperature": 0.07, "warmup_steps": 0, "val_split": "val",
                  "num_threads": 0},
    RefineConfig: {"method": "clip-refine", "modalities": ("image", "text"), "epochs": 1,
                   "batch_size": 512, "lr": 1e-6, "weight_decay": 0.1, "lambda_cont": 0.0,
                   "lambda_rand": 1.0, "lambda_kd": 1.0, "alpha": 0.5, "temperature": 1.0,
                   "normalize": False, "cma_lambda": 0.001, "label": None,
                   "templates": ("a photo of a {}.",), "seed": 0, "split": "train",
                   "tower_stages": 1},
}


def _defaults(cls: type) -> dict:
    out = {}
    for f in fields(cls):
        out[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
    return out


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_fields_and_defaults_are_the_ones_written_out_before(cls: type) -> None:
    assert _defaults(cls) == EXPECTED[cls]


def test_model_config_defaults_and_positional_towers() -> None:
    cfg = ModelConfig({"image": "effnet-lite0"}, {"image": 8}, False)
    assert (cfg.towers, cfg.feature_dims, cfg.learnable_temperature) == (
        {"image": "effnet-lite0"}, {"image": 8}, False)
    assert field_values(cfg, HeadSettings) == HEAD
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_positional_fields_of_each_class_stay_its_own() -> None:
    assert RefineConfig("cma", ("image", "text"), 3).epochs == 3
    assert FDTSettings(["a", "b"], 0.05).logit_temperature == 0.05
    assert TrainSection(4).accumulate == 4
    with pytest.raises(TypeError):
        LateSettings("store")  # every field is keyword-only


def test_training_config_hands_every_shared_field_on() -> None:
    loop = {f.name: 3 + i for i, f in enumerate(fields(LoopSettings))}
    optim = {"lr": 0.25, "weight_decay": 0.5}
    late = {"query": "image", "documents": ["text"], "dim": 5, "temperature": 2.0,
            "scoring": "single"}
    fdt = {"codes": 7, "dim": 6, "hidden_dim": 9, "weighting": "softmax", "temperature": 3.0}
    cfg = TrainConfig.from_dict({
        "data": {"embeddings": "emb", "train_split": "tr", "val_split": "va"},
        "train": {**loop, "batch_size": 4, "num_threads": 2}, "optim": optim,
        "late": late, "fdt": fdt, "run": {"dir": "out"},
        "model": {"head": "mlp", "joint_dim": 12, "temperature": 0.5}})
    ls, fs = cfg.late_settings(), cfg.fdt_settings()
    for s in (ls, fs):
        assert field_values(s, LoopSettings) == {**loop, "batch_size": 4}
        assert field_values(s, OptimizerSettings) == optim
        assert (s.store, s.run_dir, s.train_split) == ("emb", "out", "tr")
    assert field_values(ls, LateOptions) == late
    assert field_values(fs, FDTOptions) == fdt
    assert (fs.val_split, fs.num_threads, fs.warmup_steps) == ("va", 2, 20)
    mc = cfg.model_config({"image": "a", "text": "b"}, {"image": 3, "text": 4})
    assert field_values(mc, HeadSettings) == {**HEAD, "head": "mlp", "joint_dim": 12,
                                              "temperature": 0.5}
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert LateSettings(**asdict(ls)) == ls and FDTSettings(**asdict(fs)) == fs


def test_token_run_refuses_a_missing_store_and_names_its_default_folder(tmp_path, monkeypatch
                                                                         ) -> None:
    with pytest.raises(ModalignError, match=r"a \[fdt\] run needs data.embeddings"):
        TokenRunSettings().open_run("fdt", "settings.json", frozenset(), False)
    monkeypatch.chdir(tmp_path)
    run_dir, root, resumed = TokenRunSettings(store="emb").open_run(
        "late", "settings.json", frozenset(), True)
    assert (str(run_dir), root, resumed) == ("late-run", run_dir / "checkpoints", False)
