"""Test-wide settings: no hub access, a private cache home, deterministic threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

collect_ignore = ["conftest.py"]  # not a doctest module (see src/conftest.py)


@pytest.fixture(autouse=True)
def _private_home(tmp_path_factory, monkeypatch):
    """Every test writes its caches under a temporary MODALIGN_HOME."""
    if "MODALIGN_TEST_HOME" not in os.environ:
        os.environ["MODALIGN_TEST_HOME"] = str(tmp_path_factory.mktemp("modalign-home"))
    monkeypatch.setenv("MODALIGN_HOME", os.environ["MODALIGN_TEST_HOME"])


@pytest.fixture
def one_thread():
    """torch on one thread for the test: small networks train far faster on one thread than
    on a loaded pair of cores (modules opt in with ``pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
