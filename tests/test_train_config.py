"""Training configs: TOML/YAML files, dotted overrides, command-line flags, checks, built-ins."""

from __future__ import annotations

import argparse
import json

import pytest

from modalign.losses import build_objective
from modalign.train import cli
from modalign.train.config import (
    BUILTIN_CONFIGS,
    TrainConfig,
    flag_specs,
    load_config,
    parse_override,
    parse_value,
)


def test_toml_and_yaml_files_give_the_same_config(tmp_path):
    (tmp_path / "a.toml").write_text(
        '[optim]\nlr = 0.003\n[train]\nbatch_size = 64\nunfreeze = { image = 2 }\n'
        '[[objectives]]\nloss = "siglip"\nmodalities = ["image", "text"]\n')
    (tmp_path / "a.yaml").write_text(
        "optim: {lr: 0.003}\ntrain: {batch_size: 64, unfreeze: {image: 2}}\n"
        "objectives:\n  - {loss: siglip, modalities: [image, text]}\n")
    a, b = load_config(tmp_path / "a.toml"), load_config(tmp_path / "a.yaml")
    assert a.to_dict() == b.to_dict()
    assert a.optim.lr == 0.003 and a.train.unfreeze == {"image": 2}
    assert a.run.name == "a" and a.objectives[0]["loss"] == "siglip"


def test_overrides_are_parsed_as_toml_literals_and_win_over_the_file(tmp_path):
    (tmp_path / "c.toml").write_text("[optim]\nlr = 0.1\n")
    cfg = load_config(tmp_path / "c.toml", [
        "optim.lr=2e-4", "data.keys=['image:noto', 'text']", "train.progress=false",
        "augment.embedding_noise={text = 0.1}", "run.name=exp 1",
        'objectives=[{loss = "clip", modalities = ["image:noto", "text"]}]'])
    assert cfg.optim.lr == 2e-4
    assert cfg.data.keys == ["image:noto", "text"]
    assert cfg.train.progress is False
    assert cfg.augment.embedding_noise == {"text": 0.1}
    assert cfg.run.name == "exp 1"
    assert cfg.objectives == [{"loss": "clip", "modalities": ["image:noto", "text"]}]
    assert parse_value("3") == 3 and parse_value("x/y.npy") == "x/y.npy"
    assert parse_override("train.epochs = 4") == ("train.epochs", 4)


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=1", r"\[optim\] has unknown keys \['lrr'\]"),
    ("optimizer.lr=1", "unknown sections"),
    ("train.epochs=two", "train.epochs must be an integer"),
    ("train.epochs=0", "train.epochs must be a positive int"),
    ("optim.lr=true", "optim.lr must be a number"),
    ("train.batch_size=10", "divisible by train.accumulate"),
    ("train.precision=fp16", "train.precision"),
    ("validate.metric=accuracy", "validate.metric"),
    ("model.head=conv", "head must be one of"),
    ("augment.crop_scale=[0.9, 0.5]", "augment.crop_scale"),
    ("lr=1", "must be dotted"),
])
def test_bad_values_raise_value_errors_that_name_the_key(override, message):
    overrides = [override] + (["train.accumulate=4"] if "batch_size" in override else [])
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({}, overrides)


def test_every_key_is_a_command_line_flag_and_flags_become_overrides():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--config", "clip", "--optim.lr", "5e-4",
                              "--set", "train.epochs=3", "--data.keys", '["image", "text"]'])
    overrides = cli.overrides_from_args(args)
    assert overrides[0] == "train.epochs=3"
    assert set(overrides[1:]) == {"optim.lr=5e-4", 'data.keys=["image", "text"]'}
    cfg = load_config(args.config, overrides)
    assert cfg.optim.lr == 5e-4 and cfg.train.epochs == 3
    keys = {k for k, _ in flag_specs()}
    assert {"optim.lr", "train.unfreeze", "validate.patience", "objectives"} <= keys
    assert all(help_text for _, help_text in flag_specs())
    defaults = TrainConfig().to_dict()
    assert keys - {"objectives"} == {f"{s}.{k}" for s, v in defaults.items()
                                     if isinstance(v, dict) for k in v}


@pytest.mark.parametrize("name", BUILTIN_CONFIGS)
def test_builtin_configs_load_and_build_their_objectives(name):
    cfg = load_config(name)
    assert cfg.run.name == name and cfg.train.batch_size == 256
    objective = build_objective(cfg.objectives)
    used = {m for spec in cfg.objectives for m in spec["modalities"]}
    assert used <= set(cfg.data.keys)
    assert len(objective.labels) == len(cfg.objectives)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="built-ins"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="not a built-in"):
        load_config("nope")


def test_validation_metric_speaks_the_vocabulary_and_reads_older_keys(tmp_path):
    from modalign.errors import ModalignError
    from modalign.train.loop import check_resume

    def cfg(metric, pair=None):
        return TrainConfig.from_dict({
            "data": {"keys": ["image:noto", "text"]},
            "objectives": [{"loss": "clip", "modalities": ["image:noto", "text"]}],
            "validate": {"metric": metric, "pair": pair or []}})

    assert cfg("").validation_metric() == ("image:noto-to-text_recall@1", 1.0)
    assert cfg("text-to-image:noto_recall@5").validation_metric() == (
        "text-to-image:noto_recall@5", 1.0)
    assert cfg("-gap").validation_metric() == ("gap", -1.0)
    with pytest.warns(FutureWarning, match="'t2i_r5' is deprecated; use "
                      "'text-to-image:noto_recall@5'"):
        assert cfg("t2i_r5").validation_metric() == ("text-to-image:noto_recall@5", 1.0)
    with pytest.warns(FutureWarning, match="use 'mean_recall@1'"):
        assert cfg("mean_r1").validation_metric()[0] == "mean_recall@1"
    with pytest.raises(ModalignError, match=r"validate.metric must be one of \['image-to-audio"):
        TrainConfig.from_dict({"data": {"keys": ["image", "audio"]},
                               "objectives": [{"loss": "clip", "modalities": ["image", "audio"]}],
                               "validate": {"metric": "image-to-text_recall@1"}})
    # a run started with the older spelling resumes under today's default
    run = tmp_path / "run"
    run.mkdir()
    old = cfg("i2t_r1", pair=["image:noto", "text"]).to_dict()
    (run / "config.resolved.json").write_text(json.dumps({"config": old}))
    check_resume(run, cfg("", pair=["image:noto", "text"]))
    with pytest.raises(ModalignError, match=r"validate\.metric"):
        check_resume(run, cfg("mean_recall@1", pair=["image:noto", "text"]))


def test_older_training_logs_read_with_todays_keys(tmp_path):
    from modalign.inventory import list_runs
    from modalign.report.run_report import read_log
    from modalign.train.loop import _format_row

    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "config.resolved.json").write_text(json.dumps(
        {"config": {"data": {"keys": ["image:noto", "text"]}}}))
    (run / "log.jsonl").write_text(json.dumps(
        {"epoch": 1, "step": 4, "train_loss": 1.5, "i2t_r1": 0.25, "t2i_r5": 0.5,
         "mean_r1": 0.3, "gap": 0.4, "samples_per_s": 10.0}) + "\n")
    (run / "summary.json").write_text(json.dumps(
        {"metric": "i2t_r1", "best": {"epoch": 1, "i2t_r1": 0.25}}))
    (row,) = read_log(run / "log.jsonl")
    assert row["image:noto-to-text_recall@1"] == 0.25 and row["mean_recall@1"] == 0.3
    assert row["text-to-image:noto_recall@5"] == 0.5 and "i2t_r1" not in row
    assert list_runs([tmp_path / "runs"])[0]["best"] == "image:noto-to-text_recall@1 0.250"
    line = _format_row(row)
    assert "image:noto → text recall@1 0.250" in line and "text → image:noto recall@5" in line
