"""Every benchmark loader on a tiny fixture written in the dataset's published layout."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from modalign.data.benchmarks import (
    BENCHMARKS,
    CLASSIFICATION_BENCHMARKS,
    COOP_TEMPLATES,
    OPENAI_IMAGENET_TEMPLATES,
    benchmark_folder,
    convert_ground_truth,
    load_benchmark,
    load_coop,
    load_karpathy,
    load_nanobeir,
    load_revisited,
    read_ground_truth,
)
from modalign.data.benchmarks.revisited import GroundTruthUnpickler
from modalign.errors import ModalignError
from reproduce_fixtures import (
    COOP_CLASSES,
    write_coop,
    write_cub,
    write_karpathy,
    write_nocaps,
    write_revisited,
    write_sop,
)


def _files_exist(bench) -> None:
    for it in bench.dataset.items:
        if it.modality == "image":
            assert bench.dataset.resolve(it).is_file(), it


@pytest.mark.parametrize("name", ["coco", "flickr30k"])
def test_karpathy_items_groups_and_text_protocol(tmp_path: Path, name: str) -> None:
    write_karpathy(tmp_path, name, n_images=6, captions=3)
    bench = load_benchmark(name, tmp_path)
    ds = bench.dataset
    _files_exist(bench)
    assert len(ds.select(modality="image")) == 6 and len(ds.select(modality="text")) == 18
    # restval counts as train; every image is one group holding the image and its 3 captions
    assert Counter(it.split for it in ds.select(modality="image")) == {"train": 2, "val": 2,
                                                                       "test": 2}
    for g in ds.groups():
        members = [it for it in ds.items if it.group == g]
        assert [it.modality for it in members] == ["image", "text", "text", "text"]
        assert [it.view for it in members[1:]] == ["first-caption", "caption", "caption"]
        assert members[1].value.endswith("caption 0")
    proto = bench.protocols["text-to-text"]
    split = "test" if name == "coco" else "val"
    queries, gallery = proto.query.select(ds), proto.gallery.select(ds)
    assert len(queries) == 2 and len(gallery) == 4
    assert all(q.split == split and q.value.endswith("caption 0") for q in queries)
    assert not {q.id for q in queries} & {g.id for g in gallery}
    assert {it.split for it in bench.protocols["image-to-text"].query.select(ds)} == {"test"}


def test_karpathy_text_only_needs_no_images(tmp_path: Path) -> None:
    folder = write_karpathy(tmp_path, "coco")
    for p in (folder / "val2014").iterdir():
        p.unlink()
    with pytest.raises(FileNotFoundError, match="val2014"):
        load_karpathy("coco", tmp_path)
    bench = load_karpathy("coco", tmp_path, with_images=False)
    assert bench.dataset.modalities == ["text"]


def test_nocaps(tmp_path: Path) -> None:
    write_nocaps(tmp_path, n_images=4, captions=3)
    bench = load_benchmark("nocaps", tmp_path)
    _files_exist(bench)
    ds = bench.dataset
    assert len(ds.select(modality="text", view="first-caption")) == 4
    assert {it.split for it in ds.items} == {"test"}
    first = ds.select(modality="text", view="first-caption")[0]
    assert first.value.endswith("caption 0")  # annotations sorted by id, the first one queries


def test_cub(tmp_path: Path) -> None:
    write_cub(tmp_path, n_classes=3, per_class=3)
    bench = load_benchmark("cub2011", tmp_path)
    _files_exist(bench)
    assert bench.classnames == ["Bird 1 Species", "Bird 2 Species", "Bird 3 Species"]
    items = bench.dataset.items
    assert len(items) == 9 and Counter(it.group for it in items) == {
        "Bird 1 Species": 3, "Bird 2 Species": 3, "Bird 3 Species": 3}
    proto = bench.protocols["image-to-image"]
    assert proto.exclude_self and proto.query.split is None
    assert len(proto.query.select(bench.dataset)) == 9 == len(proto.gallery.select(bench.dataset))
    assert Counter(it.split for it in items) == {"test": 6, "train": 3}  # 1 = train


def test_sop(tmp_path: Path) -> None:
    write_sop(tmp_path, n_products=3, per_product=2)
    bench = load_benchmark("sop", tmp_path)
    _files_exist(bench)
    proto = bench.protocols["image-to-image"]
    queries = proto.query.select(bench.dataset)
    assert len(queries) == 6 and proto.exclude_self
    assert Counter(q.group for q in queries) == {f"product:{p}": 2 for p in (101, 102, 103)}
    assert queries[0].labels["category"] == "bicycle"


def test_sop_bad_header(tmp_path: Path) -> None:
    folder = write_sop(tmp_path)
    (folder / "Ebay_test.txt").write_text("id class path\n1 1 x.jpg\n")
    with pytest.raises(ValueError, match="header"):
        load_benchmark("sop", tmp_path)


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_revisited_pickle_distractors_and_levels(tmp_path: Path, name: str) -> None:
    write_revisited(tmp_path, name, n_db=8, n_queries=2, distractors=2)
    bench = load_benchmark(name, tmp_path)
    _files_exist(bench)
    ds = bench.dataset
    assert [len(ds.select(view=v)) for v in ("query", "database", "distractor")] == [2, 8, 2]
    assert ds.info["distractors"] == 2  # the listed-but-missing one is left out
    gt = bench.revisited
    assert gt is not None and gt.queries == tuple(it.id for it in ds.select(view="query"))
    db = [it.id for it in ds.select(view="database")]
    rel, ign = gt.relevant_and_ignored("medium")[1]
    assert rel == {db[1], db[3], db[5]} and ign == {db[7]}
    rel, ign = gt.relevant_and_ignored("easy")[0]
    assert rel == {db[0], db[2]} and ign == {db[4], db[6]}
    rel, ign = gt.relevant_and_ignored("hard")[0]
    assert rel == {db[4]} and ign == {db[0], db[2], db[6]}
    assert len(bench.protocols["image-to-image"].gallery.select(ds)) == 10


def test_revisited_json_copy_matches_pickle(tmp_path: Path) -> None:
    folder = write_revisited(tmp_path, distractors=0)
    pkl = folder / "gnd_roxford5k.pkl"
    from_pickle = read_ground_truth(pkl)
    out = convert_ground_truth(pkl)
    assert out == folder / "gnd_roxford5k.json" and read_ground_truth(out) == from_pickle
    pkl.unlink()  # the JSON copy alone is enough
    assert load_revisited("roxford5k", tmp_path).revisited is not None


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo should-not-run",))


def test_ground_truth_unpickler_refuses_code(tmp_path: Path) -> None:
    folder = write_revisited(tmp_path, distractors=0)
    evil = {"imlist": [], "qimlist": [], "gnd": [], "x": _Boom()}
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(evil))
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        load_revisited("roxford5k", tmp_path)
    import io

    arr = GroundTruthUnpickler(io.BytesIO(pickle.dumps(np.arange(3)))).load()
    assert arr.tolist() == [0, 1, 2]


def test_revisited_index_out_of_range(tmp_path: Path) -> None:
    folder = write_revisited(tmp_path, n_db=8, distractors=0)
    gt = read_ground_truth(folder / "gnd_roxford5k.pkl")
    gt["gnd"][0]["junk"] = [8]
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gt))
    with pytest.raises(ValueError, match=r"junk.*outside"):
        load_revisited("roxford5k", tmp_path)


@pytest.mark.parametrize("name", CLASSIFICATION_BENCHMARKS)
def test_coop(tmp_path: Path, name: str) -> None:
    write_coop(tmp_path, name, {"train": 2, "val": 1, "test": 1})
    bench = load_benchmark(name, tmp_path)
    _files_exist(bench)
    assert bench.classnames == list(COOP_CLASSES)
    assert bench.templates == (COOP_TEMPLATES[name],) and bench.classification_split == "test"
    counts = Counter(it.split for it in bench.dataset.items)
    assert counts["train"] == 6 and counts["test"] == 3
    assert counts.get("val", 0) == (0 if name == "imagenet" else 3)
    for it in bench.dataset.items:
        assert it.group == it.labels["class"] == COOP_CLASSES[int(it.labels["label"])]
    proto = bench.protocols["image-to-image"]
    assert (proto.query.split, proto.gallery.split, proto.exclude_self) == ("test", "train", False)
    assert bench.prompts()[0] == [COOP_TEMPLATES[name].format("sea lion")]


def test_coop_also_found_under_coop_folder(tmp_path: Path) -> None:
    write_coop(tmp_path / "CoOp", "dtd")
    assert load_benchmark("dtd", tmp_path).classnames == list(COOP_CLASSES)


def test_coop_inconsistent_label(tmp_path: Path) -> None:
    folder = write_coop(tmp_path, "dtd")
    import json

    path = folder / "split_zhou_DescribableTextures.json"
    data = json.loads(path.read_text())
    data["test"][0][2] = "renamed"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="named both"):
        load_benchmark("dtd", tmp_path)


@pytest.mark.parametrize(("name", "writer", "missing"), [
    ("coco", lambda r: write_karpathy(r, "coco"), "dataset_coco.json"),
    ("flickr30k", lambda r: write_karpathy(r, "flickr30k"), "dataset_flickr30k.json"),
    ("nocaps", write_nocaps, "nocaps_val_4500_captions.json"),
    ("cub2011", write_cub, "train_test_split.txt"),
    ("sop", write_sop, "Ebay_test.txt"),
    ("roxford5k", lambda r: write_revisited(r, distractors=0), "gnd_roxford5k.pkl"),
    ("oxford_pets", lambda r: write_coop(r, "oxford_pets"), "split_zhou_OxfordPets.json"),
    ("fgvc_aircraft", lambda r: write_coop(r, "fgvc_aircraft"), "images_variant_test.txt"),
    ("imagenet", lambda r: write_coop(r, "imagenet"), "classnames.txt"),
])
def test_missing_file_names_the_expected_path(tmp_path: Path, name, writer, missing) -> None:
    folder = writer(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_benchmark(name, tmp_path)
    assert str(folder / missing) in str(e.value)


def test_missing_image_named(tmp_path: Path) -> None:
    folder = write_coop(tmp_path, "oxford_pets")
    victim = next((folder / "images").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=str(victim)):
        load_benchmark("oxford_pets", tmp_path)


def test_missing_dataset_folder_lists_candidates(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"caltech-101.*CoOp/caltech-101"):
        load_benchmark("caltech101", tmp_path)


def test_registry_and_templates() -> None:
    assert len(CLASSIFICATION_BENCHMARKS) == 11
    assert {"coco", "flickr30k", "nocaps", "cub2011", "sop", "roxford5k", "rparis6k"} < set(
        BENCHMARKS)
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(OPENAI_IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)
    assert set(COOP_TEMPLATES) == set(CLASSIFICATION_BENCHMARKS)
    with pytest.raises(ValueError, match="name='nope'"):
        load_benchmark("nope", ".")


@pytest.mark.parametrize(("load", "choices"), [
    (load_karpathy, "coco, flickr30k"), (load_revisited, "roxford5k, rparis6k"),
    (load_coop, "caltech101, dtd, eurosat, "), (load_nanobeir, "nanobeir_climatefever, "),
    (load_benchmark, "20newsgroups, caltech101, coco, ")])
def test_named_loaders_reject_an_unknown_name_listing_theirs(tmp_path: Path, load,
                                                             choices) -> None:
    with pytest.raises(ModalignError, match=rf"^name='nope': expected one of {choices}"):
        load("nope", tmp_path)


def test_benchmark_folder_names_each_loaders_folder(tmp_path: Path) -> None:
    """``benchmark_folder`` and the loaders share one folder name per benchmark."""
    for name, folder in [("cub2011", "CUB_200_2011"), ("sop", "Stanford_Online_Products"),
                         ("nocaps", "nocaps"), ("coco", "coco"), ("caltech101", "caltech-101"),
                         ("roxford5k", "roxford5k"), ("imdb", "IMDB_Reviews")]:
        assert benchmark_folder(name) == folder
        with pytest.raises(FileNotFoundError, match=f"{tmp_path / folder}"):
            load_benchmark(name, tmp_path)
    with pytest.raises(ModalignError, match="name='nope'"):
        benchmark_folder("nope")
