"""Cached, timed stages: each stage's result is stored with the key of its inputs."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from modalign.io import read_json, write_json_atomic

T = TypeVar("T")


class Stages:
    """Runs named stages once per input key and records how long each took.

    A stage whose key matches the cached one (``<out>/stages/<name>.json``) is not run again;
    its cached JSON result is returned. Times of this run (0 for a cache hit) are in ``times``.

    Examples:
        >>> import tempfile
        >>> st = Stages(tempfile.mkdtemp(), verbose=False)
        >>> st.run("add", "adds two numbers", {"a": 1}, lambda: {"sum": 3})
        {'sum': 3}
        >>> st.run("add", "adds two numbers", {"a": 1}, lambda: {"sum": 99})  # cached
        {'sum': 3}
    """

    def __init__(self, out: str | Path, verbose: bool = True) -> None:
        self.dir = Path(out) / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.verbose = verbose
        self.times: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    def run(self, name: str, explanation: str, key: Any, fn: Callable[[], T]) -> T:
        """Run ``fn`` unless the stage ``name`` already finished with the same ``key``."""
        path = self.dir / f"{name}.json"
        key = json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back
        if path.exists():
            cached = read_json(path)
            if cached.get("key") == key:
                self.times[name], self.cached[name] = 0.0, True
                self.say(f"[{name}] cached: {explanation}")
                return cached["result"]
        self.say(f"[{name}] {explanation}")
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - t0
        self.cached[name] = False
        write_json_atomic(path, {"key": key, "result": result, "seconds": self.times[name]})
        return result

    @contextmanager
    def timed(self, name: str, explanation: str) -> Iterator[None]:
        """Time a stage that keeps its own cache (data build, embedding store, training runs)."""
        self.say(f"[{name}] {explanation}")
        t0 = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t0
