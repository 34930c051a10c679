"""Training on ordinary mistakes: changed settings on resume, bad objectives, non-finite losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modalign.cli import main
from modalign.embed.arrays import array_facts
from modalign.errors import ModalignError
from modalign.io import dumps, read_json
from modalign.losses.output import LossOutput
from modalign.losses.registry import _LOSSES, available_losses, build_loss, register_loss
from modalign.train.config import TrainConfig, load_config
from modalign.train.loop import train
from train_support import small_config, synthetic_store


def test_resume_refuses_changed_settings_and_records_allowed_ones(tmp_path):
    """Before: --resume --optim.lr 0.5 --train.batch_size 8 applied the batch size, ignored the
    learning rate and left the old values in config.resolved.json."""
    store = synthetic_store(tmp_path / "store", n_groups=24)
    run = tmp_path / "run"
    train(small_config(store.path, run, train={"epochs": 1}))
    changed = small_config(store.path, run, optim={"lr": 0.5}, train={"epochs": 1,
                                                                     "batch_size": 4})
    with pytest.raises(ModalignError) as info:
        train(changed, resume=True)
    msg = str(info.value)
    assert "optim.lr: 0.01 -> 0.5" in msg and "train.batch_size: 8 -> 4" in msg
    # more epochs are allowed, and the record says so
    result = train(small_config(store.path, run, train={"epochs": 2}), resume=True)
    assert result.summary["epochs"] == 2
    resolved = read_json(run / "config.resolved.json")
    assert resolved["config"]["train"]["epochs"] == 2
    assert resolved["resumed"][-1]["changed"] == {"train.epochs": {"old": 1, "new": 2}}


@pytest.mark.parametrize("objective,match", [
    ({"loss": "clip", "modalities": ["image", "text"], "temperatur": 0.1},
     r"unknown parameters \['temperatur'\]; clip accepts \[.*'temperature'"),
    ({"loss": "clipp", "modalities": ["image", "text"]}, r"objectives\[0\]\.loss='clipp'"),
    ({"loss": "clip", "modalities": ["image", "audio"]}, r"\['audio'\] not in data\.keys"),
    ({"loss": "clip", "modalities": ["image", "text"], "weight": -1.0}, r"weight=-1\.0"),
])
def test_objective_is_built_and_checked_with_the_config(objective, match):
    """Before: accepted by --print-config, then a traceback after the data was encoded."""
    with pytest.raises(ModalignError, match=match):
        TrainConfig.from_dict({"objectives": [objective]})


def test_print_config_refuses_a_misspelled_loss_parameter(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[objectives]]\nloss = "clip"\nmodalities = ["image", "text"]\n'
                   'init_logit_scal = 1.0\n')
    assert main(["train", "--config", str(cfg), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "init_logit_scal" in err


def test_yaml_numeric_strings_and_unsafe_tags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 5e-3\ntrain:\n  epochs: '3'\n")  # YAML 1.1 reads 5e-3 as a str
    cfg = load_config(y)
    assert cfg.optim.lr == 0.005 and cfg.train.epochs == 3
    y.write_text("optim:\n  lr: hello\n")
    with pytest.raises(ModalignError, match=r"optim\.lr must be a number, got 'hello'"):
        load_config(y)
    y.write_bytes(b"\xef\xbb\xbfoptim:\n  lr: 0.1\n")  # a byte-order mark (Notepad)
    assert load_config(y).optim.lr == 0.1
    y.write_bytes("optim:\n  lr: 0.1  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ModalignError, match=r"c\.yaml, line 2: byte 0xe9 is not UTF-8"):
        load_config(y)
    y.write_text("optim: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ModalignError, match=r"line 1: refused.*plain values only"):
        load_config(y)


def test_every_loss_at_batch_one_is_finite_or_a_clear_error():
    """Before: mv_dhel returned -inf at batch 1 and training wrote -Infinity into JSON."""
    torch.manual_seed(0)
    seen = 0
    for name in available_losses():
        if not _LOSSES[name].__module__.startswith("modalign.losses"):
            continue
        params = {"dataset_size": 4} if name == "isogclr" else {}
        try:
            loss = build_loss(name, modalities=["image", "text"], **params)
        except (TypeError, ValueError):
            continue
        emb = {m: torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
               for m in ("image", "text", "image_old", "text_old", "image_target",
                         "text_target")}
        inputs = {k: torch.tensor([0]) for k, needed in (
            ("indices", loss.needs_indices), ("groups", loss.supports_groups),
            ("anchor_rows", getattr(loss, "needs_anchor_rows", False))) if needed}
        try:
            out = loss(emb, **inputs)
        except ValueError as e:  # the clear error: it says how many rows it needs or got
            assert any(w in str(e) for w in ("1", "row", "batch", "groups")), (name, e)
            continue
        seen += 1
        assert torch.isfinite(out.loss).all(), name
    assert seen >= 8


@register_loss("test-blows-up")
class BlowsUp(torch.nn.Module):
    """Finite for two steps, then infinite (as a diverging run would be)."""

    calls = 0

    def __init__(self, modalities):
        super().__init__()
        self.modalities = modalities

    def forward(self, embeddings, *, groups=None, indices=None):
        BlowsUp.calls += 1
        x = embeddings[self.modalities[0]].sum() * 0
        return LossOutput(x + (1.0 if BlowsUp.calls <= 2 else float("inf")), {})


def test_non_finite_loss_stops_the_run_with_a_message(tmp_path):
    """Before: training exited 0 and wrote -Infinity into log.jsonl and summary.json."""
    store = synthetic_store(tmp_path / "store", n_groups=24)
    cfg = small_config(store.path, tmp_path / "run",
                       objectives=[{"loss": "test-blows-up", "modalities": ["image", "text"]}])
    BlowsUp.calls = 0
    with pytest.raises(ModalignError, match=r"the loss is inf at step 3 \(epoch 2"):
        train(cfg)
    for f in ("log.jsonl", "summary.json"):
        p = tmp_path / "run" / f
        if p.exists():
            for line in p.read_text().splitlines():
                json.loads(line, parse_constant=_refuse)


def _refuse(constant: str) -> None:
    pytest.fail(f"non-finite {constant} in JSON")


def test_nan_rows_are_named_by_item_id(tmp_path):
    """Before: the loss check named a batch-relative row."""
    store = synthetic_store(tmp_path / "store", n_groups=24)
    emb = store.load("image")
    vecs = np.asarray(emb.vectors).copy()
    vecs[5] = np.nan
    np.save(store.path / "image.npy", vecs)  # add_array refuses NaN; a damaged store may not
    store.register("image", emb.items, {**array_facts(store.path / "image.npy"),
                                        "dim": vecs.shape[1], "encoder": {"name": "fake-image"}})
    with pytest.raises(ModalignError, match=rf"1 rows of the store hold NaN.*{emb.items[5]['id']}"):
        train(small_config(store.path, tmp_path / "run"))


def test_json_never_holds_non_finite_numbers():
    text = dumps({"loss": float("-inf"), "rows": [1.0, float("nan")], "t": np.float32("inf")})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "loss": None, "rows": [1.0, None], "t": None}


def test_one_training_group_is_a_clear_error(tmp_path):
    """Before: "row of zero norm" from the feature centring."""
    store = synthetic_store(tmp_path / "store", n_groups=6)  # 4 train groups
    for name in ("image", "text"):
        emb = store.load(name)
        keep = [i for i, it in enumerate(emb.items) if it["split"] != "train"
                or it["group"] == "g000"]
        sub = emb.subset(np.array(keep))
        store.add_array(name, sub.vectors, sub.items, info={"encoder": {"name": f"fake-{name}"}})
    with pytest.raises(ModalignError, match=r"holds 1 group\(s\).*at least 2"):
        train(small_config(store.path, tmp_path / "run"))


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    """Before: a SafetensorError traceback."""
    from modalign.train import checkpoint as ck

    mods = {"model": torch.nn.Linear(2, 2)}
    ck.save_checkpoint(tmp_path, 1, mods, {})

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           'message: "No space left on device" })')

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(ModalignError, match=r"no space left on the device of .*ckpt-000000002, "
                                            r"0\.0 MB needed"):
        ck.save_checkpoint(tmp_path, 2, mods, {})
    assert ck.load_checkpoint(tmp_path).step == 1
    assert not list(tmp_path.glob(".ckpt-*"))


def test_a_pickle_named_model_safetensors_is_refused_in_one_line(tmp_path):
    import pickle

    from modalign.model import MultiTowerModel

    store = synthetic_store(tmp_path / "store", n_groups=12)
    result = train(small_config(store.path, tmp_path / "run", train={"epochs": 1}))
    (result.model_dir / "model.safetensors").write_bytes(pickle.dumps({"w": [1, 2]}))
    with pytest.raises(ModalignError, match=r"model\.safetensors: refused, not a valid "
                                            r"safetensors file") as info:
        MultiTowerModel.from_pretrained(result.model_dir)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
