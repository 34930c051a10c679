"""The text-only sets of Cross the Gap (IMDB, 20 Newsgroups, NanoBEIR), their summaries read
without a general unpickle, qrels scoring against a naive reference, and nocaps caption order."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from modalign.cli import main
from modalign.data.benchmarks import (
    PlainUnpickler,
    available_benchmarks,
    convert_summaries,
    load_benchmark,
    load_nocaps,
    read_summaries,
)
from modalign.data.benchmarks.textual import NEWSGROUPS_QUERIES, newsgroups_test_order
from modalign.errors import ModalignError
from modalign.evaluate.metrics import retrieval_metrics
from modalign.io import read_jsonl
from modalign.reproduce.scoring import qrels_metrics
from reproduce_fixtures import one_torch_thread, save_tiny_clip  # noqa: F401


def write_imdb(root: Path, summaries: bool = True) -> Path:
    folder = root / "IMDB_Reviews"
    folder.mkdir(parents=True)
    rows = [("A wonderful film, truly.", "positive"), ("Dull, long, and \"bad\".", "negative"),
            ("Loved it", "positive"), ("Hated it, sadly", "negative")]
    with open(folder / "IMDB_Dataset.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    if summaries:
        (folder / "summarized_text.pkl").write_bytes(
            pickle.dumps({str(i): f"summary {i}" for i in range(len(rows))}))
    return folder


def write_newsgroups(root: Path) -> Path:
    test = root / "20news-bydate" / "20news-bydate-test"
    for group in ("sci.space", "rec.autos"):
        for k in range(3):
            (test / group).mkdir(parents=True, exist_ok=True)
            text = f"post {k} about {group} \xe9"
            (test / group / f"{5 - k}").write_bytes(text.encode("latin-1"))
    return test


def write_nanobeir(root: Path, name: str = "NanoFEVER") -> Path:
    folder = root / "NanoBEIR" / name
    folder.mkdir(parents=True)
    corpus = [{"_id": f"d{i}", "title": "", "text": f"document {i}"} for i in range(5)]
    queries = [{"_id": "q1", "text": "first claim"}, {"_id": "q2", "text": "second claim"},
               {"_id": "q3", "text": "no relevant"}]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in corpus))
    (folder / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\nq1\td3\t1\n"
                                      "q2\td4\t1\nq3\td1\t0\n")
    return folder


def test_imdb_queries_labels_and_summaries(tmp_path: Path) -> None:
    write_imdb(tmp_path)
    bench = load_benchmark("imdb", tmp_path)
    p = bench.protocols["text-to-text"]
    queries, docs = p.query.select(bench.dataset), p.gallery.select(bench.dataset)
    assert [q.value for q in queries] == ["a positive review of a movie.",
                                          "a negative review of a movie."]
    assert [q.group for q in queries] == ["positive", "negative"]
    assert [d.value for d in docs] == [f"summary {i}" for i in range(4)]
    assert [d.group for d in docs] == ["positive", "negative", "positive", "negative"]
    assert bench.dataset.info["gallery_text"] == "summaries"
    assert available_benchmarks(tmp_path, ["imdb", "20newsgroups"]) == ["imdb"]


def test_imdb_without_summaries_says_so(tmp_path: Path) -> None:
    write_imdb(tmp_path, summaries=False)
    bench = load_benchmark("imdb", tmp_path)
    docs = bench.protocols["text-to-text"].gallery.select(bench.dataset)
    assert docs[1].value == 'Dull, long, and "bad".'
    assert bench.dataset.info["gallery_text"].startswith("full documents")


def test_newsgroups_in_scikit_learn_order(tmp_path: Path) -> None:
    test = write_newsgroups(tmp_path)
    bench = load_benchmark("20newsgroups", tmp_path)
    docs = bench.protocols["text-to-text"].gallery.select(bench.dataset)
    # scikit-learn: load_files lists sorted folders' sorted files and shuffles them with its
    # default RandomState(0); fetch_20newsgroups shuffles the result with RandomState(42)
    files = [(g, test / g / f) for g in ("rec.autos", "sci.space") for f in ("3", "4", "5")]
    first, second = np.arange(6), np.arange(6)
    np.random.RandomState(0).shuffle(first)
    np.random.RandomState(42).shuffle(second)
    expected = [files[first[j]] for j in second]
    assert [(d.group, d.value) for d in docs] == [
        (g, p.read_bytes().decode("latin-1")) for g, p in expected]
    assert newsgroups_test_order(test) == expected
    queries = bench.protocols["text-to-text"].query.select(bench.dataset)
    assert {q.group: q.value for q in queries} == {g: NEWSGROUPS_QUERIES[g]
                                                   for g in ("rec.autos", "sci.space")}


def test_nanobeir_qrels(tmp_path: Path) -> None:
    write_nanobeir(tmp_path)
    bench = load_benchmark("nanobeir_fever", tmp_path)
    assert bench.protocols["text-to-text"].relevance == "qrels"
    assert bench.qrels == {"nanobeir_fever:query:q1": ("nanobeir_fever:doc:d0",
                                                       "nanobeir_fever:doc:d3"),
                           "nanobeir_fever:query:q2": ("nanobeir_fever:doc:d4",)}
    with pytest.raises(FileNotFoundError, match="NanoBEIR"):
        load_benchmark("nanobeir_nq", tmp_path / "nothing")


def test_summaries_are_read_without_a_general_unpickle(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "summarized_text.pkl"
    evil.write_bytes(pickle.dumps({"0": Payload()}))
    with pytest.raises(ModalignError, match="refused to unpickle pathlib"):
        read_summaries(evil)
    assert not marker.exists()
    nested = tmp_path / "nested.pkl"
    nested.write_bytes(pickle.dumps({"0": ["not", "a", "string"]}))
    with pytest.raises(ModalignError, match="document id -> summary"):
        read_summaries(nested)
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({1: "one", "2": "two"}, protocol=2))
    out = convert_summaries(good)
    assert json.loads(out.read_text()) == {"1": "one", "2": "two"} == read_summaries(out)
    import io

    assert PlainUnpickler(io.BytesIO(pickle.dumps([1, 2.5, ("a", None)]))).load() == [
        1, 2.5, ("a", None)]


def test_qrels_map_equals_the_group_reference() -> None:
    """With group-derived qrels, the qrels mAP equals the group-relevance mAP of
    :func:`retrieval_metrics`."""
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(7, 8, generator=g, dtype=torch.float64), torch.randn(
        40, 8, generator=g, dtype=torch.float64)
    qg, gg = torch.randint(0, 4, (7,), generator=g), torch.randint(0, 4, (40,), generator=g)
    qrels = {f"q{i}": [f"d{j}" for j in range(40) if gg[j] == qg[i]] for i in range(7)}
    got = qrels_metrics(q, gal, [f"q{i}" for i in range(7)], [f"d{j}" for j in range(40)], qrels)
    want = retrieval_metrics(q, gal, qg, gg).metrics["map"]
    assert got["map"] == pytest.approx(want, abs=1e-12)
    # ties: two relevant items tied below an irrelevant one take ranks 2 and 3 (pessimistic)
    tied = qrels_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.5, 0.0],
                                                                   [0.5, 0.0], [0.5, 0.0]]),
                         ["q"], ["a", "b", "c", "d"], {"q": ["b", "c"]})
    assert tied["map"] == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_nocaps_keeps_the_file_order_of_captions(tmp_path: Path) -> None:
    folder = tmp_path / "nocaps"
    folder.mkdir()
    anns = [{"id": 9, "image_id": 1, "caption": "listed first"},
            {"id": 2, "image_id": 1, "caption": "listed second"},
            {"id": 5, "image_id": 1, "caption": "listed third"}]
    (folder / "nocaps_val_4500_captions.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": anns}))
    bench = load_nocaps(tmp_path, with_images=False)
    p = bench.protocols["text-to-text"]
    assert [it.value for it in p.query.select(bench.dataset)] == ["listed first"]
    assert [it.value for it in p.gallery.select(bench.dataset)] == ["listed second",
                                                                    "listed third"]


@pytest.mark.usefixtures("one_torch_thread")
def test_reproduce_runs_the_textual_sets(tmp_path: Path) -> None:
    write_imdb(tmp_path / "data")
    write_nanobeir(tmp_path / "data")
    clip = save_tiny_clip(tmp_path / "tiny-clip")
    out = tmp_path / "out"
    assert main(["reproduce", "cross-the-gap", "--model", str(clip), "--data-root",
                 str(tmp_path / "data"), "--out", str(out), "--ovi-steps", "2", "--ovi-tokens",
                 "1", "--no-progress", "--datasets", "imdb", "nanobeir_fever"]) == 0
    recs = {(r["dataset"], r["method"]): r for r in read_jsonl(out / "records.jsonl")}
    assert set(recs) == {("imdb", "native"), ("imdb", "ovi"), ("nanobeir_fever", "native"),
                         ("nanobeir_fever", "ovi")}
    assert recs[("nanobeir_fever", "native")]["metrics"]["queries_without_relevant"] == 1.0
    assert recs[("imdb", "ovi")]["counts"] == {"queries": 2, "gallery": 4}
    assert recs[("imdb", "native")]["protocol"]["gallery_text"] == "summaries"
    table = (out / "table.md").read_text()
    assert "| Model | Method | IMDB | FEVER | Avg |" in table
