"""Small, crash-safe file helpers: atomic writes, JSON, content hashes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from modalign.errors import ModalignError


@contextmanager
def atomic_path(path: str | os.PathLike[str]):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Nothing is left at ``path`` when the body raises, so a crash never leaves a half-written file.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_path(p) as tmp:
        ...     _ = tmp.write_text("hello")
        >>> p.read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would make every output owner-only
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (UTF-8, keys in insertion order)."""
    text = dumps(obj, indent=indent)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[Any]) -> None:
    """Write one JSON object per line to ``path`` atomically."""
    lines = [dumps(r) for r in rows]
    write_bytes_atomic(path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))


def dumps(obj: Any, indent: int | None = None) -> str:
    """JSON text of ``obj``, always valid JSON: NaN and infinities become ``null``.

    Examples:
        >>> dumps({"loss": float("-inf"), "x": [1.5, float("nan")]})
        '{"loss": null, "x": [1.5, null]}'
    """
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default,
                          allow_nan=False)
    except ValueError:  # a non-finite float somewhere: rare, so only then walk the object
        return json.dumps(_finite(obj), indent=indent, ensure_ascii=False,
                          default=_json_default, allow_nan=False)


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if hasattr(o, "tolist") or (hasattr(o, "item") and not isinstance(o, (str, bytes))):
        return _finite(_json_default(o))
    return o


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """Read a JSON-lines file (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path: str | os.PathLike[str], row: Any) -> None:
    """Append one JSON line to ``path`` and flush it to disk."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def content_hash(*parts: Any) -> str:
    """A stable SHA-256 (first 16 hex digits) of JSON-serialisable ``parts``.

    Examples:
        >>> content_hash({"a": 1}, "b") == content_hash({"a": 1}, "b")
        True
    """
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, ensure_ascii=False, default=_json_default).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


class NewerFormatError(ModalignError):
    """A file written by a newer modalign, in a format version this one does not read."""


def check_format_version(meta: Any, current: int, what: str, key: str = "format_version") -> int:
    """The format version recorded in ``meta`` (a file's JSON object), checked against ``current``.

    Every format modalign writes (model folder, store manifest, checkpoint, resolved run config,
    evaluation record) records its version under ``key``. A file without the key was written
    before versions were recorded: version 0, the same layout as version 1, read as it is (and
    given the key when rewritten). A newer version raises :class:`NewerFormatError` naming the
    file; a version that is not an integer raises :class:`~modalign.errors.ModalignError`.

    Examples:
        >>> check_format_version({"format_version": 1}, 1, "x"), check_format_version({}, 1, "x")
        (1, 0)
        >>> try:
        ...     check_format_version({"format_version": 3}, 1, "store s")
        ... except NewerFormatError as e:
        ...     print(str(e)[:57])
        store s was written by a newer modalign (format_version 3
    """
    raw = meta.get(key, 0) if isinstance(meta, dict) else 0
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ModalignError(f"{what}: {key} {raw!r} is not an integer; the file is damaged or "
                            "not written by modalign")
    if raw > current:
        raise NewerFormatError(f"{what} was written by a newer modalign ({key} {raw}; this one "
                               f"reads up to {current}): upgrade modalign (pip install -U "
                               "modalign) to read it")
    return raw


def array_hash(array: Any, rows_per_block: int = 65536) -> str:
    """SHA-256 (first 16 hex digits) of an array's dtype, shape and every byte, read in blocks
    (a memory-mapped array is not loaded whole). Two arrays hash alike only if they are equal.

    Examples:
        >>> import numpy as np
        >>> a = np.zeros((3, 2), np.float32)
        >>> b = a.copy(); b[2, 1] = 1e-30
        >>> array_hash(a) == array_hash(a.copy()), array_hash(a) == array_hash(b)
        (True, False)
    """
    import numpy as np

    arr = np.asarray(array)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    if arr.ndim == 0 or arr.size == 0:
        h.update(arr.tobytes())
    else:
        for start in range(0, len(arr), rows_per_block):
            h.update(np.ascontiguousarray(arr[start:start + rows_per_block]).tobytes())
    return h.hexdigest()[:16]


def file_hash(path: str | os.PathLike[str], chunk: int = 1 << 20, full: bool = False) -> str:
    """SHA-256 of a file's bytes: the first 16 hex digits, or all 64 with ``full=True``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest() if full else h.hexdigest()[:16]


HASH_CACHE = "file-hashes.json"
"""File under :func:`modalign.paths.home` remembering :func:`cached_file_hash` results."""

HASH_CACHE_ENTRIES = 1024
"""Most files remembered there (the least recently hashed are dropped first)."""


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_stamp(path: str | os.PathLike[str]) -> list[int] | None:
    """Size, modification and status-change times (ns), inode and device of ``path`` (symlinks
    followed), or None when it cannot be read: equal stamps mean an unchanged file.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = p.write_bytes(b"abc")
        >>> file_stamp(p)[0], file_stamp(p.with_name("missing"))
        (3, None)
    """
    try:
        return _stamp(os.stat(path))
    except OSError:
        return None


_HASHED: ContextVar[list[str] | None] = ContextVar("modalign_hashed_files", default=None)


@contextmanager
def recording_hashed_files() -> Iterator[list[str]]:
    """Collect the paths :func:`cached_file_hash` hashes inside the block (absolute, as given):
    the files a tower's ``identity()`` depends on.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = p.write_bytes(b"abc")
        >>> with recording_hashed_files() as files:
        ...     _ = cached_file_hash(p)
        >>> files == [str(p)]
        True
    """
    files: list[str] = []
    token = _HASHED.set(files)
    try:
        yield files
    finally:
        _HASHED.reset(token)


def cached_file_hash(path: str | os.PathLike[str], full: bool = False) -> str:
    """:func:`file_hash`, remembered across runs for a file that has not changed.

    The remembered digest is keyed on the file's resolved path and reused only while its size,
    modification and status-change times (in nanoseconds), inode and device are all the same;
    any change hashes the file again. For a tower's or model's weights, read at every start.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = p.write_bytes(b"abc")
        >>> cached_file_hash(p) == cached_file_hash(p) == file_hash(p)
        True
    """
    from modalign.paths import home

    recording = _HASHED.get()
    if recording is not None:
        recording.append(os.path.abspath(path))
    target = Path(path).resolve()
    stamp = _stamp(target.stat())
    store = home() / HASH_CACHE
    try:
        entries = read_json(store) if store.is_file() else {}
    except (OSError, ValueError):
        entries = {}
    if not isinstance(entries, dict):
        entries = {}
    hit = entries.get(str(target))
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        digest = hit["sha256"]
    else:
        digest = file_hash(target, full=True)
        if _stamp(target.stat()) == stamp:  # unchanged while it was read: remember it
            entries.pop(str(target), None)
            entries[str(target)] = {"stamp": stamp, "sha256": digest}
            for old in list(entries)[: max(0, len(entries) - HASH_CACHE_ENTRIES)]:
                del entries[old]
            with suppress(OSError):  # a read-only home: hashing every time is still correct
                write_json_atomic(store, entries, indent=0)
    return digest if full else digest[:16]


def read_user_text(path: str | os.PathLike[str], what: str = "file") -> str:
    r"""The text of a user's file: UTF-8 with or without a byte-order mark (spreadsheets and some
    editors write one). Other encodings raise a one-line ``ModalignError`` with the line.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.csv"
        >>> _ = p.write_bytes(b"\xef\xbb\xbftext\nhi\n")
        >>> read_user_text(p)
        'text\nhi\n'
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ModalignError(
            f"{what} {path}, line {line}: byte 0x{data[e.start]:02x} is not UTF-8; expected a "
            "UTF-8 file (save it as 'CSV UTF-8' or convert it, e.g. iconv -f latin1 -t utf-8)"
        ) from None


def csv_cell(value: Any) -> Any:
    """A value safe to open in a spreadsheet: text starting with ``=``, ``+``, ``-``, ``@`` (or a
    tab/carriage return) gets a leading ``'`` so it is never run as a formula; numbers unchanged.

    Examples:
        >>> csv_cell("=HYPERLINK(1)"), csv_cell("-run"), csv_cell(-0.5), csv_cell("clip")
        ("'=HYPERLINK(1)", "'-run", -0.5, 'clip')
    """
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_model_folder(directory: str | os.PathLike[str], state_dict: Mapping[str, Any],
                       config: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` (the tensors detached, on the CPU, contiguous) and
    ``config.json`` into ``directory`` (created if missing), each atomically; return the folder."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json_atomic(out / "config.json", dict(config))
    return out


def read_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """The tensors of a safetensors file; a file that is not one (a pickle renamed
    ``.safetensors``, a truncated copy) raises a one-line ``ModalignError`` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError, OSError, ValueError: the file is not readable as is
        raise ModalignError(f"{path}: refused, not a valid safetensors file "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); modalign "
                            "reads weights from safetensors only") from None


def read_torch(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(..., weights_only=True)``: tensors and plain containers only. A file holding
    other Python objects, or a damaged one, raises a one-line ``ModalignError`` naming it."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise ModalignError(f"{path}: refused, it holds Python objects other than tensors and "
                            "plain containers, which modalign never loads") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModalignError(f"{path}: refused, not a readable tensor file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
