from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from modalign.cli import main
from modalign.encoders.lora import LoraSettings, apply_lora, has_lora, merge_lora
from modalign.errors import ModalignError
from modalign.model import MultiTowerModel
from modalign.train import train
from modalign.train.checkpoint import load_checkpoint
from test_train_loop import image_dataset  # noqa: F401  (fixture)
from train_support import HashTextEncoder, small_config, train_in_one_and_two_processes


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 1)
        self.top = nn.Linear(6, 12)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class LoraImageTower(nn.Module):
    """A tiny image tower whose network sits at ``net``, as the built-in towers' do."""

    name, modality, dim = "lora-image", "image", 12

    def __init__(self) -> None:
        super().__init__()
        self.net = _Net()

    def preprocess(self, inputs: Any) -> torch.Tensor:
        from modalign.encoders.images import images_to_tensor

        return images_to_tensor(list(inputs), 16) / 255.0

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name}


LORA = {"towers": ["image"], "rank": 2, "alpha": 4.0, "target_modules": {"image": ["conv", "top"]}}


def _config(root, store, run, **train_keys):
    return small_config(store, run, data={"dataset": str(root)},
                        model={"towers": {"image": "lora-image", "text": "hash-text"}},
                        train={"epochs": 1, "batch_size": 4, "checkpoint_every": 1,
                               **train_keys},
                        optim={"tower_lr": 1e-2, "schedule": "constant"}, lora=LORA)


def _towers():
    return {"image": LoraImageTower(), "text": HashTextEncoder()}


def test_lora_trains_only_adapters_resumes_bitwise_and_merges(image_dataset, tmp_path,  # noqa: F811
                                                               monkeypatch):
    root, store = image_dataset
    full = train(_config(root, store, tmp_path / "full"), towers=_towers())
    saved = load_file(str(full.model_dir / "model.safetensors"))
    start = LoraImageTower()
    base = "towers.image.net.base_model.model."
    assert torch.equal(saved[base + "conv.base_layer.weight"], start.net.conv.weight.detach())
    assert torch.equal(saved[base + "top.base_layer.weight"], start.net.top.weight.detach())
    assert saved[base + "top.lora_B.default.weight"].abs().sum() > 0  # the adapters trained
    assert (full.model_dir / "adapters" / "image" / "adapter_config.json").is_file()
    config = json.loads((full.model_dir / "config.json").read_text())["model"]
    assert config["lora"]["image"]["rank"] == 2 and config["trainable_towers"] == ["image"]

    # stop after 2 steps, resume: the same weights, optimizer state and adapters, bit for bit
    part = tmp_path / "part"
    train(_config(root, store, part, max_steps=2), towers=_towers())
    resumed = train(_config(root, store, part), towers=_towers(), resume=True)
    a = load_checkpoint(full.run_dir / "checkpoints")
    b = load_checkpoint(part / "checkpoints")
    assert a.step == b.step == full.summary["steps"]
    trained = [k for k in a.weights["model"] if k != "log_logit_scale"]  # a copy of the
    assert any("lora_A" in k for k in trained)  # objective's scale, set when a model is saved
    for k in trained:
        assert torch.equal(a.weights["model"][k], b.weights["model"][k]), k
    for k, v in a.weights["objective"].items():
        assert torch.equal(v, b.weights["objective"][k]), k
    assert resumed.summary["steps"] == full.summary["steps"]

    # export --merge-lora: a plain folder that gives the same embeddings without adapters
    import modalign.encoders

    monkeypatch.setattr(modalign.encoders, "load_encoder",
                        lambda spec, modality=None, **kw: LoraImageTower() if modality == "image"
                        else HashTextEncoder())
    out = tmp_path / "merged"
    assert main(["export", "--merge-lora", str(full.model_dir), "--out", str(out)]) == 0
    lora_model = MultiTowerModel.from_pretrained(full.model_dir)
    merged = MultiTowerModel.from_pretrained(out)
    assert has_lora(lora_model.towers["image"]) and not has_lora(merged.towers["image"])
    assert merged.config.lora == {}
    images = [str(root / "img" / f"{g}.png") for g in range(5)]
    torch.testing.assert_close(merged.encode("image", images), lora_model.encode("image", images),
                               rtol=1e-5, atol=1e-6)
    assert main(["export", "--merge-lora", str(out), "--out", str(tmp_path / "x")]) == 2


def test_lora_config_errors(image_dataset, tmp_path):  # noqa: F811
    root, store = image_dataset
    with pytest.raises(ModalignError, match="choose LoRA adapters or unfrozen stages"):
        _config(root, store, tmp_path / "r", unfreeze={"image": 1})
    with pytest.raises(ModalignError, match="lora rank"):
        small_config(store, tmp_path / "r", model={"towers": {"image": "a", "text": "b"}},
                     lora={"towers": ["image"], "rank": 0})
    with pytest.raises(ModalignError, match=r"not among data\.keys"):
        small_config(store, tmp_path / "r", model={"towers": {"image": "a", "text": "b"}},
                     lora={"towers": ["audio"]})


def test_builtin_towers_adapters_start_at_identity_and_merge_exactly():
    from PIL import Image

    from modalign.encoders import load_encoder

    text = load_encoder("minilm")
    batch = text.preprocess(["a red apple", "a green pear"])
    with torch.no_grad():
        ref = text.encode(batch)
    params = apply_lora(text, LoraSettings(rank=4))
    names = [n for n, p in text.named_parameters() if p.requires_grad]
    assert len(params) == len(names) == 6 * 6 * 2  # 6 layers x 6 projections x (A, B)
    assert all("lora_" in n for n in names) and not any("pooler" in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(text.encode(batch), ref)  # B starts at zero
        for n, p in text.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
        adapted = text.encode(batch)
    merge_lora(text)
    with torch.no_grad():
        torch.testing.assert_close(text.encode(batch), adapted, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(adapted, ref, atol=1e-4)

    image = load_encoder("effnet-lite0:image_size=32").eval()
    apply_lora(image, LoraSettings(rank=2))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in image.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"_expand_conv", "_project_conv", "_conv_head"}  # pointwise only
    with torch.no_grad():
        assert image.encode(image.preprocess([Image.new("RGB", (32, 32), "red")])).shape == \
            (1, 1280)
    with pytest.raises(ModalignError, match="already carries"):
        apply_lora(image, LoraSettings())


def _tiny_bert(folder):
    """A 1-layer, 8-d BERT folder with its own word-piece vocabulary (loads as minilm:PATH)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "name", "alias", "of", "colour",
             *"abcdefghijklmnopqrstuvwxyz0123456789(),"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=16,
                         max_position_embeddings=64)).save_pretrained(str(folder))
    return folder


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_ddp_two_processes_match_one(image_dataset, tmp_path):  # noqa: F811
    root, store = image_dataset
    bert = _tiny_bert(tmp_path / "bert")
    config = tmp_path / "cfg.toml"
    config.write_text(f"""
[data]
embeddings = "{store}"
dataset = "{root}"
keys = ["image", "text:name"]
val_split = ""
[model]
towers = {{ image = "tiny-image", text = "minilm:{bert}" }}
joint_dim = 8
[[objectives]]
loss = "clip"
modalities = ["image", "text:name"]
[optim]
lr = 1e-2
tower_lr = 1e-2
[lora]
towers = ["text"]
rank = 2
[train]
epochs = 1
batch_size = 8
num_threads = 1
device = "cpu"
progress = false
""")
    a, b = train_in_one_and_two_processes(config, tmp_path)
    assert a.step == b.step == 2 and b.trainer["world_size"] == 2
    lora_keys = [k for k in a.weights["model"] if "lora_" in k]
    assert lora_keys
    for k, v in a.weights["model"].items():
        if k != "log_logit_scale":
            torch.testing.assert_close(b.weights["model"][k], v, rtol=0, atol=1e-6, msg=k)
