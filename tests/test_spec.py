"""One value parser and one key=value splitter for specs, overrides and --tower."""

from __future__ import annotations

import pytest

from modalign.errors import ModalignError
from modalign.spec import parse_spec, parse_value, split_key_value
from modalign.train.config import parse_override


@pytest.mark.parametrize("text,value", [
    ("48", 48), ("5e-3", 0.005), ("-2", -2), ("true", True), ("False", False),
    ("[1, 2]", [1, 2]), ('"a,b"', "a,b"), ("noto", "noto"), ("x/y.npy", "x/y.npy"),
    ("2024-01-02", "2024-01-02"), ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
    (" 7 ", 7),
])
def test_parse_value(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_every_key_value_parser_is_the_same_one():
    assert parse_override("optim.lr = 1e-3") == ("optim.lr", 0.001)
    assert parse_spec("effnet-lite0:image_size=48,pretrained=false").options == {
        "image_size": 48, "pretrained": False}
    assert split_key_value("sketch=effnet-lite0:image_size=48", "--tower") == (
        "sketch", "effnet-lite0:image_size=48")
    for text in ("optim.lr", "=3", " = "):
        with pytest.raises(ModalignError, match=r"^override .*: expected section\.key=value"):
            parse_override(text)
    with pytest.raises(ModalignError, match="option 'a' is given twice"):
        parse_spec("x:a=1,a=2")


def test_embed_tower_needs_a_modality(tmp_path, capsys):
    from modalign.cli import main

    p = tmp_path / "d.csv"
    p.write_text("text\nred\nblue\n")
    assert main(["embed", "--data", str(p), "--out", str(tmp_path / "s"),
                 "--tower", "effnet-lite0:image_size=48"]) == 2
    assert capsys.readouterr().err.strip() == (
        "modalign embed: error: --tower 'effnet-lite0:image_size=48': expected MODALITY=SPEC, "
        "e.g. --tower sketch=effnet-lite0:image_size=48")
