"""Size and load time of the explore page in headless Chromium, and its screenshots.

With ``--points N`` a synthetic two-modality space of N rows (16x16 image thumbnails, captions)
is built, written and loaded; with ``--page HTML`` an existing page is loaded. The browser is the
system Chromium driven by Selenium and the system chromedriver. ``--screenshots DIR`` saves the
loaded page, the page after a click on an isolated image point, and the page with the gap slider
at 1 x gap.

    python benchmarks/explore_page.py --points 5000
    python benchmarks/explore_page.py --page runs/demo/explore.html --screenshots docs/img
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARK = "explore_page"


def synthetic_page(n: int, out: Path, seed: int = 0) -> tuple[Path, float]:
    from PIL import Image

    from modalign.embed.store import Embeddings
    from modalign.explore import ExploreOptions, build_explore, write_page

    rng = np.random.default_rng(seed)
    groups = n // 2
    latent = rng.normal(size=(groups, 64))
    img_dir = out / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    values: dict[str, str] = {}
    index = {f"g{g}": g for g in range(groups)}
    joint = {}
    for m, sign in (("image", 1.0), ("text", -1.0)):
        rows = []
        for g in range(groups):
            rows.append({"id": f"{m}/{g}", "group": f"g{g}", "split": "test"})
            if m == "image":
                p = img_dir / f"{g}.png"
                Image.fromarray(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)).save(p)
                values[f"{m}/{g}"] = str(p)
            else:
                values[f"{m}/{g}"] = f"a caption of concept number {g}"
        vecs = latent + 0.5 * rng.normal(size=latent.shape)
        vecs[:, 0] += 2 * sign
        joint[m] = Embeddings(vecs.astype(np.float32), rows, index)
    t0 = time.perf_counter()
    data = build_explore(joint, values=values, options=ExploreOptions(max_points=n))
    build_s = time.perf_counter() - t0
    return write_page(data, out / "explore.html"), build_s


def drive(page: Path, screenshots: Path | None) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.keys import Keys

    from modalign.report.browser import find_chromium

    opts = webdriver.ChromeOptions()
    opts.binary_location = find_chromium() or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1250", "--hide-scrollbars"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"),
                              options=opts)
    try:
        driver.get(page.resolve().as_uri())
        while driver.execute_script("return document.body.getAttribute('data-ready')") != "1":
            time.sleep(0.05)
        ready_ms = driver.execute_script("return window.modalignExplore.readyMs")
        console = [e["message"] for e in driver.get_log("browser")]
        if screenshots:
            screenshots.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshots / "explore.png"))
            xy = np.asarray(driver.execute_script(
                "return window.modalignExplore.data.points.xy")).T
            d = np.linalg.norm(xy[:, None] - xy[None], axis=2) if len(xy) < 6000 else None
            n_img = driver.execute_script("return window.modalignExplore.data.offsets[1]")
            twins = driver.execute_script(
                "return window.modalignExplore.data.twins.flatMap(t => t.of)")
            pool = [g for g in (twins or range(n_img)) if g < n_img]
            if d is not None:
                np.fill_diagonal(d, np.inf)
                g = max(pool, key=lambda i: d[i].min())
            else:
                g = pool[0]
            x, y = driver.execute_script("""
                const gd = document.getElementById('map'), L = gd._fullLayout;
                const P = gd.getBoundingClientRect(), W = window.modalignExplore.data.points.xy;
                return [P.left + L._size.l + L.xaxis.d2p(W[0][arguments[0]]),
                        P.top + L._size.t + L.yaxis.d2p(W[1][arguments[0]])];""", g)
            ab = ActionBuilder(driver)
            ab.pointer_action.move_to_location(round(x), round(y))
            ab.pointer_action.pause(0.3)
            ab.pointer_action.click()
            ab.perform()
            time.sleep(0.5)
            driver.save_screenshot(str(screenshots / "explore-click.png"))
            slider = driver.find_element("id", "shift")
            amounts = driver.execute_script("return window.modalignExplore.data.shift.amounts")
            for _ in range(amounts.index(1.0) - amounts.index(0.0)):
                slider.send_keys(Keys.ARROW_RIGHT)
            time.sleep(0.5)
            driver.save_screenshot(str(screenshots / "explore-shift.png"))
            console += [e["message"] for e in driver.get_log("browser")]
    finally:
        driver.quit()
    return {"ready_ms": round(float(ready_ms), 1), "console_messages": len(console)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=5000)
    p.add_argument("--page", type=Path, default=None)
    p.add_argument("--screenshots", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.page is None:
            page, build_s = synthetic_page(args.points, Path(tmp))
        else:
            page, build_s = args.page, float("nan")
        result = {"benchmark": BENCHMARK, "page": str(args.page or f"synthetic {args.points}"),
                  "bytes": page.stat().st_size, "build_s": round(build_s, 2),
                  "build_cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 2),
                  **drive(page, args.screenshots)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
