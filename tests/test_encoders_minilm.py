"""MiniLM text tower: the sentence-transformers vector, computed independently in the test."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from modalign.encoders import Encoder, load_encoder
from modalign.encoders.minilm import (
    MiniLMEncoder,
    default_model_dir,
    pool_tokens,
    read_sentence_config,
)

torch.set_num_threads(2)

SENTENCES = [
    "A cat sits on the mat.",
    "grinning face with big eyes",
    "The stock market fell sharply today, and investors worried about interest rates.",
    "🙂",
]


@pytest.fixture(scope="module")
def tower() -> MiniLMEncoder:
    return load_encoder("minilm")


def _reference_vectors(texts: list[str]) -> torch.Tensor:
    """sentence-transformers all-MiniLM-L6-v2 by hand: token states, mean over real tokens, L2."""
    folder = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval().double()
    vectors = []
    for text in texts:  # one sentence at a time: no padding at all
        ids = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids).last_hidden_state[0]
        total = torch.zeros(hidden.shape[-1], dtype=torch.float64)
        for t in range(hidden.shape[0]):
            total += hidden[t]
        mean = total / hidden.shape[0]
        vectors.append(mean / mean.norm())
    return torch.stack(vectors)


def test_matches_the_sentence_transformers_computation(tower):
    with torch.no_grad():
        got = tower.encode(tower.preprocess(SENTENCES))  # padded batch, float32
    assert got.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(got.double(), _reference_vectors(SENTENCES), atol=1e-4, rtol=0)


def test_similar_sentences_score_higher_than_unrelated_ones(tower):
    texts = ["a smiling face", "a happy grinning face", "a red sports car",
             "a dog playing in the park", "a puppy running on the grass", "tax law reform"]
    with torch.no_grad():
        v = tower.encode(tower.preprocess(texts))
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 5]
    assert sim[3, 4] > sim[3, 2] and sim[3, 4] > sim[3, 5]


def test_folder_config_asks_for_mean_pooling_and_normalisation(tower):
    config = read_sentence_config(default_model_dir())
    assert config == {"pooling": "mean", "normalize": True, "max_length": 256}
    assert (tower.pooling, tower.normalize, tower.max_length) == ("mean", True, 256)


def test_pool_tokens_against_loops():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    mean = pool_tokens(hidden, mask, "mean")
    biggest = pool_tokens(hidden, mask, "max")
    for b in range(3):
        kept = [hidden[b, t] for t in range(5) if mask[b, t]]
        torch.testing.assert_close(mean[b], sum(kept) / len(kept))
        torch.testing.assert_close(biggest[b], torch.stack(kept).max(0).values)
    torch.testing.assert_close(pool_tokens(hidden, mask, "cls"), hidden[:, 0])
    with pytest.raises(ValueError, match="mode"):
        pool_tokens(hidden, mask, "median")


def test_forward_from_input_embeddings_equals_encode_with_gradients(tower):
    batch = tower.preprocess(SENTENCES[:2])
    embeds = tower.token_embedding(batch["input_ids"]).detach().requires_grad_(True)
    via_embeds = tower.encode_embeddings(embeds, batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        direct = tower.encode(batch)
    torch.testing.assert_close(via_embeds.detach(), direct)
    via_embeds.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    tower.zero_grad(set_to_none=True)


def test_protocol_blocks_and_identity(tower):
    assert isinstance(tower, Encoder)
    assert (tower.name, tower.modality, tower.dim) == ("minilm", "text", 384)
    assert len(tower.blocks()) == 7  # embeddings + 6 layers
    ident = tower.identity()
    assert ident["pooling"] == "mean + L2" and len(ident["weights_hash"]) == 16


def test_max_length_truncates(tower):
    short = MiniLMEncoder(max_length=8)
    batch = short.preprocess(["word " * 50])
    assert batch["input_ids"].shape[1] == 8
    with pytest.raises(ValueError, match="max_length"):
        MiniLMEncoder(max_length=10_000)


def test_bad_inputs_raise_value_errors(tower, tmp_path):
    with pytest.raises(ValueError, match="list of strings"):
        tower.preprocess("just one string")
    with pytest.raises(ValueError, match="list of strings"):
        tower.preprocess([])
    with pytest.raises(ValueError, match="item 1"):
        tower.preprocess(["ok", 3])
    with pytest.raises(ValueError, match="batch"):
        tower.encode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no such folder"):
        load_encoder(f"minilm:{tmp_path / 'missing'}")
