"""The ``modalign`` command: one entry point, one subcommand per stage of the pipeline.

Each stage lives in its own module exposing ``register(subparsers)``; that function adds a
subparser whose ``func`` attribute takes the parsed ``argparse.Namespace`` and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from modalign import __version__
from modalign.errors import ModalignError

# (module, subcommand) in the order ``modalign --help`` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "modalign.data.cli",
    "modalign.embed.cli",
    "modalign.train.cli",
    "modalign.geometry.cli",
    "modalign.bridge.cli",
    "modalign.bridge.fit_cli",
    "modalign.evaluate.cli",
    "modalign.evaluate.search_cli",
    "modalign.report.cli",
    "modalign.inventory",
    "modalign.refine.cli",
    "modalign.lab.cli",
    "modalign.reproduce.cli",
    "modalign.explore.cli",
    "modalign.demo",
)

# Optional packages a command may need, with the line that installs them.
OPTIONAL_MODULES: dict[str, str] = {
    "open_clip": "pip install 'modalign[openclip]' (open_clip towers)",
    "torchvision": "pip install 'modalign[openclip]' (open_clip towers)",
    "faiss": "pip install faiss-cpu (faiss search indexes), or use --index exact",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
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
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # this stage is not part of the installed package
            raise
        module.register(sub)
    return parser


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _warning_formatter(command: str):  # type: ignore[no-untyped-def]
    """``warnings.formatwarning`` for the CLI: the package's own warnings as one plain line.

    Only the formatting changes, so filters and recorders (``pytest.warns``) work as usual.
    """
    default = warnings.formatwarning

    def format(message, category, filename, lineno, line=None):  # type: ignore[no-untyped-def]
        if str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
            return f"modalign {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return format


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    if not sys.stderr.isatty():  # piped or logged: epoch lines, no progress bars between them
        os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
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
    except (ModalignError, ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"modalign {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
