from __future__ import annotations

import shutil
import warnings

import pytest
from PIL import Image

from modalign.data import EmojiOptions, PairedDataset, build_emoji, load_dataset, split_of
from modalign.data import emoji as emoji_mod

SMALL = EmojiOptions(limit=12)


def test_build_small_emoji(tmp_path):
    ds = build_emoji(SMALL, root=tmp_path / "emoji", progress=False)
    assert len(ds.groups()) == 12
    styles = [s for s in ("noto", "openmoji") if s != "noto" or emoji_mod.NOTO_FONT.exists()]
    assert ds.views("image") == sorted(styles)
    # one image per style and one name per concept, every concept in exactly one split
    for g in ds.groups():
        items = [it for it in ds.items if it.group == g]
        assert {it.split for it in items} == {split_of(g)}
        assert sum(it.modality == "text" and it.view == "name" for it in items) == 1
        assert sorted(it.view for it in items if it.modality == "image") == sorted(styles)
    img_item = ds.select(modality="image")[0]
    with Image.open(ds.resolve(img_item)) as im:
        assert im.size == (96, 96) and im.mode == "RGB"
        extrema = im.convert("L").getextrema()
        assert extrema[0] < 200 and extrema[1] == 255  # a drawing on white, not a blank tile
    names = [it.value for it in ds.select(modality="text", view="name")]
    assert "grinning face" in names
    labels = ds.select(modality="text", view="name")[0].labels
    if emoji_mod.EMOJI_TEST.exists():
        assert labels["group"] == "Smileys & Emotion" and labels["subgroup"] == "face-smiling"
    # reusing the cache returns the same dataset without rendering again
    again = build_emoji(SMALL, root=tmp_path / "emoji", progress=False)
    assert [it.to_dict() for it in again.items] == [it.to_dict() for it in ds.items]


def test_split_is_stable_and_proportional():
    # SHA-256 based: these keys land in the same split on every machine and every build
    assert [split_of(k) for k in ("1F600", "1F469-200D-1F680", "1F1EB-1F1F7")] == [
        split_of("1F600"), split_of("1F469-200D-1F680"), split_of("1F1EB-1F1F7")]
    splits = [split_of(f"key{i}") for i in range(5000)]
    assert 0.77 < splits.count("train") / 5000 < 0.83
    assert 0.08 < splits.count("val") / 5000 < 0.12
    with pytest.raises(ValueError, match="fractions"):
        split_of("x", (0.5, 0.5, 0.5))


def test_full_concept_list_filters():
    concepts = emoji_mod.list_concepts(EmojiOptions())
    by_code = {c.code: c for c in concepts}
    assert by_code["1F600"].emoji == "\U0001F600" and by_code["1F600"].name == "grinning face"
    assert by_code["1FAE0"].version == 14.0  # melting face
    older = {c.code for c in emoji_mod.list_concepts(EmojiOptions(max_version=13.0))}
    assert "1F600" in older and "1FAE0" not in older and older < set(by_code)
    assert "1F44D-1F3FD" not in by_code  # thumbs up: medium skin tone
    assert all(c.version <= 15.0 for c in concepts)
    assert not any(ch in emoji_mod.SKIN_TONES for c in concepts for ch in c.emoji)
    with_tones = emoji_mod.list_concepts(EmojiOptions(skin_tones=True))
    assert "1F44D-1F3FD" in {c.code for c in with_tones}
    assert {c.code for c in concepts} < {c.code for c in with_tones}
    assert len({c.code for c in concepts}) == len(concepts)


def test_build_killed_half_way_is_completed(tmp_path, monkeypatch):
    root = tmp_path / "emoji"
    calls = {"n": 0}
    real_render = emoji_mod._Renderer.render

    def flaky(self, e):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real_render(self, e)

    monkeypatch.setattr(emoji_mod._Renderer, "render", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_emoji(SMALL, root=root, progress=False)
    assert not (root / "dataset.json").exists()
    assert not list(root.rglob("*.tmp"))  # no half-written file left behind
    written = sorted(root.rglob("*.png"))
    assert len(written) == 7
    monkeypatch.setattr(emoji_mod._Renderer, "render", real_render)
    ds = build_emoji(SMALL, root=root, progress=False)
    assert (root / "dataset.json").exists()
    assert all(ds.resolve(it).exists() for it in ds.select(modality="image"))


def test_missing_noto_font_falls_back_to_openmoji(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji_mod, "NOTO_FONT", tmp_path / "absent.ttf")
    with pytest.warns(UserWarning, match="noto"):
        ds = build_emoji(EmojiOptions(limit=5), root=tmp_path / "e", progress=False)
    assert ds.views("image") == ["openmoji"]
    assert "noto" in ds.info["skipped_sources"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_speech_items(tmp_path):
    ds = build_emoji(EmojiOptions(limit=3, speech=True, styles=("openmoji",)),
                     root=tmp_path / "s", progress=False)
    audio = ds.select(modality="audio")
    assert sorted({a.view for a in audio}) == ["en-gb", "en-us"] and len(audio) == 6
    with open(ds.resolve(audio[0]), "rb") as f:
        assert f.read(4) == b"RIFF"


def test_languages_and_bad_options(tmp_path):
    ds = build_emoji(EmojiOptions(limit=4, languages=("fr",), styles=("openmoji",)),
                     root=tmp_path / "l", progress=False)
    assert "lang:fr" in ds.views("text")
    with pytest.raises(ValueError, match="languages"):
        build_emoji(EmojiOptions(limit=4, languages=("xx",)), root=tmp_path / "x")
    with pytest.raises(ValueError, match="styles"):
        EmojiOptions(styles=("comic",))
    with pytest.raises(ValueError, match="size"):
        EmojiOptions(size=4)


def test_load_dataset_specs(tmp_path):
    ds = load_dataset("emoji:limit=6,styles=openmoji,size=32")
    assert isinstance(ds, PairedDataset) and len(ds.groups()) == 6
    assert PairedDataset.load(ds.root).counts() == ds.counts()
    with pytest.raises(ValueError, match="unknown emoji option"):
        load_dataset("emoji:colour=red")
    with pytest.raises(ValueError, match="expected 'emoji'"):
        load_dataset(tmp_path / "nothing.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileNotFoundError):
            PairedDataset.load(tmp_path)
