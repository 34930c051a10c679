"""Manifests as real users write them: BOMs, stray commas, odd encodings, broken images."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bad_files import bomb_png, garbage_png
from modalign.cli import main
from modalign.data import load_manifest
from modalign.embed import EmbeddingStore
from modalign.encoders.images import to_rgb
from modalign.errors import ModalignError


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (8, 8), "red").save(root / "a.png")
    Image.new("RGB", (8, 8), "blue").save(root / "b.png")
    (root / "garbage.png").write_bytes(garbage_png())
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "notanimage.png").write_bytes(b"hello")
    return root


def test_csv_with_a_byte_order_mark(images):
    """Before: the first column (\\ufeffimage) was dropped and "skipped 0" printed."""
    p = images / "bom.csv"
    p.write_bytes("image,text\na.png,a red square\nb.png,a blue square\n".encode("utf-8-sig"))
    ds, report = load_manifest(p)
    assert ds.modalities == ["image", "text"] and report.items == 4
    j = images / "bom.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hi"}).encode() + b"\n")
    assert load_manifest(j)[1].items == 1


def test_repeated_column_names_are_refused(images):
    """Before: the first ``text`` column was silently dropped."""
    p = images / "dup.csv"
    p.write_text("image,text,text\na.png,one,two\n")
    with pytest.raises(ModalignError, match=r"column names \['text'\] appear more than once"):
        load_manifest(p)


def test_unquoted_comma_counts_the_row_as_bad(images, capsys):
    """Before: AttributeError 'NoneType' ... startswith, and the whole manifest failed."""
    p = images / "comma.csv"
    p.write_text("image,text,label\na.png,a cat, sleeping,cat\nb.png,a dog,dog\n")
    _, report = load_manifest(p)
    assert report.rows == 2 and report.items == 2
    (bad,) = report.skipped
    assert bad["line"] == 2 and "too many fields" in bad["reason"] and "'cat'" in bad["reason"]
    assert main(["data", "check", str(p)]) == 0
    assert "line 2: too many fields" in capsys.readouterr().out


def test_decompression_bomb_and_undecodable_png_are_counted_skips(images):
    """Before: a DecompressionBombError traceback; a PNG with garbage compressed data passed
    ``data check`` (which only verified the chunk checksums)."""
    p = images / "bad_images.csv"
    p.write_text("image,text\na.png,ok\nbomb.png,bomb\ngarbage.png,garbage\n")
    _, report = load_manifest(p)
    reasons = {s["line"]: s["reason"] for s in report.skipped}
    assert "decompression bomb" in reasons[3] and "bomb.png" in reasons[3]
    assert "unreadable image" in reasons[4] and "garbage.png" in reasons[4]
    with pytest.raises(ModalignError, match=r"bomb\.png: refused as a possible decompression bomb"):
        to_rgb(images / "bomb.png")


def test_large_jpeg_is_decoded_at_reduced_size(tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1600), "green").save(big, quality=50)
    small = to_rgb(big, min_side=96)
    assert 96 <= min(small.size) <= 400 and small.getpixel((5, 5))[1] > 100


def test_manifest_not_utf8_names_the_line(images, capsys):
    p = images / "latin.csv"
    p.write_bytes("text,label\nhello,a\ncaf\xe9 au lait,b\n".encode("latin-1"))
    with pytest.raises(ModalignError, match=r"latin\.csv, line 3: byte 0xe9 is not UTF-8"):
        load_manifest(p)
    assert main(["data", "check", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected a UTF-8 file" in err


def test_duplicate_ids_skip_the_later_rows(images):
    """Before: the whole manifest was rejected with no row numbers."""
    p = images / "ids.csv"
    p.write_text("id,text\nx,one\ny,two\nx,three\n")
    ds, report = load_manifest(p)
    assert [it.value for it in ds.items] == ["one", "two"]
    assert report.skipped == [{"row": 2, "line": 4,
                               "reason": "duplicate id: 'x' (first on line 2)"}]


def test_paths_outside_the_folder_are_allowed_and_counted(images, tmp_path, capsys):
    sub = tmp_path / "sub"
    sub.mkdir()
    p = sub / "out.csv"
    p.write_text(f"image,text\n../../{images.name}/a.png,one\n{images / 'b.png'},two\n")
    ds, report = load_manifest(p)
    assert len(ds.select(modality="image")) == 2 and len(report.outside) == 2
    main(["data", "check", str(p)])
    assert "2 file paths lead outside the manifest's folder" in capsys.readouterr().out


def test_custom_modality_embeds_with_a_tower_of_its_kind(images, tmp_path, capsys):
    """``--tower sketch=effnet-lite0`` (the --help example). Before: "effnet-lite0 is a image
    tower, got modality='sketch'"."""
    p = images / "sketch.csv"
    p.write_text("sketch:drawing,text\na.png,red\nb.png,blue\n")
    out = tmp_path / "store"
    assert main(["embed", "--data", str(p), "--out", str(out), "--modalities", "sketch",
                 "--tower", "sketch=effnet-lite0:image_size=32", "--verify"]) == 0
    store = EmbeddingStore(out)
    assert store.info("sketch")["count"] == 2 and store.load("sketch").vectors.shape == (2, 1280)
    assert "sketch: ok" in capsys.readouterr().out


def test_embed_skips_an_undecodable_image_by_name(images, tmp_path, capsys):
    """Before: ``OSError: broken data stream`` without the file name, on every rerun."""
    p = images / "embed_bad.csv"
    p.write_text("image,text\na.png,red\ngarbage.png,broken\nb.png,blue\n")
    from modalign.data import load_manifest as lm
    from modalign.data.dataset import PairedDataset
    from modalign.embed import embed_dataset
    from modalign.encoders import load_encoder

    ds, _ = lm(p, verify_images=False)  # as if the file broke after `data check`
    ds = PairedDataset(ds.name, ds.items, root=ds.root)
    store = embed_dataset(ds, {"image": load_encoder("effnet-lite0:image_size=32")},
                          tmp_path / "s", progress=False)
    assert store.info("image")["count"] == 2
    assert [s["id"] for s in store.info("image")["skipped"]] == ["1/image/default"]
    assert "garbage.png" in capsys.readouterr().err


# -- the fuzz test ---------------------------------------------------------------------------

CELL_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                    max_size=12)
FILES = ["a.png", "b.png", "garbage.png", "notanimage.png", "missing.png", ""]


@st.composite
def manifests(draw):
    extra = draw(st.lists(st.sampled_from(["label", "group", "split", "id", "text:title",
                                           "text"]), max_size=3))
    header = ["image", "text", *extra]
    n = draw(st.integers(1, 6))
    quoted = draw(st.booleans())
    rows = []
    for _ in range(n):
        row = []
        for col in header:
            if col == "image":
                row.append(draw(st.sampled_from(FILES)))
            elif col == "split":
                row.append(draw(st.sampled_from(["", "train", "test", "val", "holdout"])))
            elif col == "id":
                row.append(draw(st.sampled_from(["", "1", "2", "x"])))
            else:
                text = draw(CELL_TEXT)
                if not quoted:  # what a hand-written file holds: no quotes, no line breaks
                    text = "".join(c for c in text if c not in '"\r\n\x0b\x0c\x1c\x1d\x1e\x85'
                                   "\u2028\u2029")
                row.append(text)
        if not quoted and draw(st.booleans()):
            row.append(draw(CELL_TEXT.filter(lambda t: "\n" not in t and "\r" not in t)))
        rows.append(row)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    buf = io.StringIO()
    if draw(st.booleans()):  # JSON lines: one object per row, some lines broken
        ascii_only = draw(st.booleans())
        for row in rows:
            if draw(st.integers(0, 5)) == 0:
                buf.write('{"text": "unterminated' + newline)
            else:
                buf.write(json.dumps(dict(zip(header, row)), ensure_ascii=ascii_only) + newline)
        header = list(dict.fromkeys(header))  # a JSON object cannot repeat a key
        return ".jsonl", header, rows, _encode(draw, buf.getvalue())
    if quoted:
        # csv.writer quotes a cell holding only the line terminator's characters; a lone "\r"
        # under a "\n" terminator would be written bare (a line break to every reader)
        quoting = csv.QUOTE_ALL if newline == "\n" else csv.QUOTE_MINIMAL
        csv.writer(buf, lineterminator=newline, quoting=quoting).writerows([header, *rows])
    else:
        buf.write(newline.join(",".join(r) for r in [header, *rows]) + newline)
    return ".csv", header, rows, _encode(draw, buf.getvalue())


def _encode(draw, text: str) -> bytes:
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode("utf-8")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(manifest=manifests())
def test_fuzzed_manifests_never_lose_a_row_silently(images, manifest):
    suffix, header, rows, data = manifest
    path = images / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        data.decode("utf-8-sig")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    try:
        ds, report = load_manifest(path)
    except ModalignError as e:  # refused as a whole: one clear error
        msg = str(e)
        assert path.name in msg
        assert (not utf8 and "not UTF-8" in msg) or "appear more than once" in msg or \
            "every row" in msg, msg
        if len(set(header)) == len(header) and utf8:
            assert "every row" in msg
        return
    assert utf8 and len(set(header)) == len(header)
    assert report.rows == len(rows)
    accounted = report.loaded_lines | {s["line"] for s in report.skipped}
    assert len(accounted) == report.rows  # every row loaded or skipped with a reason
    assert all(s["reason"] for s in report.skipped)
    assert report.items == len(ds.items) > 0
