"""One resumable writer for every chunked ``(rows, dim)`` array the project keeps on disk.

Embedding arrays, inversion arrays, the reproduce shards and token arrays all go through
:class:`ArrayWriter`:

- an advisory lock per array (``<name>.lock``): a second writer of the same array waits,
  saying which process holds it, and then reuses the finished array instead of writing it twice;
- rows go into ``<name>.partial.npy`` chunk by chunk, the number of finished rows (and any
  caller state) into ``<name>.progress.json``; a killed run resumes at the first unfinished row;
- when the array is finished it is flushed, renamed to ``<name>.npy`` and its *facts* are
  returned: shape, dtype, row count, file size and a SHA-256 checksum, for the store manifest.

Reuse checks only the cheap facts (:func:`check_array_file`: shape, rows, file size, no hashing);
``modalign data check STORE`` and ``modalign embed --verify`` compare the checksum
(:func:`verify_array_file`).

The lock is ``flock(2)``: it serialises processes on one machine and on local filesystems. On a
network filesystem (NFS, SMB, some cluster filesystems) advisory locks may not be honoured across
machines: keep a single writer per store there.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from modalign.errors import ModalignError
from modalign.io import file_hash, read_json, write_json_atomic

__all__ = ["ArrayWriter", "array_lock", "check_array_file", "disk_full", "verify_array_file"]


def _flock(f: Any, blocking: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: single-writer semantics
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@contextmanager
def array_lock(folder: str | os.PathLike[str], name: str, *, quiet: bool = False
               ) -> Iterator[None]:
    """Hold the advisory lock of array ``name`` in ``folder``; wait (and say for whom) if taken.

    Examples:
        >>> import tempfile
        >>> with array_lock(tempfile.mkdtemp(), "text"):
        ...     pass
    """
    path = Path(folder) / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if not _flock(f, blocking=False):
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not quiet:
                print(f"array {name!r} in {folder} is being written by {holder}; waiting for it "
                      "to finish", file=sys.stderr, flush=True)
            _flock(f, blocking=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            # the lock is released when the file closes; the file stays (unlinking it would let
            # a third process lock a different inode while a second still waits on this one)


def disk_full(exc: BaseException, path: str | os.PathLike[str], needed_bytes: int | None = None
              ) -> ModalignError | None:
    """A one-line error for a full disk (``ENOSPC``/``EDQUOT``), else None.

    Examples:
        >>> disk_full(OSError(errno.ENOSPC, "No space left"), "/tmp/x.npy", 5 << 20) is not None
        True
    """
    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent if not path.is_dir() else path).free
    except OSError:
        free = 0
    need = f", {needed_bytes / 1e6:.1f} MB needed" if needed_bytes else ""
    return ModalignError(f"no space left on the device of {path}{need} "
                         f"({free / 1e6:.1f} MB free); free some space and run the same command "
                         "again: what was written is kept and resumed")


def _reserve(path: Path) -> None:
    """Allocate the blocks of the (sparse) file ``path`` now, so a full disk is an error here and
    not a SIGBUS in the middle of a memory-mapped write."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # EINVAL/EOPNOTSUPP: the filesystem cannot preallocate; the write still works
    finally:
        os.close(fd)


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from an ``.npy`` header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return tuple(shape), np.dtype(dtype), f.tell()


def check_array_file(path: str | os.PathLike[str], facts: Mapping[str, Any] | None = None
                     ) -> str | None:
    """Cheap integrity check of an ``.npy`` file: None if it is whole, else what is wrong.

    Compares the header's shape with the file size (a truncated copy is caught) and, where
    given, with the recorded ``facts`` (``count``, ``dim``, ``size``). Reads only the header.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.npy"
        >>> np.save(p, np.ones((4, 3), np.float32))
        >>> check_array_file(p) is None
        True
        >>> _ = p.write_bytes(p.read_bytes()[:-8])
        >>> check_array_file(p)[:9]
        'truncated'
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        shape, dtype, offset = _npy_layout(path)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"unreadable header ({e})"
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < expected:
        return f"truncated: {size} bytes, expected {expected} for shape {shape}"
    if size > expected:
        return f"{size - expected} extra bytes after the {shape} array"
    facts = facts or {}
    if "count" in facts and shape[:1] != (int(facts["count"]),):
        return f"{shape[0] if shape else 0} rows, the manifest records {facts['count']}"
    if "dim" in facts and len(shape) == 2 and shape[1] != int(facts["dim"]):
        return f"dim {shape[1]}, the manifest records {facts['dim']}"
    if "size" in facts and size != int(facts["size"]):
        return f"{size} bytes, the manifest records {facts['size']}"
    return None


def verify_array_file(path: str | os.PathLike[str], facts: Mapping[str, Any]) -> str | None:
    """Full check: :func:`check_array_file` plus the recorded SHA-256 checksum (reads every byte).

    Returns None when the file matches, else what is wrong; ``"no checksum recorded"`` for arrays
    written before checksums were kept.
    """
    problem = check_array_file(path, facts)
    if problem:
        return problem
    if not facts.get("sha256"):
        return "no checksum recorded"
    got = file_hash(path, full=True)
    if got != facts["sha256"]:
        return f"checksum {got[:16]}... differs from the recorded {str(facts['sha256'])[:16]}..."
    return None


def array_facts(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Shape, dtype, row count, file size and SHA-256 of a finished ``.npy`` file."""
    path = Path(path)
    shape, dtype, _ = _npy_layout(path)
    return {"shape": list(shape), "dtype": str(dtype), "count": int(shape[0]) if shape else 0,
            "size": path.stat().st_size, "sha256": file_hash(path, full=True)}


class ArrayWriter:
    """Write a ``(rows, dim)`` array chunk by chunk into ``folder/<name>.npy``, resumably.

    Use it inside :func:`array_lock` (``EmbeddingStore.writing`` does both). ``key`` identifies
    the content: progress of another key is discarded. ``state`` is caller data saved with the
    progress (e.g. per-row scores) and returned on resume.

    Examples:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with array_lock(folder, "x"):
        ...     w = ArrayWriter(folder, "x", key="k1", rows=4, dim=2)
        ...     for start in range(w.done, 4, 2):
        ...         w.write(start, np.full((2, 2), start, np.float32))
        ...     facts = w.finish()
        >>> facts["count"], facts["shape"]
        (4, [4, 2])
    """

    def __init__(self, folder: str | os.PathLike[str], name: str, *, key: str, rows: int,
                 dim: int, dtype: Any = np.float32) -> None:
        if rows < 0 or dim < 1:
            raise ModalignError(f"array {name!r}: rows={rows}, dim={dim}; expected rows >= 0 and "
                                "dim >= 1")
        self.folder, self.name, self.key = Path(folder), name, key
        self.shape = (int(rows), int(dim))
        self.dtype = np.dtype(dtype)
        self.partial = self.folder / f"{name}.partial.npy"
        self.progress_file = self.folder / f"{name}.progress.json"
        self.final = self.folder / f"{name}.npy"
        self.done = 0
        self.state: dict[str, Any] = {}
        self._mm: np.memmap | None = None
        if self.partial.exists() and self.progress_file.exists():
            try:
                saved = read_json(self.progress_file)
            except ValueError:
                saved = {}
            if (saved.get("key") == key and check_array_file(self.partial) is None
                    and _npy_layout(self.partial)[0] == self.shape):
                self.done = min(int(saved.get("done", 0)), rows)
                self.state = dict(saved.get("state") or {})
        if self.done == 0:
            self._create()
        else:
            self._mm = open_memmap(self.partial, mode="r+")

    def _create(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.progress_file.unlink(missing_ok=True)
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        try:
            self._mm = open_memmap(self.partial, mode="w+", dtype=self.dtype, shape=self.shape)
            _reserve(self.partial)
        except OSError as e:
            self.partial.unlink(missing_ok=True)
            err = disk_full(e, self.partial, nbytes)
            if err:
                raise err from None
            raise

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def write(self, start: int, block: np.ndarray, **state: Any) -> None:
        """Write rows ``start .. start + len(block)`` and record them (and ``state``) as done."""
        assert self._mm is not None
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != self.shape[1] or start + len(block) > self.shape[0]:
            raise ValueError(f"array {self.name!r}: block {block.shape} at row {start} does not "
                             f"fit {self.shape}")
        try:
            self._mm[start:start + len(block)] = block
            self._mm.flush()
            self.done = start + len(block)
            self.state.update(state)
            write_json_atomic(self.progress_file, {"key": self.key, "done": self.done,
                                                   "state": self.state}, indent=0)
        except OSError as e:
            err = disk_full(e, self.progress_file, self.nbytes)
            if err:
                raise err from None
            raise

    def finish(self, drop: Sequence[int] = ()) -> dict[str, Any]:
        """Rename the finished array into place and return its facts (for the manifest).

        ``drop``: rows to leave out of the final array (inputs that could not be read).
        """
        if self.done != self.shape[0]:
            raise RuntimeError(f"array {self.name!r}: {self.done} of {self.shape[0]} rows written")
        if self._mm is not None:
            self._mm.flush()
            self._mm = None
        if drop:
            keep = np.setdiff1d(np.arange(self.shape[0]), np.asarray(drop, dtype=np.int64))
            src = np.load(self.partial, mmap_mode="r")
            compact = self.folder / f".{self.name}.compact.npy"
            out = open_memmap(compact, mode="w+", dtype=self.dtype,
                              shape=(len(keep), self.shape[1]))
            for s in range(0, len(keep), 65536):
                out[s:s + 65536] = src[keep[s:s + 65536]]
            out.flush()
            del out, src
            os.replace(compact, self.partial)
        with open(self.partial, "rb+") as f:
            os.fsync(f.fileno())
        facts = array_facts(self.partial)
        os.replace(self.partial, self.final)
        self.progress_file.unlink(missing_ok=True)
        return facts

    def close(self) -> None:
        """Drop the memory map, keeping the partial array and its progress for a later resume."""
        self._mm = None

