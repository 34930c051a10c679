"""transformers CLIP and SigLIP adapters on tiny random-weight models in a folder (offline)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

from modalign.encoders import Encoder, load_encoder
from modalign.encoders import hub as hub_module
from modalign.encoders.hf import load_hf_towers

torch.set_num_threads(2)

WORDS = ["a", "cat", "dog", "red", "face", "smiling", "car", "on", "the", "mat"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
CAPTIONS = ["a cat", "a smiling face on the mat", "red car"]


def _clip_tokenizer() -> CLIPTokenizer:
    """A tiny byte-pair vocabulary: letters, letters ending a word, two merges, the specials."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    merges = [("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer (SigLIP's own needs sentencepiece, not installed)."""
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-clip")
    tok = _clip_tokenizer()
    eos, bos = tok.convert_tokens_to_ids(["<|endoftext|>", "<|startoftext|>"])
    config = CLIPConfig(
        text_config=dict(TINY, vocab_size=len(tok), max_position_embeddings=16,
                         eos_token_id=eos, bos_token_id=bos, pad_token_id=eos),
        vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=32)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32},
                          crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-siglip")
    tok = _word_tokenizer()
    config = SiglipConfig(
        text_config=dict(TINY, vocab_size=len(WORDS) + 3, max_position_embeddings=12,
                         pad_token_id=0, eos_token_id=2, bos_token_id=2, projection_size=48),
        vision_config=dict(TINY, image_size=32, patch_size=8))
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["clip", "siglip"])
def towers(request, clip_dir, siglip_dir):
    folder = clip_dir if request.param == "clip" else siglip_dir
    return request.param, load_hf_towers(str(folder), family=request.param)


def test_towers_follow_the_protocol_and_share_one_model(towers):
    family, pair = towers
    image, text = pair["image"], pair["text"]
    assert isinstance(image, Encoder) and isinstance(text, Encoder)
    assert image.model is text.model
    assert (image.modality, text.modality) == ("image", "text")
    expected = {"clip": (32, 32), "siglip": (64, 48)}[family]
    assert (image.dim, text.dim) == expected
    with torch.no_grad():
        assert image.encode(image.preprocess([Image.new("RGB", (40, 60))])).shape == (1, image.dim)
        assert text.encode(text.preprocess(CAPTIONS)).shape == (3, text.dim)


def test_text_vectors_do_not_depend_on_the_rest_of_the_batch(towers):
    family, pair = towers
    text = pair["text"]
    with torch.no_grad():
        together = text.encode(text.preprocess(CAPTIONS))
        alone = torch.cat([text.encode(text.preprocess([c])) for c in CAPTIONS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)
    if family == "siglip":  # padded to the model's full length, as SigLIP was trained
        assert text.preprocess(["a cat"])["input_ids"].shape[1] == text.max_length


def test_images_from_paths_and_transparent_pil_agree(towers, tmp_path):
    _, pair = towers
    image = pair["image"]
    rgba = Image.new("RGBA", (48, 48), (200, 30, 30, 0))
    rgba.paste((10, 120, 240, 255), (8, 8, 40, 40))
    path = tmp_path / "icon.png"
    rgba.save(path)
    on_white = Image.new("RGB", (48, 48), (255, 255, 255))
    on_white.paste((10, 120, 240), (8, 8, 40, 40))
    with torch.no_grad():
        a, b, c = image.encode(image.preprocess([rgba, path, on_white]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_inner_modules_are_reachable_for_inversion(towers):
    _, pair = towers
    image, text = pair["image"], pair["text"]
    assert image.patch_embedding is image.model.vision_model.embeddings.patch_embedding
    batch = text.preprocess(["a cat"])
    embeds = text.token_embedding(batch["input_ids"])
    assert embeds.shape == (*batch["input_ids"].shape, 64)
    assert len(image.blocks()) == len(text.blocks()) == 4  # embeddings, 2 layers, head


def test_trainable_tail_and_identity(towers):
    family, pair = towers
    text = pair["text"]
    ident = text.identity()
    assert ident["name"].startswith(f"hf-{family}:") and len(ident["weights_hash"]) == 16
    assert ident["weights_hash"] == pair["image"].identity()["weights_hash"]
    text.freeze()
    params = text.trainable_tail(1)
    assert params and all(p.requires_grad for p in params)
    head = text.model.text_projection if family == "clip" else text.model.text_model.head
    assert {id(p) for p in head.parameters()} <= {id(p) for p in params}


def test_load_encoder_picks_one_tower(clip_dir):
    tower = load_encoder(f"hf-clip:{clip_dir}", modality="text")
    assert tower.modality == "text" and tower.name == f"hf-clip:{clip_dir}"
    with pytest.raises(ValueError, match="tower=image or tower=text"):
        load_encoder(f"hf-clip:{clip_dir}")
    assert load_encoder(f"hf-clip:{clip_dir}:tower=image", modality="sketch").modality == "image"


# Hub-shaped names that no cache holds (a real name could sit in a developer's cache).
@pytest.mark.parametrize("spec", ["hf-clip:modalign-tests/no-such-clip",
                                  "hf-siglip:modalign-tests/no-such-siglip",
                                  "minilm:modalign-tests/no-such-minilm"])
def test_hub_name_offline_fails_fast_naming_the_local_folder(monkeypatch, spec):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="local folder") as err:
        load_encoder(spec, modality=None if spec.startswith("minilm") else "image")
    assert time.perf_counter() - start < 2.0
    assert f"{spec.split(':')[0]}:DIR" in str(err.value)


def test_unreachable_hub_fails_fast_without_the_offline_flag(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_module, "hub_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot be reached"):
        hub_module.resolve_model_dir("org/not-cached-model", argument="hf-clip:PATH_OR_NAME",
                                     kind="a CLIPModel")
    assert time.perf_counter() - start < 2.0


def test_bad_folders_raise_value_errors(tmp_path, clip_dir):
    with pytest.raises(ValueError, match="no such folder"):
        load_encoder(f"hf-clip:{tmp_path / 'missing'}", modality="image")
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_encoder(f"hf-clip:{a_file}", modality="image")
    partial = tmp_path / "no-tokenizer"
    partial.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (partial / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(ValueError, match="tokenizer"):
        load_encoder(f"hf-clip:{partial}", modality="image")
    with pytest.raises(ValueError, match="family"):
        load_hf_towers(str(clip_dir), family="blip")


def test_hub_name_shape():
    assert hub_module.is_hub_name("openai/clip-vit-base-patch32")
    assert hub_module.is_hub_name("bert-base-uncased")
    assert not hub_module.is_hub_name("/abs/path")
    assert not hub_module.is_hub_name("a/b/c")
    assert not hub_module.is_hub_name("../up")


def test_search_with_a_joint_space_tower_spec(clip_dir, tmp_path):
    """``modalign.search`` with ``hf-clip:DIR``: the dataset embedded by the CLIP image tower,
    the query by its text tower, ranked by cosine."""
    import modalign

    for i, color in enumerate(("red", "green", "blue")):
        Image.new("RGB", (40, 40), (255 * (i == 0), 255 * (i == 1), 255 * (i == 2))).save(
            tmp_path / f"{color}.png")
    (tmp_path / "pairs.csv").write_text("image,text\n" + "".join(
        f"{c}.png,a {c} car\n" for c in ("red", "green", "blue")))
    spec = f"hf-clip:{clip_dir}"
    (hits,) = modalign.search(spec, tmp_path / "pairs.csv", text="red car", k=3)
    images = load_encoder(spec, modality="image")
    text = load_encoder(spec, modality="text")
    with torch.no_grad():
        g = torch.nn.functional.normalize(images.encode(images.preprocess(
            [str(tmp_path / f"{c}.png") for c in ("red", "green", "blue")])), dim=1)
        q = torch.nn.functional.normalize(text.encode(text.preprocess(["red car"])), dim=1)
    scores = (q @ g.T)[0]
    order = torch.argsort(scores, descending=True).tolist()
    assert [Path(h.value).stem for h in hits] == [("red", "green", "blue")[i] for i in order]
    assert [h.score for h in hits] == pytest.approx(scores[order].tolist(), abs=1e-5)


def test_clip_token_features_hold_the_pooled_vector(clip_dir, siglip_dir, tmp_path):
    """CLIP tokens are projected as the pooled output is: token 0 of an image and the last token
    of a text are the tower's vectors; SigLIP gives no tokens."""
    import numpy as np

    from modalign.cli import main
    from modalign.data.dataset import Item, PairedDataset
    from modalign.embed.tokens import load_tokens, supports_tokens

    towers = load_hf_towers(str(clip_dir), family="clip")
    image, text = towers["image"], towers["text"]
    assert supports_tokens(image) and supports_tokens(text)
    pictures = [Image.new("RGB", (40, 32), c) for c in ("red", "navy")]
    with torch.no_grad():
        states, mask = image.encode_tokens(image.preprocess(pictures))
        vectors = image.encode(image.preprocess(pictures))
    assert states.shape == (2, 1 + (32 // 8) ** 2, 32) and bool(mask.all())
    assert image.token_counts(pictures) == [17, 17]
    torch.testing.assert_close(states[:, 0], vectors, rtol=1e-5, atol=1e-6)
    batch = text.preprocess(CAPTIONS)
    with torch.no_grad():
        states, mask = text.encode_tokens(batch)
        vectors = text.encode(batch)
    counts = text.token_counts(CAPTIONS)
    assert mask.sum(1).tolist() == counts and states.shape[-1] == 32
    for i, n in enumerate(counts):  # the end-of-text token is the row's last
        torch.testing.assert_close(states[i, n - 1], vectors[i], rtol=1e-5, atol=1e-6)
    siglip = load_hf_towers(str(siglip_dir), family="siglip")
    assert not supports_tokens(siglip["image"]) and not supports_tokens(siglip["text"])

    # embed --tokens with hf-clip towers: offsets follow the counts, rows are the tokens above
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    items = []
    for g, colour in enumerate(("red", "navy", "gold")):
        Image.new("RGB", (40, 32), colour).save(root / "img" / f"{g}.png")
        items += [Item(f"i{g}", "image", "flat", f"img/{g}.png", f"g{g}", "test"),
                  Item(f"t{g}", "text", "name", CAPTIONS[g], f"g{g}", "test")]
    PairedDataset("tiny", items, root=root).save(root)
    spec = f"hf-clip:{clip_dir}"
    assert main(["embed", "--data", str(root), "--image", spec, "--text", spec, "--tokens",
                 "--out", str(tmp_path / "emb"), "--batch-size", "2"]) == 0
    tf = load_tokens(tmp_path / "emb", "image")
    assert tf.counts().tolist() == [17, 17, 17] and tf.values.shape == (51, 32)
    with torch.no_grad():
        direct = image.encode(image.preprocess([str(root / "img" / "1.png")]))[0].numpy()
    np.testing.assert_allclose(tf.tokens(1)[0], direct, rtol=1e-5, atol=1e-5)
    tf = load_tokens(tmp_path / "emb", "text")
    assert tf.counts().tolist() == counts and tf.offsets.tolist() == [0, *np.cumsum(counts)]
    np.testing.assert_allclose(tf.tokens(2)[-1], vectors[2].numpy(), rtol=1e-5, atol=1e-5)
