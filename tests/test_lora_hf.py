"""LoRA on the transformers CLIP towers (``hf-clip:PATH``), on a tiny random-weight CLIP folder."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from modalign.cli import main
from modalign.data.dataset import PairedDataset
from modalign.embed import embed_dataset
from modalign.encoders import load_encoder
from modalign.encoders.lora import LoraSettings, apply_lora, has_lora, merge_lora
from modalign.model import MultiTowerModel
from modalign.train import train
from test_encoders_hf import CAPTIONS, clip_dir  # noqa: F401  (fixture)
from test_train_loop import image_dataset  # noqa: F401  (fixture)
from train_support import small_config

pytest.importorskip("peft")


def _inputs(tower):
    if tower.modality == "text":
        return CAPTIONS
    from PIL import Image

    return [Image.new("RGB", (40, 32), c) for c in ("red", "navy", "gold")]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_adapters_sit_on_the_towers_own_encoder_start_at_identity_and_merge(clip_dir,  # noqa: F811
                                                                            modality):
    tower = load_encoder(f"hf-clip:{clip_dir}", modality)
    batch = tower.preprocess(_inputs(tower))
    with torch.no_grad():
        ref = tower.encode(batch)
    params = apply_lora(tower, LoraSettings(rank=2, alpha=4.0))
    part = {"image": "vision_model", "text": "text_model"}[modality]
    names = [n for n, p in tower.named_parameters() if p.requires_grad]
    # 2 layers x (q, k, v, out, fc1, fc2) x (A, B), all in this tower's own encoder
    assert len(params) == len(names) == 2 * 6 * 2
    assert all("lora_" in n and f".{part}.encoder.layers." in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(tower.encode(batch), ref, rtol=0, atol=0)  # B starts at zero
    # one step: gradients reach the adapters and nothing else
    tower.encode(batch).pow(2).sum().backward()
    grads = {n for n, p in tower.named_parameters() if p.grad is not None}
    assert grads and grads <= set(names)
    # B starts at zero, so the first step moves B (A's gradient goes through B)
    assert all(p.grad.abs().sum() > 0 for n, p in tower.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        for n, p in tower.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
        adapted = tower.encode(batch)
    assert not torch.allclose(adapted, ref, atol=1e-4)
    merge_lora(tower)
    assert not has_lora(tower)
    with torch.no_grad():
        torch.testing.assert_close(tower.encode(batch), adapted, rtol=1e-5, atol=1e-6)


def test_hf_clip_lora_trains_saves_reloads_and_exports_merged(clip_dir, image_dataset,  # noqa: F811
                                                              tmp_path, monkeypatch):
    root, _ = image_dataset
    spec = f"hf-clip:{clip_dir}"
    store = tmp_path / "store"
    embed_dataset(PairedDataset.load(root), {m: load_encoder(spec, m) for m in ("image", "text")},
                  store, progress=False)
    lora = {"towers": ["image", "text"], "rank": 2, "alpha": 4.0}
    cfg = small_config(store, tmp_path / "run", data={"dataset": str(root)},
                       model={"towers": {"image": spec, "text": spec}},
                       train={"epochs": 1, "batch_size": 4},
                       optim={"tower_lr": 1e-2, "schedule": "constant"}, lora=lora)
    result = train(cfg)
    saved = load_file(str(result.model_dir / "model.safetensors"))
    start = load_encoder(spec, "image")
    q = "vision_model.encoder.layers.0.self_attn.q_proj"
    base = f"towers.image.model.base_model.model.{q}"
    assert torch.equal(saved[base + ".base_layer.weight"],
                       start.model.get_submodule(q).weight.detach())  # frozen
    assert saved[base + ".lora_B.default.weight"].abs().sum() > 0  # trained
    for m in ("image", "text"):
        assert (result.model_dir / "adapters" / m / "adapter_config.json").is_file()

    reloaded = MultiTowerModel.from_pretrained(result.model_dir)
    assert has_lora(reloaded.towers["image"]) and has_lora(reloaded.towers["text"])
    out = tmp_path / "merged"
    assert main(["export", "--merge-lora", str(result.model_dir), "--out", str(out)]) == 0
    monkeypatch.setitem(sys.modules, "peft", None)  # the merged folder loads without peft
    merged = MultiTowerModel.from_pretrained(out)
    assert not any("lora_" in k for k in load_file(str(out / "model.safetensors")))
    assert not has_lora(merged.towers["image"]) and not has_lora(merged.towers["text"])
    images = [str(root / "img" / f"{g}.png") for g in range(5)]
    for m, inputs in (("image", images), ("text", CAPTIONS)):
        torch.testing.assert_close(merged.encode(m, inputs), reloaded.encode(m, inputs),
                                   rtol=1e-5, atol=1e-6)
