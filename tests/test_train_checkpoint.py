"""Checkpoints: round trip, pointer to the newest complete folder, pruning, no unpickling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modalign.errors import ModalignError
from modalign.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _modules():
    torch.manual_seed(0)
    return {"model": nn.Linear(3, 2), "objective": nn.Linear(1, 1)}


def test_round_trip_of_weights_optimizer_and_rng(tmp_path):
    mods = _modules()
    opt = torch.optim.AdamW(mods["model"].parameters(), lr=0.1)
    mods["model"](torch.randn(4, 3)).sum().backward()
    opt.step()
    state = rng_state()
    expected_draw = torch.rand(3)
    save_checkpoint(tmp_path, 7, mods, {"optimizer": opt.state_dict(), "rng": state,
                                        "epoch": 2, "note": "x"})
    ck = load_checkpoint(tmp_path)
    assert ck.step == 7 and ck.trainer["epoch"] == 2 and ck.trainer["note"] == "x"
    for name, m in mods.items():
        for k, v in m.state_dict().items():
            assert torch.equal(ck.weights[name][k], v)
    opt2 = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(ck.trainer["optimizer"])
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (opt, opt2)]
    assert torch.equal(*moments)
    set_rng_state(ck.trainer["rng"])
    assert torch.equal(torch.rand(3), expected_draw)


def test_latest_points_at_the_newest_and_old_ones_are_pruned(tmp_path):
    mods = _modules()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, mods, {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000003", "ckpt-000000004"]
    assert latest_checkpoint(tmp_path).name == "ckpt-000000004"
    # a half-written folder left by a crash is ignored
    (tmp_path / ".ckpt-000000005.abc").mkdir()
    assert load_checkpoint(tmp_path).step == 4


def test_missing_or_incomplete_checkpoints_are_clear_errors(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ModalignError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 1, _modules(), {})
    (tmp_path / "ckpt-000000001" / "trainer.pt").unlink()
    with pytest.raises(ModalignError, match=r"no readable checkpoint.*trainer\.pt is missing"):
        load_checkpoint(tmp_path)


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    """Before: a SafetensorError traceback on --resume."""
    mods = _modules()
    save_checkpoint(tmp_path, 1, mods, {"tag": 1}, keep=2)
    save_checkpoint(tmp_path, 2, mods, {"tag": 2}, keep=2)
    weights = tmp_path / "ckpt-000000002" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1 and ck.trainer["tag"] == 1
    err = capsys.readouterr().err
    assert "ckpt-000000002" in err and "previous checkpoint ckpt-000000001" in err


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_trainer_state_is_never_unpickled(tmp_path):
    save_checkpoint(tmp_path, 1, _modules(), {})
    torch.save({"step": 1, "modules": ["model"], "x": _Evil()},
               tmp_path / "ckpt-000000001" / "trainer.pt")
    with pytest.raises(ModalignError, match=r"trainer\.pt: refused") as info:
        load_checkpoint(tmp_path)
    assert "weights_only" not in str(info.value)  # never a hint to load it unsafely
