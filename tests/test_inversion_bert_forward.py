"""The lean BERT forward of OTI against transformers' BertModel: values and gradients in float64
(hand-written backward and the op-by-op autograd path), whole inversions against the model's own
forward, and the cases where it must step aside."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from modalign.bridge.inversion import (
    BidirectionalTextInversion,
    InversionSettings,
    TemplateTokens,
    invert,
)
from modalign.bridge.inversion.bert_forward import BertTemplateForward, lean_bert_unsupported

torch.set_num_threads(1)


def tiny_bert(layers: int = 2) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=32)
    return BertModel(cfg).double().eval()


def naive_hidden(model: BertModel, ids: tuple[int, ...], slot: int, tokens: torch.Tensor):
    """Per sample: embed the ids, overwrite the slot, run the transformers model."""
    outs = []
    for t in tokens:
        x = model.get_input_embeddings()(torch.tensor([ids])).to(tokens.dtype).clone()
        x[0, slot:slot + t.shape[0]] = t
        outs.append(model(inputs_embeds=x, attention_mask=torch.ones(1, len(ids))
                          ).last_hidden_state[0])
    return torch.stack(outs)


@pytest.mark.parametrize("num_tokens", [1, 2])
@pytest.mark.parametrize("path", ["manual", "autograd"])
def test_lean_hidden_states_and_gradient_equal_transformers_float64(num_tokens, path):
    model = tiny_bert()
    ids, slot = (1, 7, 8, *([0] * num_tokens), 9, 2), 3
    lean = BertTemplateForward(model, ids, slot, num_tokens)
    tokens = torch.randn(3, num_tokens, 16, dtype=torch.float64, requires_grad=True)
    if path == "manual":
        out = lean(tokens)
        assert out.grad_fn is not None and "BertStack" in type(out.grad_fn).__name__
    else:  # the op-by-op path (autocast, other devices or activations)
        out = lean._autograd_forward(tokens, lean._fixed(tokens.dtype, tokens.device))
    ref = naive_hidden(model, ids, slot, tokens)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    weights = torch.randn_like(ref)
    (g,) = torch.autograd.grad((out * weights).sum(), [tokens])
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), [tokens])
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


def test_slot_at_either_end_and_a_weight_change_are_followed():
    model = tiny_bert(1)
    tokens = torch.randn(2, 1, 16, dtype=torch.float64)
    for ids, slot in (((0, 7, 8, 2), 0), ((1, 7, 8, 0), 3)):
        lean = BertTemplateForward(model, ids, slot)
        torch.testing.assert_close(lean(tokens), naive_hidden(model, ids, slot, tokens),
                                   rtol=0, atol=1e-12)
    with torch.no_grad():  # the cached fixed positions and stacked weights are rebuilt
        model.embeddings.word_embeddings.weight[7] += 1.0
        model.encoder.layer[0].attention.self.key.weight.mul_(1.5)
    torch.testing.assert_close(lean(tokens), naive_hidden(model, (1, 7, 8, 0), 3, tokens),
                               rtol=0, atol=1e-12)


def test_from_bert_takes_the_lean_path_and_equals_the_models_own_forward():
    model = tiny_bert()
    template = TemplateTokens((1, 5, 6, 0, 2), slot=3)
    tokens = torch.randn(3, 1, 16, dtype=torch.float64, requires_grad=True)
    for pooling in ("mean", "cls"):
        lean = BidirectionalTextInversion.from_bert(model, template, pooling)
        ref = BidirectionalTextInversion.from_bert(model, template, pooling, lean=False)
        assert lean.hidden is not None and ref.hidden is None
        a, b = lean(tokens), ref(tokens)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        (ga,) = torch.autograd.grad(a.square().sum(), [tokens])
        (gb,) = torch.autograd.grad(b.square().sum(), [tokens])
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
        assert lean.identity() == ref.identity()  # same function: same cache keys


def test_the_lean_path_steps_aside_where_it_cannot_be_exact():
    model = tiny_bert(1)
    template = TemplateTokens((1, 5, 0, 2), slot=2)
    fwd = BidirectionalTextInversion.from_bert(model, template)
    assert fwd.hidden is not None and fwd.hidden.usable()
    model.train()  # dropout: the model's own forward runs
    assert "training" in (lean_bert_unsupported(model) or "")
    assert not fwd.hidden.usable()
    model.eval()

    class Wrapped(torch.nn.Linear):  # e.g. a LoRA layer put in place of a projection
        pass

    layer = model.encoder.layer[0].attention.self
    original = layer.query
    layer.query = Wrapped(16, 16).double()
    assert not fwd.hidden.usable()
    tokens = torch.randn(2, 1, 16, dtype=torch.float64)
    ref = BidirectionalTextInversion.from_bert(model, template, lean=False)
    assert BidirectionalTextInversion.from_bert(model, template).hidden is None
    torch.testing.assert_close(fwd(tokens), ref(tokens), rtol=0, atol=0)
    layer.query = original
    assert fwd.hidden.usable()
    with pytest.raises(ValueError, match="model"):
        BertTemplateForward(torch.nn.Linear(2, 2), (1, 0, 2), 1)
    with pytest.raises(ValueError, match="hidden and pool"):
        BidirectionalTextInversion(model.get_input_embeddings(), lambda e, m: e.mean(1), template,
                                   hidden=fwd.hidden)


@pytest.fixture(scope="module")
def minilm():
    from modalign.encoders import load_encoder

    return load_encoder("minilm")


def test_minilm_lean_inversion_equals_the_towers_own_forward(minilm):
    template = TemplateTokens.from_tokenizer(minilm.tokenizer, "a photo of {}")
    targets = torch.randn(4, 384, generator=torch.Generator().manual_seed(0))
    # float64: values, gradients and a whole inversion to 1e-12
    tower = copy.deepcopy(minilm).double()
    lean = BidirectionalTextInversion.from_encoder(tower, template)
    ref = BidirectionalTextInversion.from_encoder(tower, template, lean=False)
    assert lean.hidden is not None and ref.hidden is None
    tokens = torch.randn(2, 1, 384, dtype=torch.float64, requires_grad=True)
    a, b = lean(tokens), ref(tokens)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    (ga,) = torch.autograd.grad(a[:, :7].sum(), [tokens])
    (gb,) = torch.autograd.grad(b[:, :7].sum(), [tokens])
    torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
    settings = InversionSettings(steps=3, batch_size=4)
    ra, rb = invert(targets.double(), lean, settings), invert(targets.double(), ref, settings)
    torch.testing.assert_close(ra.tokens, rb.tokens, rtol=0, atol=1e-12)
    torch.testing.assert_close(ra.features, rb.features, rtol=0, atol=1e-12)
    # float32, the tower as loaded: the same trajectory within 1e-6 after 10 steps
    lean32 = BidirectionalTextInversion.from_encoder(minilm, template)
    ref32 = BidirectionalTextInversion.from_encoder(minilm, template, lean=False)
    settings = InversionSettings(steps=10, batch_size=4)
    ra, rb = invert(targets, lean32, settings), invert(targets, ref32, settings)
    torch.testing.assert_close(ra.features, rb.features, rtol=0, atol=1e-6)
    torch.testing.assert_close(ra.final_cosine, rb.final_cosine, rtol=0, atol=1e-6)


def test_minilm_follows_a_swapped_model(minilm):
    tower = copy.deepcopy(minilm)
    template = TemplateTokens.from_tokenizer(tower.tokenizer, "a photo of {}")
    fwd = BidirectionalTextInversion.from_encoder(tower, template)
    assert fwd.hidden is not None and fwd.hidden.usable()
    tower.model = copy.deepcopy(tower.model)  # e.g. a merged LoRA model put in its place
    assert not fwd.hidden.usable()
    tokens = torch.randn(2, 1, 384)
    ref = BidirectionalTextInversion.from_encoder(tower, template, lean=False)
    with torch.no_grad():
        torch.testing.assert_close(fwd(tokens), ref(tokens), rtol=0, atol=0)
