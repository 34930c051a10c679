"""Rule-based compositional negatives and ``eval --task compositional`` (accuracy of the true
caption over its negatives) against naive references."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from modalign.cli import main
from modalign.data.negatives import LEXICON, labelled_negatives, text_negatives
from modalign.embed.store import EmbeddingStore
from modalign.errors import ModalignError
from modalign.evaluate.compositional import compositional_correct, evaluate_compositional
from modalign.evaluate.records import read_record

CAPTIONS = ["red heart", "grinning face", "two men holding hands", "thumbs up", "no entry",
            "woman in lotus position", "small blue diamond", "rocket"]


def test_each_rule_keeps_its_promise():
    for c in CAPTIONS:
        negs = labelled_negatives(c, k=6)
        assert negs == labelled_negatives(c, k=6)  # seeded by the caption: reproducible
        assert len({t.lower() for t, _ in negs}) == len(negs)
        for t, rule in negs:
            assert t.lower() != c.lower()
            a, b = c.split(), t.split()
            if rule == "swap":  # the same bag of words, two positions exchanged
                assert sorted(a) == sorted(b)
                assert sum(x != y for x, y in zip(a, b)) == 2
            elif rule == "replace":  # one word replaced by another of its lexicon category
                diff = [(x, y) for x, y in zip(a, b) if x != y]
                assert len(a) == len(b) and len(diff) == 1
                (x, y), = diff
                assert any(x.lower() in ws and y.lower() in ws for ws in LEXICON.values())
            else:
                assert rule == "negate"
                assert b == ["no", *a] or (a[0] == "no" and b == a[1:])
    assert text_negatives("rocket") == ["no rocket"]  # one word: only the negation
    assert text_negatives("red heart", rules=("replace",), k=20)[0] != "red heart"
    assert len(text_negatives("red heart", rules=("replace",), k=50)) == len(LEXICON["colour"]) - 1
    with pytest.raises(ModalignError, match=r"rules: unknown \['shuffle'\]"):
        text_negatives("red heart", rules=("shuffle",))


def test_correct_matches_a_loop_and_ties_fail():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    negs = [torch.randn(1 + i % 3, 4, generator=g) for i in range(6)]
    got = compositional_correct(q, p, negs).tolist()
    ref = [float(q[i] @ p[i]) > max(float(q[i] @ n) for n in negs[i]) for i in range(6)]
    assert got == ref and 0 < sum(got) < 6
    tie = compositional_correct(q[:1], p[:1], [p[:1].clone()])
    assert tie.tolist() == [False]
    with pytest.raises(ModalignError, match="at least one negative"):
        compositional_correct(q[:1], p[:1], [torch.zeros(0, 4)])


def _bag_encoder(texts):
    """Order-aware toy text embedding: a word's vector depends on its position (so no negative
    ties with its caption; a tie would be decided by float rounding)."""
    out = []
    for t in texts:
        v = np.zeros(8)
        for pos, w in enumerate(t.lower().split()):
            rng = np.random.default_rng(zlib.crc32(f"{pos}:{w}".encode()))
            v += rng.normal(size=8)
        out.append(v / np.linalg.norm(v))
    return torch.tensor(np.array(out), dtype=torch.float32)


def test_evaluate_compositional_matches_the_pairwise_definition():
    queries = _bag_encoder(CAPTIONS) + 0.3 * torch.randn(len(CAPTIONS), 8,
                                                          generator=torch.Generator().manual_seed(1))
    r = evaluate_compositional(queries, CAPTIONS, _bag_encoder, k=3)
    correct, per_rule = 0, {}
    for i, c in enumerate(CAPTIONS):
        pos = float(queries[i] @ _bag_encoder([c])[0])
        negs = labelled_negatives(c, 3)
        scores = [(float(queries[i] @ _bag_encoder([t])[0]), rule) for t, rule in negs]
        correct += pos > max(s for s, _ in scores)
        for s, rule in scores:
            per_rule.setdefault(rule, []).append(pos > s)
    assert r.metrics["accuracy"] == pytest.approx(correct / len(CAPTIONS))
    for rule, wins in per_rule.items():
        assert r.metrics[f"accuracy_{rule}"] == pytest.approx(sum(wins) / len(wins))
    given = evaluate_compositional(queries[:2], CAPTIONS[:2], _bag_encoder,
                                   negatives={"red heart": ["heart red"]})
    assert given.metrics["num_queries"] == 1 and given.metrics["num_skipped"] == 1


@pytest.mark.slow
def test_eval_task_compositional_writes_a_record(tmp_path, capsys):
    from modalign.model import ModelConfig, MultiTowerModel

    store = EmbeddingStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    store.add_array("image", rng.normal(size=(len(CAPTIONS), 6)).astype(np.float32), [
        {"id": f"i{g}", "modality": "image", "view": "noto", "group": f"g{g}", "split": "test",
         "labels": {}} for g in range(len(CAPTIONS))])
    store.add_array("text", rng.normal(size=(len(CAPTIONS), 384)).astype(np.float32), [
        {"id": f"t{g}", "modality": "text", "view": "name", "group": f"g{g}", "split": "test",
         "value": c, "labels": {}} for g, c in enumerate(CAPTIONS)])
    torch.manual_seed(0)
    model = MultiTowerModel(ModelConfig(towers={"image": "effnet-lite0", "text": "minilm"},
                                        feature_dims={"image": 6, "text": 384}, joint_dim=8))
    model_dir = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "records"
    assert main(["eval", "--model", str(model_dir), "--embeddings", str(store.path), "--task",
                 "compositional", "--out", str(out)]) == 0
    rec = read_record(next(out.glob("*.json")))
    assert rec["task"] == "compositional"
    assert rec["metrics"]["num_queries"] == len(CAPTIONS)
    # the same accuracy recomputed: the stored image features through the saved model, each
    # caption and its rule-based negatives through its text tower, a win only above every one
    loaded = MultiTowerModel.from_pretrained(model_dir)
    with torch.no_grad():
        z = loaded.project("image", np.array(store.load("image").vectors)).double()
        wins = []
        for g, caption in enumerate(CAPTIONS):
            t = loaded.encode("text", [caption, *text_negatives(caption)]).double()
            wins.append(bool(z[g] @ t[0] > (t[1:] @ z[g]).max()))
    assert rec["metrics"]["accuracy"] == pytest.approx(np.mean(wins), abs=1e-12)
    assert main(["eval", "--embeddings", str(store.path), "--task", "compositional",
                 "--out", str(out)]) == 2
    assert "needs --model DIR" in capsys.readouterr().err
