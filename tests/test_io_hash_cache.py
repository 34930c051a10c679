"""Remembered file hashes: reused for an unchanged file, recomputed for any change."""

from __future__ import annotations

import os

from modalign.io import HASH_CACHE, cached_file_hash, file_hash, read_json


def test_unchanged_file_is_not_read_again_and_a_changed_one_is(tmp_path, monkeypatch):
    monkeypatch.setenv("MODALIGN_HOME", str(tmp_path / "home"))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    first = cached_file_hash(path)
    assert first == file_hash(path)
    assert (tmp_path / "home" / HASH_CACHE).is_file()

    reads = []
    real = file_hash
    monkeypatch.setattr("modalign.io.file_hash", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert cached_file_hash(path) == first and cached_file_hash(path, full=True)[:16] == first
    assert reads == []  # unchanged: no hashing

    # Same size, mtime put back to the old value: the status-change time still differs.
    st = path.stat()
    path.write_bytes(b"b" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = cached_file_hash(path)
    assert len(reads) == 1 and changed == real(path) != first

    path.write_bytes(b"b" * 4097)  # another size
    assert cached_file_hash(path) == real(path) and len(reads) == 2


def test_a_damaged_cache_file_is_ignored_and_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("MODALIGN_HOME", str(tmp_path))
    (tmp_path / HASH_CACHE).write_text("{not json")
    path = tmp_path / "w.bin"
    path.write_bytes(b"xyz")
    assert cached_file_hash(path) == file_hash(path)
    assert str(path.resolve()) in read_json(tmp_path / HASH_CACHE)
