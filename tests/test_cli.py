from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tqdm import tqdm

from modalign.cli import COMMANDS, build_parser, main


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "data" in out and "embed" in out


def test_every_subcommand_has_useful_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for name, subparser in sub.choices.items():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: modalign {name}"), name
        options = [a for a in subparser._actions if a.option_strings and a.help != "==SUPPRESS=="]
        # every option is listed, and says what it does
        assert [a.option_strings for a in options if not a.help] == [], name
        missing = [a.option_strings[-1] for a in options if a.option_strings[-1] not in out]
        assert missing == [], name


def test_data_and_embed_commands(tmp_path, capsys):
    assert main(["data", "build", "emoji", "--limit", "5", "--styles", "openmoji",
                 "--root", str(tmp_path / "d")]) == 0
    assert "groups" in capsys.readouterr().out
    assert main(["embed", "--data", str(tmp_path / "d"), "--modalities", "text",
                 "--out", str(tmp_path / "s")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["arrays"] == ["text"]


def test_embed_progress_bar_can_be_switched_off(tmp_path, capsys, monkeypatch):
    # the encoding's bar is shown where the terminal allows (disable=None) unless --no-progress
    import modalign.embed.encode as encode

    settings = []

    def recording_bar(*args, **kwargs):
        settings.append(kwargs.get("disable"))
        return tqdm(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(encode, "tqdm", recording_bar)
    (tmp_path / "d.csv").write_text("text\nred\nblue\n")
    for i, flags in enumerate(([], ["--no-progress", "--debug"])):
        assert main(["embed", "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / f"s{i}"),
                     *flags]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arrays"] == ["text"]
    assert settings == [None, True]


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "absent.csv")]) == 2
    err = capsys.readouterr().err
    assert "modalign data: error:" in err and "absent.csv" in err


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "modalign", "--version"], capture_output=True,
                       text=True, check=True)
    assert r.stdout.startswith("modalign ")


def test_torch_failures_keep_their_traceback_and_user_errors_stay_one_line(tmp_path, capsys,
                                                                           monkeypatch):
    """Before: ``cli.main`` caught RuntimeError, so a real torch failure (CUDA out of memory, a
    shape bug) was reduced to one line without its traceback."""
    from modalign.data import cli as data_cli
    from modalign.errors import ModalignError

    def torch_fails(args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(data_cli, "_check", torch_fails)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        main(["data", "check", str(tmp_path)])

    def user_error(args):
        raise ModalignError("--k must be a positive integer, got 0")

    monkeypatch.setattr(data_cli, "_check", user_error)
    assert main(["data", "check", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("modalign data: error: --k must be a positive integer, "
                                       "got 0\n")


def test_a_bad_device_is_a_user_error_not_a_torch_traceback(tmp_path, capsys):
    """torch.device('gpu0') raises RuntimeError, which the CLI no longer reduces to one line:
    the commands resolve --device themselves."""
    p = tmp_path / "d.csv"
    p.write_text("text\nred\nblue\n")
    assert main(["embed", "--data", str(p), "--out", str(tmp_path / "s"),
                 "--device", "gpu0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "modalign embed: error: --device='gpu0' is not a device; expected 'auto', 'cpu', "
        "'cuda' or 'cuda:N'")
