"""The purely textual text-to-text sets of Cross the Gap: IMDB, 20 Newsgroups, NanoBEIR.

Each is read from a local folder (nothing is downloaded). Queries are short texts; the gallery is
the documents, replaced by their LLM-written summaries when the folder holds the official
``summarized_text.pkl`` (read with a restricted unpickler) or its JSON conversion
(:mod:`modalign.data.benchmarks.summaries`), as in the paper, which summarises every document to
fit CLIP's 77 tokens. Without summaries the full documents are used (truncated by the tokenizer),
and the dataset's ``info["gallery_text"]`` says so.

Layouts (under the data root):

- ``IMDB_Reviews/IMDB_Dataset.csv`` (columns ``review``, ``sentiment``); summaries keyed by the
  row index. Queries: "a positive review of a movie." and "a negative review of a movie.";
  relevant: same sentiment.
- ``20news-bydate/20news-bydate-test/<newsgroup>/<file>`` (the by-date release that scikit-learn
  downloads); documents in scikit-learn's ``fetch_20newsgroups(subset="test")`` order (files
  sorted per sorted folder, shuffled by ``load_files`` with ``RandomState(0)``, then by
  ``fetch_20newsgroups`` with ``RandomState(42)``), which is the order the summaries are keyed
  by. Queries: one hand-written description per newsgroup (the official
  ones); relevant: same newsgroup.
- ``NanoBEIR/<Name>/corpus.jsonl`` (``_id``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels.tsv`` (``query-id``, ``corpus-id``, ``score``; a header line), summaries keyed by the
  corpus ``_id``. Relevant: the qrels with a positive score.

Examples:
    >>> sorted(NANOBEIR)[:2]
    ['nanobeir_climatefever', 'nanobeir_dbpedia']
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modalign.data.benchmarks.base import (
    Benchmark,
    RetrievalProtocol,
    Side,
    check_name,
    find_dataset_dir,
    require_file,
)
from modalign.data.benchmarks.summaries import find_summaries
from modalign.data.dataset import Item, PairedDataset
from modalign.errors import ModalignError

QUERY, DOCUMENT = "query", "document"
SPLIT = "test"

IMDB_FOLDER = "IMDB_Reviews"
IMDB_FILE = "IMDB_Dataset.csv"
IMDB_QUERIES = {"positive": "a positive review of a movie.",
                "negative": "a negative review of a movie."}

NEWSGROUPS_FOLDER = "20news-bydate"
NEWSGROUPS_TEST = "20news-bydate-test"
# The official query of each newsgroup (Cross the Gap, src/datasets/newsgroup_text.py).
NEWSGROUPS_QUERIES = {
    "alt.atheism": "Atheism, philosophy, and the absence of belief in deities.",
    "comp.graphics": "Computer graphics, rendering, and visual technologies.",
    "comp.os.ms-windows.misc": "Microsoft Windows: software, settings, and troubleshooting.",
    "comp.sys.ibm.pc.hardware": "IBM PC hardware: components, peripherals, and systems.",
    "comp.sys.mac.hardware": "Mac hardware: devices, accessories, and configurations.",
    "comp.windows.x": "X Windows: graphical interfaces and Unix system configuration.",
    "misc.forsale": "Buying and selling products like electronics and furniture.",
    "rec.autos": "Automobiles: car models, maintenance, and industry updates.",
    "rec.motorcycles": "Motorcycles: bike models, culture, and maintenance tips.",
    "rec.sport.baseball": "Baseball: games, teams, players, and statistics.",
    "rec.sport.hockey": "Hockey: NHL, teams, games, and techniques.",
    "sci.crypt": "Cryptography: encryption, security, and data protection.",
    "sci.electronics": "Electronics: circuits, components, and device technology.",
    "sci.med": "Medicine: healthcare, treatments, and medical research.",
    "sci.space": "Space: exploration, astronomy, and scientific discoveries.",
    "soc.religion.christian": "Christianity: beliefs, theology, and practices.",
    "talk.politics.guns": "Gun politics: control, rights, and related issues.",
    "talk.politics.mideast": "Middle East politics: conflicts, diplomacy, and events.",
    "talk.politics.misc": "Politics: issues, governance, and international relations.",
    "talk.religion.misc": "Religion and spirituality: diverse beliefs and philosophies.",
}

NANOBEIR_FOLDER = "NanoBEIR"
NANOBEIR = {f"nanobeir_{n.lower().removeprefix('nano')}": n for n in (
    "NanoClimateFEVER", "NanoDBPedia", "NanoFEVER", "NanoNFCorpus", "NanoNQ", "NanoSCIDOCS",
    "NanoSciFact")}
TEXTUAL_FOLDERS = {"imdb": IMDB_FOLDER, "20newsgroups": NEWSGROUPS_FOLDER,
                   **{k: f"{NANOBEIR_FOLDER}/{v}" for k, v in NANOBEIR.items()}}
TEXTUAL_BENCHMARKS: tuple[str, ...] = tuple(TEXTUAL_FOLDERS)


def _protocols(relevance: str = "group") -> dict[str, RetrievalProtocol]:
    return {"text-to-text": RetrievalProtocol(
        "text-to-text", query=Side("text", SPLIT, (QUERY,)),
        gallery=Side("text", SPLIT, (DOCUMENT,)), relevance=relevance)}


def _documents(name: str, ids: Sequence[str], texts: Sequence[str], groups: Sequence[str],
               folder: Path) -> tuple[list[Item], str]:
    """Gallery items, with the summaries in place of the texts when the folder has them."""
    summaries = find_summaries(folder)
    if summaries is not None:
        missing = [i for i in ids if i not in summaries]
        if missing:
            raise ModalignError(f"{name} summaries in {folder}: no summary for {len(missing)} "
                                f"documents, e.g. {missing[:3]}")
        texts = [summaries[i] for i in ids]
    source = "summaries" if summaries is not None else "full documents (no summaries found)"
    return [Item(f"{name}:doc:{i}", "text", DOCUMENT, t, g, SPLIT, {"label": g})
            for i, t, g in zip(ids, texts, groups, strict=True)], source


def _queries(name: str, by_group: dict[str, str]) -> list[Item]:
    return [Item(f"{name}:query:{g}", "text", QUERY, text, g, SPLIT, {"label": g})
            for g, text in by_group.items()]


def _benchmark(name: str, folder: Path, queries: list[Item], docs: list[Item], source: str,
               relevance: str = "group",
               qrels: dict[str, tuple[str, ...]] | None = None) -> Benchmark:
    ds = PairedDataset(name, queries + docs, root=folder,
                       info={"benchmark": name, "gallery_text": source})
    return Benchmark(name, ds, _protocols(relevance), qrels=qrels)


def load_imdb(root: str | Path) -> Benchmark:
    """IMDB (50k reviews): two sentiment queries against every review (or its summary).

    Examples:
        >>> load_imdb("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: imdb: no dataset folder under /nonexistent; expected one of ...
    """
    folder = find_dataset_dir(root, (IMDB_FOLDER,), "imdb")
    path = require_file(folder / IMDB_FILE, "IMDB reviews")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"review", "sentiment"} <= set(rows[0]):
        raise ModalignError(f"{path}: expected the columns review and sentiment")
    bad = sorted({r["sentiment"] for r in rows} - set(IMDB_QUERIES))
    if bad:
        raise ModalignError(f"{path}: sentiment must be positive or negative, found {bad[:3]}")
    docs, source = _documents("imdb", [str(i) for i in range(len(rows))],
                              [r["review"].strip() for r in rows],
                              [r["sentiment"] for r in rows], folder)
    return _benchmark("imdb", folder, _queries("imdb", IMDB_QUERIES), docs, source)


def newsgroups_test_order(test_dir: Path) -> list[tuple[str, Path]]:
    """``(newsgroup, file)`` in scikit-learn's ``fetch_20newsgroups(subset="test")`` order.

    scikit-learn's ``load_files`` lists the sorted files of the sorted folders and shuffles them
    with ``RandomState(0)`` (its default) when it builds its cache; ``fetch_20newsgroups`` then
    shuffles that list again with ``RandomState(42)`` (its default).
    """
    files = [(group.name, f) for group in sorted(test_dir.iterdir(), key=lambda p: p.name)
             if group.is_dir() for f in sorted(group.iterdir(), key=lambda p: p.name)]
    for seed in (0, 42):
        order = np.arange(len(files))
        np.random.RandomState(seed).shuffle(order)
        files = [files[i] for i in order]
    return files


def load_newsgroups(root: str | Path) -> Benchmark:
    """20 Newsgroups, test split: 20 newsgroup descriptions against the test posts."""
    folder = find_dataset_dir(root, (NEWSGROUPS_FOLDER,), "20newsgroups")
    test_dir = folder / NEWSGROUPS_TEST
    if not test_dir.is_dir():
        raise FileNotFoundError(f"20newsgroups: expected the folder {test_dir} (the by-date "
                                "release: 20news-bydate-test/<newsgroup>/<file>)")
    files = newsgroups_test_order(test_dir)
    unknown = sorted({g for g, _ in files} - set(NEWSGROUPS_QUERIES))
    if unknown:
        raise ModalignError(f"{test_dir}: unknown newsgroup folders {unknown[:3]}")
    texts = [p.read_bytes().decode("latin-1").strip() for _, p in files]
    docs, source = _documents("20newsgroups", [str(i) for i in range(len(files))], texts,
                              [g for g, _ in files], folder)
    present = {g for g, _ in files}
    queries = {g: q for g, q in NEWSGROUPS_QUERIES.items() if g in present}
    return _benchmark("20newsgroups", folder, _queries("20newsgroups", queries), docs, source)


def _jsonl(path: Path) -> list[dict]:
    require_file(path, f"NanoBEIR {path.name}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_nanobeir(name: str, root: str | Path) -> Benchmark:
    """One NanoBEIR set (``nanobeir_fever``, ...): its queries against its corpus, by qrels."""
    check_name(name, NANOBEIR)
    base = find_dataset_dir(root, (NANOBEIR_FOLDER,), "NanoBEIR")
    folder = base / NANOBEIR[name]
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: expected the folder {folder}")
    corpus = _jsonl(folder / "corpus.jsonl")
    queries = _jsonl(folder / "queries.jsonl")
    qrels: dict[str, list[str]] = {}
    path = require_file(folder / "qrels.tsv", "NanoBEIR qrels")
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if k == 0 and parts[0] == "query-id":
                continue
            if len(parts) < 2:
                continue
            if len(parts) > 2 and float(parts[2]) <= 0:
                continue
            qrels.setdefault(parts[0], []).append(parts[1])
    ids = [str(d["_id"]) for d in corpus]
    docs, source = _documents(name, ids, [str(d.get("text", "")).strip() for d in corpus],
                              ids, folder)
    qitems = [Item(f"{name}:query:{q['_id']}", "text", QUERY, str(q["text"]), f"q:{q['_id']}",
                   SPLIT, {"label": str(q["_id"])}) for q in queries]
    truth = {f"{name}:query:{q}": tuple(f"{name}:doc:{d}" for d in docs_)
             for q, docs_ in qrels.items()}
    return _benchmark(name, folder, qitems, docs, source, relevance="qrels", qrels=truth)
