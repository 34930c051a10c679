"""What every ``modalign`` subcommand's ``register(subparsers)`` builds its parser with.

:func:`add_command` adds one subcommand (help line, description, examples epilog, the function
that runs it); :func:`add_command_group` one that only holds further subcommands;
:func:`add_debug_flag` the ``--debug`` switch that makes :func:`modalign.cli.main` show the
traceback of an error instead of its one line. Help text is printed by :class:`HelpFormatter`:
prose is filled to the terminal width, indented lines (command examples, tables) stay as written.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="modalign")
    >>> sub = parser.add_subparsers(dest="command")
    >>> p = add_command(sub, "hello", help="say hello", description="Say hello.",
    ...                 run=lambda args: 0)
    >>> add_debug_flag(p)
    >>> args = parser.parse_args(["hello", "--debug"])
    >>> args.func(args), args.debug
    (0, True)
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

Run = Callable[[argparse.Namespace], int]

__all__ = ["HelpFormatter", "Run", "add_command", "add_command_group", "add_debug_flag"]


class HelpFormatter(argparse.HelpFormatter):
    """Fill each prose paragraph of a description or epilog; keep indented lines as written.

    A paragraph is a run of lines that start with a non-space character; a blank or indented line
    ends it. Indented lines are examples to copy or aligned tables, so they are never re-wrapped;
    nor is a line broken inside a word (``--eval-split`` stays whole).

    Example:
        >>> text = "A long sentence that wraps.\\n\\nexamples:\\n  modalign demo --quick"
        >>> print(HelpFormatter("modalign")._fill_text(text, 14, ""))
        A long
        sentence that
        wraps.
        <BLANKLINE>
        examples:
          modalign demo --quick
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines: list[str] = []
        paragraph: list[str] = []

        def flush() -> None:
            if paragraph:
                lines.extend(textwrap.wrap(" ".join(paragraph), width, initial_indent=indent,
                                           subsequent_indent=indent, break_on_hyphens=False,
                                           break_long_words=False))
                paragraph.clear()

        for line in text.splitlines():
            if line[:1].strip():
                paragraph.append(line.strip())
            else:
                flush()
                lines.append(indent + line if line.strip() else "")
        flush()
        return "\n".join(lines)


def add_command(subparsers: Any, name: str, *, help: str, description: str | None = None,
                epilog: str | None = None, run: Run | None = None) -> argparse.ArgumentParser:
    """Add subcommand ``name`` to ``subparsers`` (an ``add_subparsers()`` result); returns it.

    ``run(args)`` becomes ``args.func``, the function :func:`modalign.cli.main` calls; the
    ``epilog`` is printed after the options (examples, notes).

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser(prog="modalign").add_subparsers()
        >>> p = add_command(sub, "demo", help="run it", epilog="examples:\\n  modalign demo")
        >>> p.prog, p.epilog
        ('modalign demo', 'examples:\\n  modalign demo')
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter)
    if run is not None:
        parser.set_defaults(func=run)
    return parser


def add_command_group(subparsers: Any, name: str, *, help: str, description: str | None = None,
                      epilog: str | None = None, dest: str, metavar: str,
                      exit_code: int | None = None) -> Any:
    """Add subcommand ``name`` that holds subcommands of its own; returns their ``subparsers``.

    Run without one, the group prints its help and returns ``exit_code`` (``None``: no function
    is set and :func:`modalign.cli.main` prints the help and returns 2).

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="modalign")
        >>> sub = parser.add_subparsers(dest="command")
        >>> lab = add_command_group(sub, "lab", help="experiments", dest="experiment",
        ...                         metavar="EXPERIMENT", exit_code=0)
        >>> gap = add_command(lab, "gap", help="the gap sweep", run=lambda args: 0)
        >>> parser.parse_args(["lab", "gap"]).experiment
        'gap'
    """
    group = add_command(subparsers, name, help=help, description=description, epilog=epilog)
    if exit_code is not None:
        code = exit_code

        def print_help(args: argparse.Namespace) -> int:
            group.print_help()
            return code

        group.set_defaults(func=print_help)
    return group.add_subparsers(dest=dest, metavar=metavar)


def add_debug_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--debug``: show the traceback of an error rather than its one-line message.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser()
        >>> add_debug_flag(p)
        >>> p.parse_args([]).debug
        False
    """
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
