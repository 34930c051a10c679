"""Start-up of the ``modalign`` command: only the module of the command run is imported."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from modalign.cli import COMMANDS, _commands_needed, build_parser


def test_the_command_table_names_what_each_module_registers():
    for command, module in COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert command in sub.choices, (command, module)
    full = build_parser()
    listed = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert list(listed.choices) == list(COMMANDS)


@pytest.mark.parametrize(("argv", "needed"), [
    (["--version"], []),
    (["eval", "--model", "m", "--data", "emoji"], ["eval"]),
    (["diagnose", "--help"], ["diagnose"]),
    ([], None), (["--help"], None), (["evl"], None),
])
def test_only_the_needed_modules_are_registered(argv, needed):
    assert _commands_needed(argv) == needed


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
                          "('torch', 'transformers', 'matplotlib') or m.startswith('modalign.')))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_version_and_eval_usage_errors_do_not_import_torch():
    version = _modules_after("from modalign.cli import main\n"
                             "try:\n    main(['--version'])\nexcept SystemExit:\n    pass")
    assert "torch" not in version and "modalign.evaluate.cli" not in version
    usage = _modules_after("from modalign.cli import main\n"
                           "try:\n    main(['eval', '--task', 'nope'])\nexcept SystemExit:\n"
                           "    pass")
    assert "modalign.evaluate.cli" in usage
    assert not {"torch", "transformers", "matplotlib"} & usage
    assert "modalign.lab.cli" not in usage and "modalign.train.cli" not in usage


def test_the_evaluate_package_still_exports_its_names_on_first_use():
    import modalign.evaluate as ev

    for name in ev.__all__:
        assert callable(getattr(ev, name)), name
    with pytest.raises(AttributeError, match="no_such_name"):
        ev.no_such_name  # noqa: B018
