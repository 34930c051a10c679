"""Atomic writes: all or nothing, with the permissions an ordinary open would give."""

from __future__ import annotations

import os
import stat

import pytest

from modalign.io import atomic_path, write_json_atomic


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_file_follows_the_umask(tmp_path, mask) -> None:
    old = os.umask(mask)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~mask


def test_failed_write_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "x.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
