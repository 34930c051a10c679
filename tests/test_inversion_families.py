"""Inversion on every backbone family of Cross the Gap, and the regressions of the official read.

Per family (transformers CLIP, transformers SigLIP, the OpenAI layout of open_clip / OpenAI clip /
SLIP), on a small random-weight model: the pseudo-token forward fed the tower's own token
embeddings (text) or patch embeddings (images) equals the tower's forward, and OTI/OVI reach a
cosine above 0.99 on one item.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    SiglipConfig,
    SiglipModel,
)

from modalign.bridge.inversion import (
    CausalTextInversion,
    InversionSettings,
    OpenAITextInversion,
    OpenAIVisionInversion,
    TemplateTokens,
    clip_text_inversion,
    clip_vision_inversion,
    invert,
    official_ovi_tokens,
    text_model_inversion,
    vit_geometry,
)
from modalign.errors import ModalignError

torch.set_num_threads(1)


# ---------------------------------------------------------------- the real CLIP BPE vocabulary

def _bpe_file() -> Path | None:
    """``bpe_simple_vocab_16e6.txt.gz`` of an installed OpenAI ``clip`` or ``open_clip`` package
    (found without importing them: they need torchvision)."""
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
                if path.exists():
                    return path
    return None


def _bytes_to_unicode() -> list[str]:
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def clip_bpe_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer (49,408 tokens) built from the BPE merges file, as OpenAI's
    ``SimpleTokenizer`` builds it."""
    path = _bpe_file()
    if path is None:
        pytest.skip("the CLIP BPE file is not installed (make setup installs clip-anytorch "
                    "without dependencies for it)")
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip-bpe")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert len(tok) == 49408
    return tok


def test_template_with_punctuation_after_the_slot_real_clip_bpe(clip_bpe_tokenizer) -> None:
    tok = clip_bpe_tokenizer
    # the official README's template: "{}." used to glue the placeholder to the full stop
    t = TemplateTokens.from_tokenizer(tok, "A photo of {}.")
    pound = tok("£")["input_ids"][1]
    official = tok("A photo of {}.".format(" £ "))["input_ids"]
    assert list(t.ids) == official and t.ids[t.slot] == pound
    assert t.ids[0] == 49406 and t.ids[-1] == 49407 and t.ids[t.slot + 1] == tok(".")[
        "input_ids"][1]
    t2 = TemplateTokens.from_tokenizer(tok, "itap of a {}, a type of pet.", num_tokens=2)
    assert t2.ids[t2.slot:t2.slot + 2] == (pound, pound)
    assert list(t2.ids) == tok("itap of a {}, a type of pet.".format(" £ " * 2))["input_ids"]


# ---------------------------------------------------------------- tiny models of each family

def tiny_clip(dtype: torch.dtype = torch.float64) -> CLIPModel:
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=98, eos_token_id=99),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(cfg).to(dtype).eval()


def tiny_siglip(dtype: torch.dtype = torch.float64) -> SiglipModel:
    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12,
                         projection_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8))
    return SiglipModel(cfg).to(dtype).eval()


SIGLIP_TEMPLATE = TemplateTokens((11, 12, 13, 50, 14, 1, 1, 1, 1, 1, 1, 1), slot=3,
                                 text="a photo of {} (padded to 12)")
CLIP_TEMPLATE = TemplateTokens((98, 11, 12, 13, 50, 14, 99), slot=4, text="a photo of {} .")


def _own_tokens(embedding: torch.nn.Embedding, template: TemplateTokens) -> torch.Tensor:
    ids = torch.tensor(template.ids[template.slot:template.slot + template.num_tokens])
    return embedding(ids)[None].detach()


def _patches(vision: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return vision.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2).detach()


def test_causal_fast_path_refuses_a_siglip_text_tower() -> None:
    model = tiny_siglip()
    with pytest.raises(ModalignError,
                       match=r"model_type='siglip_text_model'.*text_model_inversion"):
        CausalTextInversion(model, SIGLIP_TEMPLATE)
    with pytest.raises(ModalignError, match="causal fast path"):
        clip_text_inversion(model, SIGLIP_TEMPLATE)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_text_forward_equals_the_tower_for_its_own_tokens(family: str) -> None:
    model = tiny_clip() if family == "clip" else tiny_siglip()
    template = CLIP_TEMPLATE if family == "clip" else SIGLIP_TEMPLATE
    fwd = text_model_inversion(model, template)
    expected_kind = "causal-text" if family == "clip" else "bidirectional-text"
    assert fwd.identity()["kind"] == expected_kind
    own = _own_tokens(model.text_model.embeddings.token_embedding, template)
    with torch.no_grad():
        got = fwd(own)
        ids = torch.tensor(template.ids)[None]
        want = model.get_text_features(input_ids=ids)
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vision_forward_equals_the_tower_for_its_own_patches(family: str) -> None:
    model = tiny_clip() if family == "clip" else tiny_siglip()
    fwd = clip_vision_inversion(model, num_tokens=16)  # P = every patch: no tiling
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got = fwd(_patches(model.vision_model, pixels))
        want = model.get_image_features(pixel_values=pixels)
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _reachable(template: TemplateTokens, token: int = 7) -> torch.Tensor:
    """The template's ids with a real token in the slot: a text the tower can be inverted to."""
    ids = list(template.ids)
    ids[template.slot] = token
    return torch.tensor([ids])


def _features(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_oti_and_ovi_reach_one_target(family: str) -> None:
    """Targets the tower can produce (a text with a real token in the slot; the image of some
    pseudo-patches), so a cosine above 0.99 is reachable and its absence is a bug."""
    model = (tiny_clip if family == "clip" else tiny_siglip)(torch.float32)
    template = CLIP_TEMPLATE if family == "clip" else SIGLIP_TEMPLATE
    vision = clip_vision_inversion(model, 4)
    with torch.no_grad():
        text_target = _features(model.get_text_features(input_ids=_reachable(template)))
        image_target = vision(torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1)))
    settings = InversionSettings(steps=150, lr=0.05)
    oti = invert(text_target, text_model_inversion(model, template), settings)
    ovi = invert(image_target, vision, settings)
    assert oti.final_cosine.item() > 0.99 and ovi.final_cosine.item() > 0.99


# ---------------------------------------------------------------- the OpenAI layout

def _openai_clip_module():
    """The OpenAI CLIP model code of the installed ``clip`` package, without its torchvision
    imports (only ``clip/model.py``, which needs torch alone)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the OpenAI clip package is not installed (make setup installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openai_clip():
    torch.manual_seed(0)
    model = _openai_clip_module().CLIP(
        embed_dim=16, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
        context_length=12, vocab_size=100, transformer_width=32, transformer_heads=2,
        transformer_layers=2)
    return model.eval()  # float32: its LayerNorm computes in float32 whatever the weights


def test_openai_layout_text_equals_encode_text(openai_clip) -> None:
    fwd = OpenAITextInversion(openai_clip, CLIP_TEMPLATE)
    ids = torch.tensor([list(CLIP_TEMPLATE.ids) + [0] * (12 - len(CLIP_TEMPLATE.ids))])
    with torch.no_grad():
        got = fwd(_own_tokens(openai_clip.token_embedding, CLIP_TEMPLATE))
        want = openai_clip.encode_text(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert fwd.pool_index == 6 and fwd.identity()["pool"] == "argmax"
    assert fwd.identity()["positions"] == 12  # the mask lives in the blocks: the full context


def test_openai_layout_vision_equals_encode_image(openai_clip) -> None:
    fwd = OpenAIVisionInversion(openai_clip, num_tokens=16)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = fwd(openai_clip.visual.conv1(pixels).flatten(2).transpose(1, 2))
        want = openai_clip.encode_image(pixels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert vit_geometry(openai_clip) == (8, 64)


def test_openai_layout_oti_and_ovi_reach_one_target(openai_clip) -> None:
    vision = OpenAIVisionInversion(openai_clip, 4)
    with torch.no_grad():
        ids = torch.cat([_reachable(CLIP_TEMPLATE), torch.zeros(1, 5, dtype=torch.long)], 1)
        text_target = openai_clip.encode_text(ids)
        image_target = vision(torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1)))
    settings = InversionSettings(steps=150, lr=0.05)
    oti = invert(text_target, OpenAITextInversion(openai_clip, CLIP_TEMPLATE), settings)
    ovi = invert(image_target, vision, settings)
    assert oti.final_cosine.item() > 0.99 and ovi.final_cosine.item() > 0.99


# ---------------------------------------------------------------- precision and caches

class _Tower:
    """A text tower from pseudo-tokens whose output changes visibly in bfloat16."""

    modality, num_tokens, token_dim = "text", 1, 32

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                       torch.nn.Linear(64, 16))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens[:, 0])

    def identity(self) -> dict:
        return {"kind": "mlp"}


def test_stored_features_are_fp32_outside_autocast() -> None:
    fwd, targets = _Tower(), torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast, as reproduce had
        res = invert(targets, fwd, InversionSettings(steps=5))
    assert res.features.dtype == torch.float32
    with torch.no_grad():
        exact = F.normalize(fwd(res.tokens), dim=-1)
    torch.testing.assert_close(res.features, exact, rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_optimisation_then_fp32_features(precision: str) -> None:
    fwd, targets = _Tower(), torch.randn(2, 16)
    res = invert(targets, fwd, InversionSettings(steps=60, lr=0.05, precision=precision))
    with torch.no_grad():
        exact = F.normalize(fwd(res.tokens), dim=-1)
    torch.testing.assert_close(res.features, exact, rtol=0, atol=1e-6)
    assert res.loss_curve[-1] < res.loss_curve[0]
    with pytest.raises(ValueError, match="precision='half': expected one of fp32, fp16, bf16"):
        InversionSettings(precision="half")


def test_prefix_cache_follows_weight_changes_and_autocast() -> None:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         eos_token_id=99)
    tower = CLIPTextModel(cfg).eval()
    fwd = CausalTextInversion(tower, CLIP_TEMPLATE)
    tokens = torch.randn(2, 1, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fwd(tokens)  # builds a cache under autocast
    with torch.no_grad():
        torch.testing.assert_close(fwd(tokens), CausalTextInversion(tower, CLIP_TEMPLATE)(tokens),
                                   rtol=0, atol=1e-6)
        fwd.tower.encoder.layers[0].self_attn.k_proj.weight.mul_(1.5)
        fwd.tower.embeddings.token_embedding.weight.add_(0.1)
        torch.testing.assert_close(fwd(tokens), CausalTextInversion(tower, CLIP_TEMPLATE)(tokens),
                                   rtol=0, atol=1e-6)


def test_official_ovi_tokens_table() -> None:
    assert official_ovi_tokens("openai", 32, 768) == 1
    assert official_ovi_tokens("openai", 14, 1024) == 4
    assert official_ovi_tokens("openclip", 14, 1024) == 2
    assert official_ovi_tokens("siglip", 16, 768) == 4
    assert (official_ovi_tokens("slip", 16, 768), official_ovi_tokens("slip", 16, 1024)) == (1, 2)
    with pytest.warns(UserWarning, match="no official OVI setting"):
        assert official_ovi_tokens("openai", 16, 32) == 1
    with pytest.raises(ModalignError, match="family must be one of"):
        official_ovi_tokens("dino", 16, 768)
