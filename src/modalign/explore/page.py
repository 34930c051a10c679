"""The explore page: one self-contained HTML file (Plotly's bundled JS inlined, no network).

:func:`render_page` turns the data of :func:`modalign.explore.build.build_explore` into HTML: the
map, the hover card, the neighbour lists, the gap slider and the diagnosis panel. The data sits in
a ``<script type="application/json">`` block read by ``explore.js``; Plotly comes from the
``plotly`` package's own ``plotly.min.js``, so the file opens from disk, offline.

Examples:
    >>> from modalign.evaluate.retrieval import toy_embeddings
    >>> from modalign.explore.build import ExploreOptions, build_explore
    >>> html = render_page(build_explore(toy_embeddings(), options=ExploreOptions(bridge=None)))
    >>> html.startswith("<!DOCTYPE html>") and "src=\\"http" not in html
    True
"""

from __future__ import annotations

import html as _html
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from modalign.errors import ModalignError
from modalign.io import write_bytes_atomic

__all__ = ["plotly_js", "render_page", "write_page"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222}
header{padding:10px 18px;border-bottom:1px solid #ddd}
header h1{font-size:20px;margin:0 0 4px} header p{margin:2px 0;font-size:13px;color:#555}
.note{color:#8a4b00;font-weight:600}
#controls{display:flex;gap:24px;align-items:center;padding:8px 18px;font-size:14px;
 flex-wrap:wrap}
#controls input[type=range]{width:260px;vertical-align:middle}
#layout{display:flex;gap:12px;padding:0 12px 12px}
#map{flex:3;min-width:420px;height:640px;border:1px solid #eee}
#side{flex:2;min-width:360px;font-size:13px}
#card{min-height:56px;border:1px solid #eee;padding:6px;margin-bottom:8px}
#card img{width:48px;height:48px;float:left;margin-right:8px;image-rendering:pixelated}
#card .value{color:#333}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #eee;padding:3px 4px;
 text-align:left;vertical-align:top}
table.nn ol{margin:0;padding-left:18px} table.nn li{margin:1px 0;cursor:pointer}
table.nn li img{width:24px;height:24px;vertical-align:middle;margin-right:4px}
li.positive{outline:2px solid #2a9d8f}
table.diag td{font-variant-numeric:tabular-nums}
#query-form{padding:6px 18px;font-size:14px} .hint{color:#777}
h2{font-size:15px;margin:12px 0 4px}
"""


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """The bundled ``plotly.min.js`` of the installed ``plotly`` package."""
    try:
        path = resources.files("plotly").joinpath("package_data").joinpath("plotly.min.js")
        text = path.read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ModalignError("explore needs the plotly package for its bundled plotly.min.js: "
                            "pip install plotly") from e
    return text.replace("</script", "<\\/script")


def _client_js() -> str:
    return resources.files("modalign.explore").joinpath("explore.js").read_text("utf-8")


def render_page(data: dict[str, Any], *, serve: bool = False) -> str:
    """The page as one HTML string; ``serve`` adds the query box (it posts to ``query``)."""
    payload = json.dumps({**data, "serve": serve}, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c")  # no "</script" or "<!--" inside the block
    samp = data["sampling"]
    notes = []
    if samp["sampled"]:
        notes.append(f'<p class="note" id="sample-note">Sampled: {samp["shown_rows"]:,} of '
                     f'{samp["total_rows"]:,} rows shown ({samp["groups_shown"]:,} whole groups, '
                     f'seed {samp["seed"]}, at most {samp["max_points"]:,} points).</p>')
    else:
        notes.append(f'<p id="sample-note">All {samp["total_rows"]:,} rows shown.</p>')
    if data["shift"]["fitted_on"] == "shown":
        notes.append('<p class="note">No training split was given: the bridge and the gap vector '
                     "are fitted on the shown rows themselves.</p>")
    src = data.get("source") or {}
    src_line = " · ".join(f"{k}: {v}" for k, v in src.items() if v not in (None, ""))
    b, a = data["shift"]["moved"], data["shift"]["towards"]
    title = _html.escape(data["title"])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{title}</title><style>{_CSS}</style></head>\n<body>"
        f"<header><h1>{title}</h1><p>{_html.escape(src_line)}</p>{''.join(notes)}"
        f"<p>modalign {_html.escape(data['version'])}; map: {data['projection']['name'].upper()}"
        " fitted on the native points; every state is drawn in the same coordinates. "
        "Neighbours are exact cosine top-k in the full joint space, not on the map.</p></header>"
        '<form id="query-form" hidden><label>Text <input id="query-text" type="text" size="40">'
        '</label> or image <input id="query-image" type="file" accept="image/*"> '
        '<button type="submit">Find neighbours</button> <span id="query-status"></span></form>'
        '<div id="controls"><label><input type="checkbox" id="pairs"> join positive pairs'
        "</label>"
        f'<label>move {_html.escape(b)} along the gap towards {_html.escape(a)}: '
        '<input type="range" id="shift" min="0" max="0" step="1" value="0"> '
        '<span id="shift-value">0 × gap</span></label></div>'
        '<div id="layout"><div id="map"></div><div id="side"><h2>Hovered item</h2>'
        '<div id="card"><span class="hint">Hover a point.</span></div>'
        '<h2>Neighbours</h2><div id="neighbours"></div>'
        '<h2>Diagnosis of what is shown</h2><div id="diagnosis"></div>'
        '<p class="hint">gap: distance between the centroids of the unit rows; separability: '
        "held-out accuracy of a logistic regression telling the two modalities apart; "
        "uniformity: log E exp(-2||x-y||²) (lower is more uniform; over a seeded sample of "
        f"{data['options']['uniformity_rows']:,} rows per modality above that many); cone: mean "
        "cosine of distinct pairs within a modality.</p></div></div>"
        f'<script type="application/json" id="explore-data">{payload}</script>'
        f"<script>{plotly_js()}</script><script>{_client_js()}</script>"
        "</body></html>\n"
    )


def write_page(data: dict[str, Any], path: str | os.PathLike[str], *, serve: bool = False
               ) -> Path:
    """Render and write the page atomically; returns the path."""
    path = Path(path)
    write_bytes_atomic(path, render_page(data, serve=serve).encode("utf-8"))
    return path
