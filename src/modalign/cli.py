"""The ``modalign`` command: one entry point, one subcommand per stage of the pipeline.

Each stage lives in its own module exposing ``register(subparsers)``; that function adds a
subparser whose ``func`` attribute takes the parsed ``argparse.Namespace`` and returns an exit code.
Stage modules are imported lazily: ``modalign COMMAND ...`` imports only the module of COMMAND and
``modalign --version`` none, so start-up does not pay for torch, transformers or matplotlib that
other stages need.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from modalign import __version__
from modalign.errors import ModalignError

# subcommand -> the module registering it, in the order ``modalign --help`` lists them.
COMMANDS: dict[str, str] = {
    "data": "modalign.data.cli",
    "embed": "modalign.embed.cli",
    "train": "modalign.train.cli",
    "export": "modalign.export",
    "diagnose": "modalign.geometry.cli",
    "invert": "modalign.bridge.cli",
    "fit-bridge": "modalign.bridge.fit_cli",
    "eval": "modalign.evaluate.cli",
    "encode": "modalign.evaluate.search_cli",
    "search": "modalign.evaluate.search_cli",
    "index": "modalign.evaluate.search_cli",
    "report": "modalign.report.cli",
    "runs": "modalign.inventory",
    "stores": "modalign.inventory",
    "refine": "modalign.refine.cli",
    "lab": "modalign.lab.cli",
    "reproduce": "modalign.reproduce.cli",
    "explore": "modalign.explore.cli",
    "demo": "modalign.demo",
}
SUBCOMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMANDS.values()))

# Optional packages a command may need, with the line that installs them.
OPTIONAL_MODULES: dict[str, str] = {
    "open_clip": "pip install 'modalign[openclip]' (open_clip towers)",
    "torchvision": "pip install 'modalign[openclip]' (open_clip towers)",
    "faiss": "pip install faiss-cpu (faiss search indexes), or use --index exact",
    "peft": "pip install 'modalign[lora]' (LoRA adapters on the towers)",
}


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser with the subcommands ``commands`` (default: all of them).

    Example:
        >>> build_parser(["eval"]).parse_args(["eval", "--embeddings", "store"]).command
        'eval'
    """
    parser = argparse.ArgumentParser(
        prog="modalign",
        description=(
            "Multimodal contrastive learning: build paired data, embed it with real towers, train "
            "N-tower models, diagnose the modality gap, bridge it, and evaluate retrieval and "
            "zero-shot classification."
        ),
        epilog="Run 'modalign COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"modalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = COMMANDS if commands is None else commands
    for name in dict.fromkeys(COMMANDS[c] for c in wanted):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # this stage is not part of the installed package
            raise
        module.register(sub)
    return parser


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _warning_formatter(command: str) -> Callable[..., str]:  # warnings.formatwarning's signature
    """``warnings.formatwarning`` for the CLI: the package's own warnings as one plain line.

    Only the formatting changes, so filters and recorders (``pytest.warns``) work as usual.
    """
    default = warnings.formatwarning

    def format(message: Warning | str, category: type[Warning], filename: str, lineno: int,
               line: str | None = None) -> str:
        if str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
            return f"modalign {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return format


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    if not sys.stderr.isatty():  # piped or logged: epoch lines, no progress bars between them
        os.environ.setdefault("TQDM_DISABLE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_commands_needed(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    default_format = warnings.formatwarning
    warnings.formatwarning = _warning_formatter(args.command)
    try:
        return _run(args)
    finally:
        warnings.formatwarning = default_format


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("modalign: interrupted; finished work is kept and the next run resumes it.",
              file=sys.stderr)
        return 130
    except ImportError as e:  # a missing optional extra: one line that says what to install
        hint = OPTIONAL_MODULES.get((e.name or "").split(".")[0])
        if getattr(args, "debug", False) or (hint is None and "pip install" not in str(e)):
            raise
        message = f"{e.name} is not installed: {hint}" if hint else str(e).splitlines()[0]
        print(f"modalign {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (ModalignError, ValueError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"modalign {args.command}: error: {e}", file=sys.stderr)
        return 2


def _commands_needed(argv: Sequence[str]) -> list[str] | None:
    """The subcommands whose modules parsing ``argv`` needs; ``None`` for all of them.

    The top level has only ``--version`` and ``--help``: a known command in first place needs its
    own module, ``--version`` none; help, no arguments and a mistyped command list them all.
    """
    if argv and argv[0] in COMMANDS:
        return [argv[0]]
    if argv and argv[0] == "--version":
        return []
    return None


if __name__ == "__main__":
    sys.exit(main())
