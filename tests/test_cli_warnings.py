"""The CLI prints the package's own warnings as one line, and recorders still see them."""

from __future__ import annotations

import warnings

import pytest

import modalign.cli as cli


def test_package_warning_is_one_line_and_other_warnings_keep_their_format() -> None:
    fmt = cli._warning_formatter("embed")
    assert fmt("3 rows skipped", UserWarning, cli.__file__, 10) == (
        "modalign embed: warning: 3 rows skipped\n")
    other = fmt("deprecated", DeprecationWarning, "/elsewhere/lib.py", 7)
    assert other.startswith("/elsewhere/lib.py:7: DeprecationWarning: deprecated")


def test_main_restores_the_formatter_and_warnings_stay_recordable(monkeypatch) -> None:
    def func(args):
        warnings.warn_explicit("from the package", UserWarning, cli.__file__, 1)
        return 0

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda commands=None: parser)
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.choices["data"].set_defaults(func=func)
    before = warnings.formatwarning
    with pytest.warns(UserWarning, match="from the package"):
        assert cli.main(["data"]) == 0
    assert warnings.formatwarning is before
