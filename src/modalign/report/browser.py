"""Open an HTML file in headless Chromium: collect console messages, a screenshot and the DOM.

Used by the tests of every HTML report (a page must load with no console message and show
something). :func:`find_chromium` returns ``None`` when no browser is installed, so callers can
skip cleanly.

Examples:
    >>> import tempfile, pathlib
    >>> exe = find_chromium()
    >>> if exe is not None:
    ...     d = pathlib.Path(tempfile.mkdtemp())
    ...     _ = (d / "p.html").write_text("<h1>hi</h1>")
    ...     r = render_in_browser(d / "p.html", d / "p.png", executable=exe)
    ...     assert r.console_messages == [] and "<h1>hi</h1>" in r.dom
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BrowserRender", "find_chromium", "render_in_browser", "screenshot_stats"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)\]\s*(.*)$")
_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
)


@dataclass(frozen=True)
class BrowserRender:
    """What the browser saw: console messages (errors and logs), the screenshot path, the DOM."""

    console_messages: list[str]
    screenshot: Path
    dom: str


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable (``MODALIGN_CHROMIUM`` first), or ``None``."""
    env = os.environ.get("MODALIGN_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def render_in_browser(
    html_path: str | os.PathLike[str],
    screenshot_path: str | os.PathLike[str],
    *,
    window: tuple[int, int] = (1280, 2000),
    executable: str | None = None,
    timeout: float = 90.0,
) -> BrowserRender:
    """Load ``html_path`` in headless Chromium twice: once for a PNG screenshot, once for the DOM.

    Console messages of both loads are returned (an uncaught exception shows up as a message
    starting with ``"Uncaught"``). Raises ``FileNotFoundError`` when no browser is found or the
    page does not exist, ``RuntimeError`` when the browser fails.
    """
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"html_path: no such file {html_path}")
    exe = executable or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium executable found (set MODALIGN_CHROMIUM)")
    screenshot_path = Path(screenshot_path).resolve()
    screenshot_path.parent.mkdir(parents=True, exist_ok=True)
    url = html_path.as_uri()
    messages: list[str] = []
    with tempfile.TemporaryDirectory(prefix="modalign-chromium-") as profile:
        base = [exe, *_FLAGS, f"--user-data-dir={profile}"]
        shot = subprocess.run(
            [*base, f"--screenshot={screenshot_path}", f"--window-size={window[0]},{window[1]}",
             url], capture_output=True, text=True, timeout=timeout, check=False)
        dump = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True,
                              timeout=timeout, check=False)
    for proc in (shot, dump):
        for line in proc.stderr.splitlines():
            m = _CONSOLE.search(line)
            if m:
                messages.append(m.group(1))
    if not screenshot_path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {shot.returncode}): "
                           f"{shot.stderr[-2000:]}")
    return BrowserRender(console_messages=messages, screenshot=screenshot_path, dom=dump.stdout)


def screenshot_stats(path: str | os.PathLike[str]) -> dict[str, float]:
    """Pixel statistics of a screenshot: grey-level standard deviation, non-white share, size.

    A blank page has a standard deviation near 0 and a non-white share near 0.
    """
    from PIL import Image

    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    return {"std": float(grey.std()), "non_white_share": float((grey < 245).mean()),
            "height": float(grey.shape[0]), "width": float(grey.shape[1])}
