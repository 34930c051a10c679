from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modalign.cli import build_parser, main


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "data" in out and "embed" in out


def test_every_subcommand_has_useful_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert len(sub.choices) >= 2
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"modalign {name}" in out and len(out) > 150, name


def test_data_and_embed_commands(tmp_path, capsys):
    assert main(["data", "build", "emoji", "--limit", "5", "--styles", "openmoji",
                 "--root", str(tmp_path / "d")]) == 0
    assert "groups" in capsys.readouterr().out
    assert main(["embed", "--data", str(tmp_path / "d"), "--modalities", "text",
                 "--out", str(tmp_path / "s")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["arrays"] == ["text"]


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "absent.csv")]) == 2
    err = capsys.readouterr().err
    assert "modalign data: error:" in err and "absent.csv" in err


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "modalign", "--version"], capture_output=True,
                       text=True, check=True)
    assert r.stdout.startswith("modalign ")
