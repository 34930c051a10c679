"""MultiTowerModel: projection, views sharing a head, save/load round trip, lazy towers, inits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from modalign.model import ModelConfig, MultiTowerModel, base_modality
from train_support import HashTextEncoder, TinyImageTower


def _config(**kw) -> ModelConfig:
    base = {"towers": {"image": "effnet-lite0", "text": "minilm"},
            "feature_dims": {"image": 6, "text": 4}, "joint_dim": 3}
    base.update(kw)
    return ModelConfig(**base)


def test_project_matches_a_hand_written_linear_head():
    torch.manual_seed(0)
    model = MultiTowerModel(_config(center_features=True))
    model.set_feature_center("image", torch.full((6,), 0.1))
    model.double()
    x = torch.randn(5, 6, dtype=torch.float64)
    head = model.heads["image"]
    lin = head.layers[0]
    by_hand = []
    for row in x:  # one row at a time: normalise, centre, affine, normalise
        u = row / row.norm() - head.center
        z = lin.weight @ u + lin.bias
        by_hand.append(z / z.norm())
    got = model.project("image", x)
    torch.testing.assert_close(got, torch.stack(by_hand), rtol=0, atol=1e-12)


def test_views_share_their_modality_head_and_rows_are_unit_norm():
    model = MultiTowerModel(_config(head="mlp", head_depth=3, hidden_dim=7))
    x = torch.randn(4, 6)
    a, b = model.project("image", x), model.project("image:openmoji", x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(4))
    assert base_modality("audio:en-us") == "audio"


def test_mlp_head_has_the_declared_depth_and_gradients_reach_every_layer():
    model = MultiTowerModel(_config(head="mlp", head_depth=3, hidden_dim=5))
    linears = [m for m in model.heads["text"].layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 5), (5, 5), (5, 3)]
    model.project("text", torch.randn(3, 4)).sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in linears)


@pytest.mark.parametrize("bad", [
    {"joint_dim": 0}, {"head": "conv"}, {"head": "mlp", "head_depth": 1},
    {"head_init": "kaiming"}, {"temperature": -1.0}, {"feature_dims": {"image": 6}},
    {"trainable_towers": ["audio"]}, {"towers": {"image:noto": "effnet-lite0", "text": "minilm"}},
])
def test_bad_config_raises_value_error_naming_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field.split("_")[0]):
        _config(**bad)


def test_project_rejects_wrong_shapes_and_unknown_modalities():
    model = MultiTowerModel(_config())
    with pytest.raises(ValueError, match=r"\(batch, 6\)"):
        model.project("image", torch.randn(2, 5))
    with pytest.raises(ValueError, match="no head"):
        model.project("audio", torch.randn(2, 6))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = MultiTowerModel(_config(head="mlp", logit_bias_init=-2.0))
    model.set_feature_center("text", torch.randn(4))
    with torch.no_grad():
        model.log_logit_scale.fill_(3.0)
    model.save_pretrained(tmp_path / "m", extra={"note": "x"})
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["towers"]["image"]["spec"] == "effnet-lite0"
    assert meta["modalign_version"] and meta["extra"] == {"note": "x"}
    loaded = MultiTowerModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.project_array("text", x), model.project_array("text", x))
    np.testing.assert_allclose(loaded.project_array("text", x, batch_size=3),
                               model.project_array("text", x), rtol=0, atol=1e-6)
    assert float(loaded.logit_scale.detach()) == pytest.approx(np.exp(3.0))


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MultiTowerModel.from_pretrained(tmp_path / "nope")
    MultiTowerModel(_config()).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        MultiTowerModel.from_pretrained(tmp_path / "m")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    (tmp_path / "x" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a modalign model"):
        MultiTowerModel.from_pretrained(tmp_path / "x")


def test_encode_runs_tower_then_head_in_batches():
    model = MultiTowerModel(ModelConfig(towers={"text": "hash-text"}, feature_dims={"text": 8},
                                        joint_dim=4))
    enc = HashTextEncoder()
    model.attach_tower("text", enc)
    texts = ["grinning face", "cat", "red heart", "rocket", "pile of poo"]
    expected = model.project("text", enc.encode(texts)).detach()
    for bs in (1, 2, 64):
        torch.testing.assert_close(model.encode("text", texts, batch_size=bs), expected)
    assert model.encode("text", []).shape == (0, 4)


def test_trainable_tower_is_a_submodule_saved_with_the_heads(tmp_path):
    model = MultiTowerModel(ModelConfig(towers={"image": "tiny-image"}, feature_dims={"image": 12},
                                        joint_dim=4, trainable_towers=["image"]))
    tower = TinyImageTower()
    model.attach_tower("image", tower)
    assert any(p is tower.top.weight for p in model.parameters())
    batch = torch.rand(3, 3, 16, 16)
    out = model({}, raw={"image": batch})["image"]
    torch.testing.assert_close(out, model.project("image", tower.encode(batch)))
    model.save_pretrained(tmp_path / "m")
    keys = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "towers.image.top.weight" in keys
    not_a_module = HashTextEncoder()
    not_a_module.dim = 12
    with pytest.raises(ValueError, match=r"nn\.Module"):
        model.attach_tower("image", not_a_module)


def test_cone_init_starts_in_a_narrow_cone_and_xavier_does_not():
    torch.manual_seed(0)
    x = torch.randn(512, 64)  # centred inputs
    cos = {}
    for init in ("xavier", "cone"):
        model = MultiTowerModel(ModelConfig(towers={"image": "x"}, feature_dims={"image": 64},
                                            joint_dim=32, head="mlp", head_init=init,
                                            center_features=False))
        z = model.project_array("image", x)
        sims = z @ z.T
        cos[init] = float((sims.sum() - np.trace(sims)) / (len(z) * (len(z) - 1)))
    assert abs(cos["xavier"]) < 0.1
    assert cos["cone"] > 0.8


def test_forward_is_project_per_key():
    model = MultiTowerModel(_config())
    feats = {"image:noto": torch.randn(2, 6), "text": torch.randn(2, 4)}
    out = model(feats)
    for k, v in feats.items():
        torch.testing.assert_close(out[k], F.normalize(model.head_for(k)(v), dim=-1))
