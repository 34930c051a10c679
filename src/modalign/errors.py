"""The library's one family of user errors.

Every mistake a user can fix (a bad argument, a malformed manifest, a refused file, a wrong setting)
raises :class:`ModalignError` or a subclass. It derives from :class:`ValueError`, so code that
already catches ``ValueError`` keeps working. The command line prints such an error as one line
and exits with status 2; real failures (a torch ``RuntimeError``, a bug) keep their traceback.

Example:
    >>> from modalign.errors import ModalignError
    >>> try:
    ...     raise ModalignError("--k must be a positive integer, got 0")
    ... except ValueError as e:
    ...     print(e)
    --k must be a positive integer, got 0
"""

from __future__ import annotations

__all__ = ["ModalignError", "ProtocolError", "SmallDataWarning"]


class ModalignError(ValueError):
    """A user error: the message says what was wrong, where, and what to do instead."""


class ProtocolError(ModalignError, TypeError):
    """An object given where a protocol is expected (an ``Encoder``, a trainable tower, a
    factory) lacks what the protocol needs; the message names the object and the missing parts.

    It is a :class:`ModalignError` (one line on the command line) and a ``TypeError`` (what
    Python raises for a wrong kind of object).
    """


class SmallDataWarning(UserWarning):
    """A number computed on too little data to mean much (few queries, classes or groups).

    The message says how many there were and what would help. The test suite silences this
    category where it runs on deliberately tiny data; tests of the warning itself still see it.
    """
