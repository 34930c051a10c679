"""The shared parser helpers every ``register()`` uses: commands, groups, --debug, help layout."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from modalign import cli
from modalign.cli_support import HelpFormatter, add_command, add_command_group, add_debug_flag


def _root() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="modalign")
    return parser, parser.add_subparsers(dest="command")


def test_add_command_sets_run_help_and_debug():
    parser, sub = _root()
    p = add_command(sub, "hello", help="say hello", description="Say hello.",
                    run=lambda args: 7)
    p.add_argument("--name", default="x")
    add_debug_flag(p)
    args = parser.parse_args(["hello", "--debug"])
    assert (args.func(args), args.debug, args.name) == (7, True, "x")
    assert sub.choices["hello"] is p
    assert [a.dest for a in p._actions] == ["help", "name", "debug"]  # --debug last, as added
    assert sub._choices_actions[0].help == "say hello"


@pytest.mark.parametrize("exit_code", [0, 2])
def test_group_prints_help_and_returns_its_code(exit_code):
    parser, sub = _root()
    inner = add_command_group(sub, "lab", help="experiments", description="Experiments.",
                              dest="experiment", metavar="EXPERIMENT", exit_code=exit_code)
    add_command(inner, "gap", help="the sweep", run=lambda args: 5)
    args = parser.parse_args(["lab"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == exit_code
    assert out.getvalue().startswith("usage: modalign lab [-h] EXPERIMENT")
    args = parser.parse_args(["lab", "gap"])  # the inner command's run wins
    assert (args.experiment, args.func(args)) == ("gap", 5)


def test_group_without_exit_code_sets_no_function():
    parser, sub = _root()
    add_command_group(sub, "lab", help="experiments", dest="experiment", metavar="E")
    assert getattr(parser.parse_args(["lab"]), "func", None) is None


@pytest.mark.parametrize(("argv", "code", "usage"), [
    (["data"], 0, "modalign data [-h]"), (["index"], 2, "modalign index [-h]"),
    (["reproduce"], 2, "modalign reproduce [-h]"), (["lab"], 2, "modalign [-h]")])
def test_command_groups_of_modalign_keep_their_exit_codes(argv, code, usage):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == code
    assert out.getvalue().startswith(f"usage: {usage}")


def test_formatter_fills_prose_and_keeps_indented_lines():
    prose = ("Fit a map from one modality's joint embeddings toward another's: see "
             "--eval-split and 'modalign eval --bridge learned:path=DIR/ID'.")
    example = "  modalign fit-bridge --embeddings STORE --kind mlp --source image --out bridges"
    text = f"{prose}\nSecond sentence of the same paragraph.\n\nexamples:\n{example}\n"
    out = HelpFormatter("modalign")._fill_text(text, 30, "  ")
    lines = out.split("\n")
    para = lines[:lines.index("")]
    assert all(len(line) <= 30 and line.startswith("  ") for line in para)
    assert " ".join(line.strip() for line in para) == (
        prose + " Second sentence of the same paragraph.")
    assert "--eval-split" in out and "DIR/ID'." in out  # no break inside a hyphenated word
    assert lines[lines.index("") + 1:] == ["  examples:", "  " + example]  # never re-wrapped


def test_every_command_help_fits_the_terminal(monkeypatch):
    """No --help of any command prints a line past the terminal width."""
    monkeypatch.setenv("COLUMNS", "100")
    parser = cli.build_parser()

    def walk(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in dict.fromkeys(action.choices.values()):
                    yield from walk(child)

    seen = 0
    for p in walk(parser):
        text = p.format_help()
        assert "%%" not in text, p.prog  # argparse %-formats option help, not a description
        for line in text.splitlines():
            assert len(line) <= 100, (p.prog, line)
        seen += 1
    assert seen >= 25
