from __future__ import annotations

import numpy as np
import pytest
import torch

from modalign.data import Item, PairedDataset
from modalign.embed import EmbeddingStore
from modalign.embed.tokens import TokenFeatures, embed_tokens, load_tokens, token_modalities
from modalign.errors import ModalignError


class CharTokens:
    """A toy token tower: one token per character, a deterministic 6-d vector each."""

    name, modality, dim = "char-tokens", "text", 6

    def __init__(self) -> None:
        self.calls = 0

    def preprocess(self, inputs):
        return list(inputs)

    def token_counts(self, inputs):
        return [len(s) for s in inputs]

    def encode_tokens(self, batch):
        self.calls += 1
        t = max(len(s) for s in batch)
        out = torch.zeros(len(batch), t, self.dim)
        mask = torch.zeros(len(batch), t, dtype=torch.bool)
        for i, s in enumerate(batch):
            for j, ch in enumerate(s):
                out[i, j] = torch.tensor([ord(ch) % 7, j, len(s), 1.0, i * 0, ord(ch) % 3])
                mask[i, j] = True
        return out, mask

    def identity(self):
        return {"name": self.name}


def toy(n=9):
    return PairedDataset("toy", [Item(f"t{i}", "text", "name", "ab" * (i % 4) + "c" * i or "z",
                                      f"g{i % 3}", "test" if i % 2 else "train")
                                 for i in range(n)])


def naive(ds, enc):
    return [enc.encode_tokens([it.value])[0][0].numpy() for it in ds.items]


def test_roundtrip_matches_naive_and_is_reused(tmp_path):
    ds, enc = toy(), CharTokens()
    embed_tokens(ds, {"text": enc}, tmp_path, batch_size=4, progress=False)
    tf = load_tokens(tmp_path, "text")
    assert isinstance(tf.values, np.memmap) and token_modalities(tmp_path) == ["text"]
    for i, ref in enumerate(naive(ds, enc)):
        np.testing.assert_array_equal(tf.tokens(i), ref)
    assert tf.counts().tolist() == [len(it.value) for it in ds.items]
    calls = enc.calls
    embed_tokens(ds, {"text": enc}, tmp_path, batch_size=4, progress=False)
    assert enc.calls == calls
    test = load_tokens(tmp_path, "text", split="test")
    assert [it["id"] for it in test.items] == ["t1", "t3", "t5", "t7"]
    np.testing.assert_array_equal(test.tokens(1), tf.tokens(3))
    x, mask = test.padded()
    assert x.shape == (4, int(test.counts().max()), 6)
    assert mask.sum(1).tolist() == test.counts().tolist()
    np.testing.assert_allclose(test.pooled()[2], np.asarray(test.tokens(2)).mean(0), rtol=1e-6)
    assert EmbeddingStore(tmp_path).verify() == {"text.tokens": None}


def test_resume_is_bitwise(tmp_path):
    ds = toy(11)
    embed_tokens(ds, {"text": CharTokens()}, tmp_path / "a", batch_size=3, progress=False)
    enc = CharTokens()
    embed_tokens(ds, {"text": enc}, tmp_path / "b", batch_size=3, progress=False, stop_after=2)
    assert token_modalities(tmp_path / "b") == []
    assert (tmp_path / "b" / "text.tokens.partial.npy").exists()
    enc2 = CharTokens()
    embed_tokens(ds, {"text": enc2}, tmp_path / "b", batch_size=3, progress=False)
    assert enc2.calls == 2  # 11 items, 3 per batch, 2 batches done before: 2 left
    a, b = load_tokens(tmp_path / "a", "text"), load_tokens(tmp_path / "b", "text")
    assert (tmp_path / "a" / "text.tokens.npy").read_bytes() == \
        (tmp_path / "b" / "text.tokens.npy").read_bytes()
    np.testing.assert_array_equal(a.offsets, b.offsets)


def test_damage_and_bad_input(tmp_path):
    embed_tokens(toy(), {"text": CharTokens()}, tmp_path, progress=False)
    f = tmp_path / "text.tokens.npy"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(ModalignError, match="damaged"):
        load_tokens(tmp_path, "text")
    with pytest.raises(ModalignError, match="no token array for 'image'"):
        load_tokens(tmp_path, "image")

    class Pooled:
        name, modality, dim = "pooled", "text", 2
    with pytest.raises(ModalignError, match="gives no token features"):
        embed_tokens(toy(), {"text": Pooled()}, tmp_path, progress=False)
    with pytest.raises(ModalignError, match="offsets"):
        TokenFeatures(np.zeros((3, 2), np.float32), np.array([0, 2]), [{}], {})


def test_embed_tokens_cli_minilm_tokens_pool_to_the_stored_vectors(tmp_path, capsys):
    from modalign.cli import main

    csv = tmp_path / "pairs.csv"
    csv.write_text("text,group\na red apple,a\na green pear on a table,b\nfig,c\n")
    out = tmp_path / "store"
    assert main(["embed", "--data", str(csv), "--modalities", "text", "--tokens", "--out",
                 str(out), "--verify"]) == 0
    assert "text.tokens: ok" in capsys.readouterr().out
    tf = load_tokens(out, "text")
    pooled = EmbeddingStore(out).load("text")
    assert [it["id"] for it in tf.items] == [it["id"] for it in pooled.items]
    mean = tf.pooled()
    np.testing.assert_allclose(mean / np.linalg.norm(mean, axis=1, keepdims=True),
                               pooled.vectors, rtol=1e-5, atol=1e-6)
    assert tf.counts().tolist()[2] == 3  # [CLS] fig [SEP]
    with pytest.raises(ModalignError, match="none of the towers"):
        from modalign.embed.cli import _embed_tokens
        _embed_tokens(None, {"text": object()}, out, None)


def test_effnet_spatial_tokens_pool_to_the_vector():
    from PIL import Image

    from modalign.encoders import load_encoder

    image = load_encoder("effnet-lite0:image_size=64").eval()
    px = image.preprocess([Image.new("RGB", (70, 70), "red"), Image.new("RGB", (64, 64), "blue")])
    with torch.no_grad():
        tokens, tmask = image.encode_tokens(px)
        torch.testing.assert_close(tokens.mean(1), image.encode(px), rtol=1e-5, atol=1e-5)
    assert tokens.shape == (2, 4, 1280) and image.token_counts([None, None]) == [4, 4]
    assert bool(tmask.all())
