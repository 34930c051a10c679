"""Settings for the docstring examples of the package (run by ``pytest --doctest-modules``).

Not part of the installed package: it gives every example the same quiet surroundings as the
tests (no hub access, a private cache home) and a temporary working directory, so that an
example that writes a file leaves nothing behind.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# pytest loads conftest files itself; collected as doctest modules too, the two files named
# conftest.py (here and in tests/) would clash as one module name.
collect_ignore = ["conftest.py"]


@pytest.fixture(autouse=True)
def _doctest_surroundings(tmp_path, monkeypatch):
    monkeypatch.setenv("MODALIGN_HOME", str(tmp_path / "modalign-home"))
    monkeypatch.chdir(tmp_path)
