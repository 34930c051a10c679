"""Synthetic joint spaces, naive references and a Selenium driver for the explore tests."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modalign.embed.store import Embeddings


def synthetic_joint(n_groups: int = 30, dim: int = 16, seed: int = 0, gap: float = 1.5,
                    image_dir: Path | None = None, splits: bool = True
                    ) -> tuple[dict[str, Embeddings], dict[str, str]]:
    """Image and text rows of ``n_groups`` concepts with a modality gap; ``(joint, values)``.

    One image and one text per group; 2/3 of the groups are ``train``, the rest ``test``
    (all ``test`` without ``splits``). With ``image_dir``, each image row gets a small PNG whose
    path is its value; texts get a caption.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_groups, dim))
    offset = np.zeros(dim)
    offset[0] = gap
    joint: dict[str, Embeddings] = {}
    values: dict[str, str] = {}
    group_index = {f"g{g:04d}": g for g in range(n_groups)}
    for m, sign in (("image", 1.0), ("text", -1.0)):
        vecs = latent + 0.6 * rng.normal(size=latent.shape) + sign * offset
        rows = []
        for g in range(n_groups):
            split = ("train" if g % 3 != 2 else "test") if splits else "test"
            rid = f"{m}/{g}"
            rows.append({"id": rid, "modality": m, "view": "v", "group": f"g{g:04d}",
                         "split": split, "labels": {}})
            if m == "text":
                values[rid] = f"caption of concept {g}"
            elif image_dir is not None:
                p = image_dir / f"{g}.png"
                noise = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
                Image.fromarray(noise).save(p)  # compresses as badly as a detailed icon
                values[rid] = str(p)
        joint[m] = Embeddings(vecs.astype(np.float32), rows, group_index)
    return joint, values


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def naive_top_k(query: np.ndarray, gallery: np.ndarray, k: int, exclude: int = -1) -> list[int]:
    """The k largest cosines (float64, full sort, ties by index), ``exclude`` left out."""
    s = unit(gallery) @ unit(query[None])[0]
    order = [int(i) for i in np.lexsort((np.arange(len(s)), -s)) if int(i) != exclude]
    return order[:k]


def find_chromedriver() -> str | None:
    env = os.environ.get("MODALIGN_CHROMEDRIVER")
    if env:
        return env if Path(env).exists() else None
    return shutil.which("chromedriver")


@contextlib.contextmanager
def chrome(window: tuple[int, int] = (1400, 1000)) -> Iterator[object]:
    """A headless Chromium driven by Selenium and the system chromedriver, or a skip."""
    from modalign.report.browser import find_chromium

    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    exe, drv = find_chromium(), find_chromedriver()
    if exe is None or drv is None:
        pytest.skip("no chromium or chromedriver installed (scripts/install-system-packages.sh "
                    "installs chromium and chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 f"--window-size={window[0]},{window[1]}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(drv), options=opts)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
