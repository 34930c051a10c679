"""Gallery summaries of the purely textual Cross the Gap sets, read without a general unpickle.

The official release ships, for IMDB, 20 Newsgroups and the NanoBEIR sets, LLM-written summaries
"under 77 tokens" of every gallery document as pickled ``{document id: summary}`` dictionaries
(``summarized_text.pkl``). A pickle can run code when loaded, so these are read only through
:class:`PlainUnpickler`, which refuses every global (no class, no function, no module can be
named): what it admits is exactly the pickle opcodes of plain containers (dict, list, tuple) of
str, int, float, bool and None. :func:`convert_summaries` writes the same data as JSON once, and
:func:`read_summaries` reads either form.

Examples:
    >>> import io, pickle
    >>> PlainUnpickler(io.BytesIO(pickle.dumps({"0": "a summary"}))).load()
    {'0': 'a summary'}
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from modalign.errors import ModalignError
from modalign.io import read_json, write_json_atomic

SUMMARY_FILES = ("summarized_text.json", "summarized_text.pkl")
_PLAIN = (str, int, float, bool, type(None))


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that admits plain containers of str/int/float only: every global is refused.

    Examples:
        >>> import collections, io, pickle
        >>> data = pickle.dumps(collections.OrderedDict(a=1))
        >>> PlainUnpickler(io.BytesIO(data)).load()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modalign.errors.ModalignError: refused to unpickle collections.OrderedDict: ...
    """

    def find_class(self, module: str, name: str) -> Any:
        raise ModalignError(f"refused to unpickle {module}.{name}: only plain dicts, lists and "
                            "tuples of str, int and float are read (convert the file to JSON)")


def _check_plain(value: Any, where: str = "value") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise ModalignError(f"{where}: {type(value).__name__} is not a plain str/int/float")


def load_plain_pickle(path: str | Path) -> Any:
    """Load ``path`` with :class:`PlainUnpickler` and check the result is plain data."""
    data = Path(path).read_bytes()
    try:
        value = PlainUnpickler(io.BytesIO(data)).load()
    except ModalignError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise ModalignError(f"{path}: not a readable pickle of plain data ({e})") from None
    _check_plain(value, str(path))
    return value


def read_summaries(path: str | Path) -> dict[str, str]:
    """``{document id: summary}`` from a ``.json`` file or an official ``.pkl`` (restricted).

    Examples:
        >>> read_summaries("/nonexistent.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modalign.errors.ModalignError: summaries: no file /nonexistent.json
    """
    path = Path(path)
    if not path.is_file():
        raise ModalignError(f"summaries: no file {path}")
    value = load_plain_pickle(path) if path.suffix == ".pkl" else read_json(path)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ModalignError(f"{path}: expected a mapping of document id -> summary text")
    return {str(k): v for k, v in value.items()}


def convert_summaries(pkl: str | Path, out: str | Path | None = None) -> Path:
    """Write the official ``summarized_text.pkl`` as JSON beside it (or to ``out``)."""
    pkl = Path(pkl)
    target = Path(out) if out is not None else pkl.with_suffix(".json")
    write_json_atomic(target, read_summaries(pkl))
    return target


def find_summaries(folder: Path) -> dict[str, str] | None:
    """The summaries in ``folder`` (JSON preferred over the pickle), or None."""
    for name in SUMMARY_FILES:
        if (folder / name).is_file():
            return read_summaries(folder / name)
    return None
