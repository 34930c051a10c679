"""``reproduce cross-the-gap`` inversion settings: --template reaches the OVI class prompts, OVI's
P comes from the architecture with the official table, precision is recorded."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from modalign.cli import main
from modalign.io import read_jsonl
from modalign.reproduce import cross_the_gap
from modalign.reproduce.inversion import InversionPlan, ovi_family, ovi_tokens_for
from modalign.reproduce.models import ResolvedModel
from reproduce_fixtures import (  # noqa: F401 (one_torch_thread is a fixture)
    one_torch_thread,
    save_tiny_clip,
    write_coop,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.filterwarnings("ignore:no official OVI setting:UserWarning")  # tiny fixture ViT
def test_template_reaches_the_ovi_class_prompts(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    write_coop(root, "dtd")
    clip = save_tiny_clip(tmp_path / "tiny-clip")
    seen: list[list[str]] = []
    real = cross_the_gap.encode_texts

    def spy(tower, texts, **kw):
        seen.append(list(texts))
        return real(tower, texts, **kw)

    monkeypatch.setattr(cross_the_gap, "encode_texts", spy)
    out = tmp_path / "out"
    assert main(["reproduce", "cross-the-gap", "--model", str(clip), "--data-root", str(root),
                 "--out", str(out), "--datasets", "dtd", "--oti-steps", "1", "--ovi-steps", "1",
                 "--template", "itap of a {}.", "--max-queries", "2", "--no-progress"]) == 0
    classes = {r["dataset"]: r for r in read_jsonl(out / "records.jsonl")
               if r["method"] == "ovi"}
    assert classes["dtd"]["inversion"]["template"] == "itap of a {}."
    assert seen and seen[-1] and all(p.startswith("itap of a ") and p.endswith(".")
                                     for p in seen[-1])
    oti = next(r for r in read_jsonl(out / "records.jsonl") if r["method"] == "oti"
               and r["task"] == "image-to-image")
    assert oti["inversion"]["template"] == "itap of a {}." and oti["inversion"]["precision"]


def _clip(width: int, patch: int) -> CLIPModel:
    cfg = CLIPConfig(text_config=dict(vocab_size=10, hidden_size=8, intermediate_size=8,
                                      num_hidden_layers=1, num_attention_heads=1),
                     vision_config=dict(hidden_size=width, intermediate_size=8,
                                        num_hidden_layers=1, num_attention_heads=1,
                                        image_size=2 * patch, patch_size=patch),
                     projection_dim=8)
    return CLIPModel(cfg)


def test_ovi_tokens_from_the_architecture_not_the_name() -> None:
    l14 = {"image": SimpleNamespace(model=_clip(1024, 14))}
    # a folder name that says nothing about L/14 still gets the official OpenAI L/14 setting
    given = ResolvedModel("/models/clip-l14", "hf-clip:/models/clip-l14", "hf-clip")
    assert ovi_tokens_for(given, l14) == 4
    laion = ResolvedModel("/models/laion-l14", "hf-clip:/models/laion-l14", "hf-clip")
    assert ovi_family(laion, l14) == "openclip" and ovi_tokens_for(laion, l14) == 2
    b32 = {"image": SimpleNamespace(model=_clip(768, 32))}
    assert ovi_tokens_for(ResolvedModel("m", "hf-clip:m", "hf-clip"), b32) == 1
    siglip = SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1),
        vision_config=dict(hidden_size=768, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=1, image_size=32, patch_size=16)))
    assert ovi_tokens_for(ResolvedModel("s", "hf-siglip:s", "hf-siglip"),
                          {"image": SimpleNamespace(model=siglip)}) == 4
    assert ovi_family(ResolvedModel("o", "open_clip:ViT-L-14/openai", "open_clip"), {}) == "openai"
    with pytest.warns(UserWarning, match="no official OVI setting"):
        assert ovi_tokens_for(given, {"image": SimpleNamespace(model=_clip(32, 16))}) == 1


def test_plan_precision_is_official_on_cuda_and_fp32_on_cpu() -> None:
    plan = InversionPlan("oti")
    assert plan.precision == "fp16" and plan.settings("cpu").precision == "fp32"
    assert plan.settings("cuda").precision == "fp16"
    assert InversionPlan("ovi", precision="bf16").settings("cuda:0").precision == "bf16"
    with pytest.raises(ValueError, match="precision='half'"):
        InversionPlan("ovi", precision="half")


def test_revisited_table_prints_easy_medium_and_hard() -> None:
    from modalign.reproduce.tables import cross_the_gap_tables

    def rec(method: str, e: float, m: float, h: float) -> dict:
        return {"dataset": "roxford5k", "task": "image-to-image", "method": method,
                "metrics": {"easy/map": e, "medium/map": m, "hard/map": h}}

    table = cross_the_gap_tables([rec("native", 0.5, 0.4, 0.2), rec("oti", 0.6, 0.45, 0.25)],
                                 "m", "CLIP B/32")
    assert "| m (ours) | ROx | Orig | 50.0 | 40.0 | 20.0 |" in table
    assert "| m (ours) | ROx | OTI | 60.0 | 45.0 | 25.0 |" in table
    assert "| m (ours) | Orig | 40.0 | 40.0 |" in table  # the main table: Medium
    assert "secondary source" in table and "does not say which one" in table


def test_help_lists_backbones_and_datasets(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["reproduce", "cross-the-gap", "--help"])
    out = capsys.readouterr().out
    for name in ("hf-clip:DIR", "hf-siglip:DIR", "open_clip:ARCH/PRETRAINED", "slip:CHECKPOINT",
                 "cub2011", "roxford5k", "imagenet", "nocaps", "imdb", "20newsgroups",
                 "nanobeir_scifact", "--precision"):
        assert name in out, name
