"""Text-side inversion: templates, the exact fast causal path against the official full-length
path (values, gradients, whole inversions in float64), and the bidirectional (BERT/MiniLM) path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

from modalign.bridge.inversion import (
    BidirectionalTextInversion,
    CausalTextInversion,
    InversionSettings,
    TemplateTokens,
    eos_position,
    invert,
)

torch.set_num_threads(1)

SOT, EOS, CONTEXT = 98, 99, 77


def tiny_clip_text(layers: int = 2) -> CLIPTextModel:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=CONTEXT, bos_token_id=SOT, eos_token_id=EOS)
    return CLIPTextModel(cfg).double().eval()


def clip_template(num_tokens: int = 1) -> TemplateTokens:
    """'SOT a photo of <slot> , here EOS' in made-up ids."""
    ids = (SOT, 11, 12, 13, *([50] * num_tokens), 14, 15, EOS)
    return TemplateTokens(ids=ids, slot=4, num_tokens=num_tokens, text="a photo of {} , here")


class FullLengthReference:
    """The official way: pad the ids to the 77-position context, overwrite the slot's embeddings,
    add positions, run every layer on every position under a causal mask, pool at argmax(ids)."""

    modality = "text"

    def __init__(self, tower: CLIPTextModel, template: TemplateTokens) -> None:
        self.tower, self.template = tower, template
        ids = list(template.ids) + [0] * (CONTEXT - len(template.ids))
        self.ids = torch.tensor(ids)[None]
        self.num_tokens, self.token_dim = template.num_tokens, tower.config.hidden_size

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        b, (s, r) = tokens.shape[0], (self.template.slot, self.template.num_tokens)
        x = self.tower.embeddings.token_embedding(self.ids).to(tokens.dtype).expand(b, -1, -1)
        x = torch.cat([x[:, :s], tokens, x[:, s + r:]], dim=1)
        h = self.tower.embeddings(inputs_embeds=x)
        causal = torch.full((CONTEXT, CONTEXT), float("-inf"), dtype=h.dtype).triu(1)
        h = self.tower.encoder(inputs_embeds=h, attention_mask=causal[None, None]).last_hidden_state
        h = self.tower.final_layer_norm(h)
        return h[torch.arange(b), self.ids.expand(b, -1).argmax(-1)]

    def identity(self) -> dict:
        return {"kind": "full-length"}


@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("cache_prefix", [True, False])
def test_fast_causal_forward_and_gradient_equal_the_full_length_path(num_tokens, cache_prefix):
    tower, template = tiny_clip_text(), clip_template(num_tokens)
    fast = CausalTextInversion(tower, template, cache_prefix=cache_prefix)
    ref = FullLengthReference(tower, template)
    tokens = torch.randn(3, num_tokens, 32, dtype=torch.float64, requires_grad=True)
    out_fast, out_ref = fast(tokens), ref(tokens)
    torch.testing.assert_close(out_fast, out_ref, rtol=0, atol=1e-12)
    w = torch.randn_like(out_ref)
    (g_fast,) = torch.autograd.grad((out_fast * w).sum(), [tokens])
    (g_ref,) = torch.autograd.grad((out_ref * w).sum(), [tokens])
    torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-12)


def test_fast_causal_inversion_equals_the_full_length_inversion_after_the_same_steps():
    tower, template = tiny_clip_text(), clip_template()
    targets = torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s = InversionSettings()  # the official 150 steps
    fast = invert(targets, CausalTextInversion(tower, template), s)
    ref = invert(targets, FullLengthReference(tower, template), s)
    assert (fast.features - ref.features).abs().max() < 1e-5
    assert (fast.tokens - ref.tokens).abs().max() < 1e-5
    assert 1 - fast.final_cosine.mean() < fast.loss_curve[0] - 0.1  # it did optimise


def test_a_real_word_in_the_slot_gives_the_towers_own_output():
    tower, template = tiny_clip_text(), clip_template()
    word = tower.embeddings.token_embedding(torch.tensor([[37]]))
    ids = torch.tensor([[*template.ids[:4], 37, *template.ids[5:]]])
    expected = tower(input_ids=ids).pooler_output
    torch.testing.assert_close(CausalTextInversion(tower, template)(word), expected,
                               rtol=0, atol=1e-12)


def test_a_sample_alone_equals_the_same_sample_in_a_batch_of_8_clip_text():
    tower = tiny_clip_text(layers=1)
    fwd = CausalTextInversion(tower, clip_template())
    targets = torch.randn(8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s = InversionSettings(steps=15)
    batch = invert(targets, fwd, s, keys=list("abcdefgh"))
    alone = invert(targets[2:3], fwd, s, keys=["c"])
    torch.testing.assert_close(alone.features[0], batch.features[2], rtol=0, atol=1e-10)


def test_eos_position_conventions():
    assert eos_position([SOT, 5, 6, EOS, 0, 0]) == 3
    assert eos_position([1, 7, 3, 7, 9], eos_token_id=7) == 1
    assert eos_position([1, 9, 2, 0], eos_token_id=2) == 1  # legacy id 2: largest id
    with pytest.raises(ValueError, match="eos_token_id"):
        eos_position([1, 3], eos_token_id=7)


def test_template_errors_name_the_argument():
    with pytest.raises(ValueError, match="slot"):
        TemplateTokens(ids=(1, 2, 3), slot=3)
    with pytest.raises(ValueError, match="num_tokens"):
        TemplateTokens(ids=(1, 2, 3), slot=0, num_tokens=0)
    tower = tiny_clip_text(layers=1)
    with pytest.raises(ValueError, match="EOS"):
        CausalTextInversion(tower, TemplateTokens(ids=(SOT, EOS, 11, 50), slot=3))
    with pytest.raises(ValueError, match="text_model"):
        CausalTextInversion(torch.nn.Linear(2, 2), clip_template())


@pytest.fixture(scope="module")
def minilm():
    from modalign.encoders import load_encoder

    return load_encoder("minilm")


def test_template_from_a_real_tokenizer(minilm):
    t = TemplateTokens.from_tokenizer(minilm.tokenizer, "a photo of {}", num_tokens=2)
    words = minilm.tokenizer.convert_ids_to_tokens(list(t.ids))
    assert words[: t.slot] == ["[CLS]", "a", "photo", "of"]
    assert words[t.slot + 2:] == ["[SEP]"]
    with pytest.raises(ValueError, match="template"):
        TemplateTokens.from_tokenizer(minilm.tokenizer, "no slot here")
    with pytest.raises(ValueError, match="placeholder"):
        TemplateTokens.from_tokenizer(minilm.tokenizer, "{}", placeholder="two words")


def test_minilm_forward_with_a_real_word_equals_the_tower_on_that_sentence(minilm):
    template = TemplateTokens.from_tokenizer(minilm.tokenizer, "a photo of {}")
    fwd = BidirectionalTextInversion.from_encoder(minilm, template)
    (cat_id,) = minilm.tokenizer("cat", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        word = minilm.token_embedding(torch.tensor([[cat_id]]))
        expected = minilm.encode(minilm.preprocess(["a photo of cat"]))
        got = fwd(word)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def naive_bert_mean(model: BertModel, ids: list[int], slot: int, token: torch.Tensor):
    """Per-sample loop: embed ids, put the token in the slot, run BERT, average all positions."""
    outs = []
    for t in token:
        x = model.get_input_embeddings()(torch.tensor([ids])).clone()
        x[0, slot] = t[0]
        outs.append(model(inputs_embeds=x).last_hidden_state[0].mean(0))
    return torch.stack(outs)


def test_bert_forward_and_gradient_equal_a_per_sample_loop():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=32)).double().eval()
    template = TemplateTokens((1, 5, 6, 0, 2), slot=3)
    fwd = BidirectionalTextInversion.from_bert(bert, template)
    tokens = torch.randn(3, 1, 16, dtype=torch.float64, requires_grad=True)
    out, ref = fwd(tokens), naive_bert_mean(bert, list(template.ids), 3, tokens)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), [tokens])
    (g_ref,) = torch.autograd.grad(ref.sum(), [tokens])
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    cls = BidirectionalTextInversion.from_bert(bert, template, pooling="cls")(tokens)
    assert not torch.allclose(cls, out)
    with pytest.raises(ValueError, match="pooling"):
        BidirectionalTextInversion.from_bert(bert, template, pooling="max")  # type: ignore[arg-type]


def test_minilm_inversion_recovers_a_sentence_feature(minilm):
    template = TemplateTokens.from_tokenizer(minilm.tokenizer, "a photo of {}")
    fwd = BidirectionalTextInversion.from_encoder(minilm, template)
    with torch.no_grad():
        targets = minilm.encode(minilm.preprocess(["a photo of dog", "a photo of guitar"]))
        unrelated = minilm.encode(minilm.preprocess(["a photo of guitar", "a photo of dog"]))
    res = invert(targets, fwd, InversionSettings(steps=30))
    assert (res.final_cosine > (F.normalize(unrelated) * F.normalize(targets)).sum(-1)).all()
    assert res.final_cosine.min() > 0.9
