"""Retrieval and zero-shot tasks: directions, relevance, self-removal, bridges, overrides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modalign.bridge.posthoc import build_chain
from modalign.embed.store import Embeddings
from modalign.evaluate.metrics import retrieval_metrics
from modalign.evaluate.retrieval import (
    as_unit_tensor,
    cross_modal_retrieval,
    intra_modal_retrieval,
    relevance_ids,
    toy_embeddings,
)
from modalign.evaluate.zeroshot import (
    build_prompts,
    class_prototypes,
    encode_prototypes,
    load_class_embeddings,
    save_class_embeddings,
    zero_shot_classification,
)


def brute_force_map(q, g, relevant, exclude=None):
    """Average precision per query by sorting the full score row (no ties in random data)."""
    aps = []
    for i in range(len(q)):
        order = sorted((j for j in range(len(g)) if exclude is None or j != exclude[i]),
                       key=lambda j: -float(q[i] @ g[j]))
        hits, total = 0, 0.0
        for pos, j in enumerate(order, 1):
            if relevant(i, j):
                hits += 1
                total += hits / pos
        if hits:
            aps.append(total / hits)
    return sum(aps) / len(aps)


def test_cross_modal_both_directions_with_clip_benchmark_keys():
    emb = toy_embeddings(groups=10)
    r = cross_modal_retrieval(emb, ("image", "text"), k_values=(1, 5))
    assert "image_retrieval_recall@5" in r.metrics and "text_retrieval_recall@5" in r.metrics
    img, txt = as_unit_tensor(emb["image"]), as_unit_tensor(emb["text"])
    ig, tg = emb["image"].group_ids(), emb["text"].group_ids()
    expected_t2i = brute_force_map(txt, img, lambda i, j: tg[i] == ig[j])
    expected_i2t = brute_force_map(img, txt, lambda i, j: ig[i] == tg[j])
    assert r.metrics["image_retrieval_map"] == pytest.approx(expected_t2i, abs=1e-9)
    assert r.metrics["text_retrieval_map"] == pytest.approx(expected_i2t, abs=1e-9)
    first = r.protocol["directions"][0]
    assert (first["query"], first["gallery"]) == ("image", "text")
    assert first["positives_per_query"] == {"min": 2, "mean": 2.0, "max": 2}
    assert first["queries_removed_from_own_ranking"] == 0
    assert r.protocol["k_values"] == [1, 5] and r.bridges == [] and r.inversion is None


def test_relevance_by_label():
    emb = toy_embeddings(groups=8)
    r = cross_modal_retrieval(emb, relevance="subgroup", k_values=(1,))
    qg, gg = relevance_ids(emb["text"], emb["image"], "subgroup")
    direct = retrieval_metrics(as_unit_tensor(emb["text"]), as_unit_tensor(emb["image"]), qg, gg,
                               k_values=(1,))
    assert r.metrics["image_retrieval_map"] == pytest.approx(direct.metrics["map"])
    # 8 groups over 4 subgroups, two image views: 4 relevant images per text query.
    assert r.protocol["directions"][1]["positives_per_query"]["max"] == 4
    with pytest.raises(ValueError, match="no such label"):
        cross_modal_retrieval(emb, relevance="colour")


def test_intra_modal_across_views_both_ways():
    emb = toy_embeddings(groups=9)["image"]
    r = intra_modal_retrieval(emb, "image", query_view="noto", gallery_view="openmoji")
    directions = [(d["query"], d["gallery"]) for d in r.protocol["directions"]]
    assert directions == [("image:noto", "image:openmoji"), ("image:openmoji", "image:noto")]
    noto, openmoji = emb.filter(view="noto"), emb.filter(view="openmoji")
    a, b = as_unit_tensor(noto), as_unit_tensor(openmoji)
    ga, gb = noto.group_ids(), openmoji.group_ids()
    assert r.metrics["image:openmoji_retrieval_map"] == pytest.approx(
        brute_force_map(a, b, lambda i, j: ga[i] == gb[j]), abs=1e-9)


def test_intra_modal_one_view_against_all_removes_the_query():
    emb = toy_embeddings(groups=7)["text"]
    r = intra_modal_retrieval(emb, "text", query_view="name")
    d = r.protocol["directions"][0]
    assert d["queries_removed_from_own_ranking"] == 7 and d["num_gallery"] == 14
    names = emb.filter(view="name")
    q, g = as_unit_tensor(names), as_unit_tensor(emb)
    ids = [it["id"] for it in emb.items]
    exclude = [ids.index(it["id"]) for it in names.items]
    gq, gg = names.group_ids(), emb.group_ids()
    assert r.metrics["text_retrieval_map"] == pytest.approx(
        brute_force_map(q, g, lambda i, j: gq[i] == gg[j], exclude), abs=1e-9)
    with pytest.raises(ValueError, match="views present"):
        intra_modal_retrieval(emb, "text", query_view="lang:fr")


def test_bridges_are_fitted_on_the_bank_and_recorded():
    test, bank = toy_embeddings(groups=10, seed=1), toy_embeddings(groups=30, seed=2)
    specs = ["centering", "localadj:r_gallery=0.5,r_query=0.5,pool_rate=0.1"]
    r = cross_modal_retrieval(test, bridges=specs, bank=bank, k_values=(1,))
    assert [b["name"] for b in r.bridges] == ["centering", "localadj"]
    chain = build_chain(specs, query="text", gallery="image")
    chain.fit({m: as_unit_tensor(bank[m]) for m in ("image", "text")})
    moved = chain.transform({m: as_unit_tensor(test[m]) for m in ("image", "text")})
    qg, gg = relevance_ids(test["text"], test["image"])
    direct = retrieval_metrics(moved["text"], moved["image"], qg, gg, k_values=(1,))
    assert r.metrics["image_retrieval_map"] == pytest.approx(direct.metrics["map"])
    plain = cross_modal_retrieval(test, k_values=(1,))
    assert r.metrics["image_retrieval_map"] != plain.metrics["image_retrieval_map"]
    with pytest.raises(ValueError, match="bank"):
        cross_modal_retrieval(test, bridges=["centering"])


def test_queries_override_replaces_queries_and_is_recorded():
    emb = toy_embeddings(groups=10)
    # Perfect "inverted" image queries: each image replaced by a text of its own group.
    txt = as_unit_tensor(emb["text"])
    first_text = {g: i for i, g in reversed(list(enumerate(emb["text"].group_ids())))}
    override = txt[[first_text[g] for g in emb["image"].group_ids()]]
    r = cross_modal_retrieval(emb, queries_override={"image": override},
                              inversion={"name": "oti"}, k_values=(1,))
    assert r.metrics["text_retrieval_recall@1"] == 1.0
    assert r.protocol["directions"][0]["inverted_queries"] is True
    assert r.protocol["directions"][1]["inverted_queries"] is False
    assert r.inversion == {"name": "oti"}
    with pytest.raises(ValueError, match="shape"):
        cross_modal_retrieval(emb, queries_override={"image": override[:3]})
    with pytest.raises(ValueError, match="not query sets"):
        cross_modal_retrieval(emb, queries_override={"audio": override})


# ----------------------------------------------------------- zero-shot


def test_prototypes_average_normalised_prompts():
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randn(3, 4, 5, generator=gen)
    protos = class_prototypes(prompts)
    for c in range(3):
        ref = sum(prompts[c, t] / prompts[c, t].norm() for t in range(4))
        assert torch.allclose(protos[c], ref / ref.norm(), atol=1e-6)
    assert build_prompts(["cat", "dog"], ["a {}", "{}!"]) == [["a cat", "cat!"], ["a dog", "dog!"]]
    seen = []
    encode_prototypes(lambda p: seen.extend(p) or torch.randn(len(p), 2), ["cat"], ["a {}", "{}"])
    assert seen == ["a cat", "cat"]
    with pytest.raises(ValueError, match="templates"):
        build_prompts(["cat"], ["no slot"])


def naive_zero_shot(x, protos, y):
    n_classes = protos.shape[0]
    ranks = []
    for i in range(len(x)):
        s = [float(x[i] @ protos[c]) for c in range(n_classes)]
        ranks.append(1 + sum(1 for c in range(n_classes) if c != y[i] and s[c] >= s[y[i]]))
    acc1 = sum(r == 1 for r in ranks) / len(ranks)
    acc5 = sum(r <= 5 for r in ranks) / len(ranks)
    per_class = [np.mean([ranks[i] == 1 for i in range(len(x)) if y[i] == c])
                 for c in sorted(set(y))]
    return acc1, acc5, float(np.mean(per_class))


def test_zero_shot_matches_naive_reference():
    gen = np.random.default_rng(0)
    n, d, C = 60, 6, 8
    labels = [f"class-{i % C}" for i in range(n)]
    gen.shuffle(labels)
    centers = gen.normal(size=(C, d))
    vecs = np.stack([centers[int(lbl.split("-")[1])] + gen.normal(size=d) for lbl in labels])
    rows = [{"id": str(i), "modality": "image", "view": "v", "group": str(i), "split": "test",
             "labels": {"class": labels[i]}} for i in range(n)]
    emb = Embeddings(vecs.astype(np.float32), rows, {str(i): i for i in range(n)})
    names = [f"class-{c}" for c in range(C)]
    protos = torch.tensor(centers, dtype=torch.float32) + 0.3 * torch.randn(C, d)
    r = zero_shot_classification(emb, protos, names, label="class", chunk_size=16)
    y = [names.index(lbl) for lbl in labels]
    acc1, acc5, mpcr = naive_zero_shot(as_unit_tensor(emb), F.normalize(protos, dim=1), y)
    assert r.metrics["acc1"] == pytest.approx(acc1)
    assert r.metrics["acc5"] == pytest.approx(acc5)
    assert r.metrics["mean_per_class_recall"] == pytest.approx(mpcr)
    assert 0 < acc1 < 1  # a non-trivial case
    with pytest.raises(ValueError, match="no prototype"):
        zero_shot_classification(emb, protos[:-1], names[:-1], label="class")


def test_zero_shot_override_and_class_embedding_file(tmp_path):
    emb = toy_embeddings(groups=8)["image"]
    names = sorted(set(emb.labels("subgroup")))
    protos = F.normalize(torch.randn(len(names), emb.dim), dim=1)
    path = save_class_embeddings(tmp_path / "classes.safetensors", names, protos)
    loaded_names, loaded = load_class_embeddings(path)
    assert loaded_names == names and torch.allclose(loaded, protos, atol=1e-6)
    perfect = protos[[names.index(v) for v in emb.labels("subgroup")]]
    r = zero_shot_classification(emb, loaded, loaded_names, label="subgroup",
                                 query_override=perfect, inversion={"name": "ovi"})
    assert r.metrics["acc1"] == 1.0 and r.protocol["inverted_queries"] and r.inversion


def test_index_metrics_are_reported(monkeypatch):
    import modalign.evaluate.retrieval as retrieval
    from modalign.evaluate.search import ExactIndex, faiss_available

    emb = toy_embeddings(groups=10)
    if not faiss_available():  # exercise the plumbing with the exact index standing in
        monkeypatch.setattr(retrieval, "build_index", lambda kind: ExactIndex())
    r = cross_modal_retrieval(emb, k_values=(1, 5), index="flat")
    assert r.protocol["index"] == "flat"
    for gallery in ("image", "text"):
        assert r.metrics[f"{gallery}_retrieval_index_agreement@5"] == pytest.approx(1.0)
        for k in (1, 5):
            assert r.metrics[f"{gallery}_retrieval_index_recall@{k}"] == pytest.approx(
                r.metrics[f"{gallery}_retrieval_recall@{k}"])
    intra = intra_modal_retrieval(emb["text"], "text", query_view="name", index="flat",
                                  k_values=(1,))
    assert intra.metrics["text_retrieval_index_recall@1"] == pytest.approx(
        intra.metrics["text_retrieval_recall@1"])


def test_invgc_in_intra_modal_moves_the_gallery_only():
    from modalign.bridge.posthoc import InvGC

    test = toy_embeddings(groups=10, seed=3)["text"]
    bank = toy_embeddings(groups=40, seed=4)["text"]
    r = intra_modal_retrieval(test, "text", query_view="name", bridges=["invgc:r_gallery=2"],
                              bank=bank, k_values=(1,))
    names = test.filter(view="name")
    bridge = InvGC(gallery="text", query="text:name", r_gallery=2.0).fit(
        {"text": as_unit_tensor(bank), "text:name": as_unit_tensor(bank.filter(view="name"))})
    moved = bridge.transform({"text:name": as_unit_tensor(names), "text": as_unit_tensor(test)})
    assert torch.equal(moved["text:name"], as_unit_tensor(names))
    ids = [it["id"] for it in test.items]
    exclude = torch.tensor([ids.index(it["id"]) for it in names.items])
    direct = retrieval_metrics(moved["text:name"], moved["text"], torch.from_numpy(
        names.group_ids()), torch.from_numpy(test.group_ids()), k_values=(1,), exclude=exclude)
    assert r.metrics["text_retrieval_map"] == pytest.approx(direct.metrics["map"])


def test_both_retrieval_tasks_name_an_unknown_keyword():
    from modalign.errors import ModalignError

    emb = toy_embeddings()
    with pytest.raises(ModalignError, match=r"cross_modal_retrieval: unknown keywords \['tie'\]"):
        cross_modal_retrieval(emb, tie="optimistic")
    with pytest.raises(ModalignError, match=r"intra_modal_retrieval: unknown keywords \['k'\]"):
        intra_modal_retrieval(emb["image"], "image", k=(1,))
    plain = cross_modal_retrieval(emb, k_values=(1,))
    assert plain.protocol["ties"] == "pessimistic" and plain.protocol["k_values"] == [1]
