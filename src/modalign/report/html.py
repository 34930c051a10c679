"""Self-contained HTML pages: sections, tables and matplotlib figures inlined as base64 PNG or SVG.

A :class:`Page` holds :class:`Section` objects; each section is a list of blocks (paragraphs,
tables, figures, rows of figures side by side). :meth:`Page.render` returns one HTML string with
the style sheet inlined and no external reference, so the file opens anywhere, offline.

Examples:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> page = Page("Run 3", subtitle="emoji, test split")
    >>> sec = page.section("Metrics")
    >>> sec.table([{"metric": "gap", "value": 0.41}], caption="Geometry")
    >>> fig, ax = plt.subplots(figsize=(3, 2)); _ = ax.plot([0, 1], [1, 0])
    >>> sec.figure(fig, caption="A line")
    >>> html = page.render()
    >>> html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
    True
"""

from __future__ import annotations

import base64
import html as _html
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec

from modalign.io import write_bytes_atomic

__all__ = ["Page", "Section", "figure_html", "format_value", "table_html"]

ImageFormat = Literal["png", "svg"]
P = ParamSpec("P")


def format_value(value: Any, digits: int = 4) -> str:
    """Format a table cell: floats to ``digits`` significant digits, ``None`` as an en dash.

    Examples:
        >>> format_value(0.123456), format_value(None), format_value(12345678.0), format_value(3)
        ('0.1235', '–', '1.235e+07', '3')
    """
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.{digits}g}"
    return str(value)


def table_html(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    caption: str | None = None,
    explain_column: str | None = None,
    digits: int = 4,
) -> str:
    """An HTML table from a list of row mappings; numbers right-aligned, every cell escaped.

    Args:
        rows: one mapping per row, column name -> value.
        columns: column order; default: the keys of the rows in first-seen order.
        caption: optional caption above the table.
        explain_column: a column rendered in a muted style (one-line explanations).
        digits: significant digits for floats.

    Examples:
        >>> "<td class=\\"num\\">2</td>" in table_html([{"a": 2}])
        True
    """
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    out = ['<table class="data">']
    if caption:
        out.append(f"<caption>{_html.escape(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_html.escape(str(c))}</th>" for c in columns)
               + "</tr></thead><tbody>")
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            cls = "num" if numeric else ("explain" if c == explain_column else "")
            attr = f' class="{cls}"' if cls else ""
            cells.append(f"<td{attr}>{_html.escape(format_value(v, digits))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def figure_html(
    fig: Any,
    *,
    caption: str | None = None,
    alt: str | None = None,
    image_format: ImageFormat = "png",
    dpi: int = 110,
    close: bool = True,
) -> str:
    """Render a matplotlib figure into an inline ``<figure>`` (base64 PNG or inline SVG).

    The figure is closed afterwards (``close=True``) so long reports do not accumulate memory.
    """
    if image_format not in ("png", "svg"):
        raise ValueError(f"image_format must be 'png' or 'svg', got {image_format!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=image_format, dpi=dpi, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    alt_text = _html.escape(alt or caption or "figure")
    if image_format == "png":
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        body = f'<img alt="{alt_text}" src="data:image/png;base64,{data}">'
    else:
        svg = buf.getvalue().decode("utf-8")
        body = svg[svg.index("<svg"):]  # drop the XML prolog and doctype
    cap = f"<figcaption>{_html.escape(caption)}</figcaption>" if caption else ""
    return f"<figure>{body}{cap}</figure>"


def _block(render: Callable[P, str]) -> Callable[Concatenate[Section, P], None]:
    """A :class:`Section` method that adds ``render(...)``'s HTML as a block (same arguments)."""

    def add(self: Section, *args: P.args, **kwargs: P.kwargs) -> None:
        self.blocks.append(render(*args, **kwargs))

    add.__name__ = render.__name__.removesuffix("_html")
    add.__qualname__ = f"Section.{add.__name__}"
    add.__doc__ = f"Add a block made by :func:`{render.__name__}` (same arguments)."
    return add


@dataclass
class Section:
    """One titled part of a page; add blocks in reading order."""

    title: str
    anchor: str
    blocks: list[str] = field(default_factory=list)

    def paragraph(self, text: str, *, note: bool = False) -> None:
        """Add a paragraph of plain text (escaped); ``note=True`` renders it small and muted."""
        cls = ' class="note"' if note else ""
        self.blocks.append(f"<p{cls}>{_html.escape(text)}</p>")

    table = _block(table_html)
    figure = _block(figure_html)

    def figures_side_by_side(self, figures: Sequence[tuple[Any, str]],
                             image_format: ImageFormat = "png") -> None:
        """Add several ``(figure, caption)`` pairs in one row that wraps on narrow screens."""
        inner = "".join(figure_html(f, caption=c, image_format=image_format) for f, c in figures)
        self.blocks.append(f'<div class="grid">{inner}</div>')

    def raw_html(self, fragment: str) -> None:
        """Add a trusted HTML fragment as is (nothing is escaped)."""
        self.blocks.append(fragment)


class Page:
    """A self-contained HTML report page.

    Args:
        title: page title (also the ``<title>``).
        subtitle: one line under the title.
    """

    def __init__(self, title: str, subtitle: str | None = None) -> None:
        self.title = title
        self.subtitle = subtitle
        self.sections: list[Section] = []

    def section(self, title: str, *, intro: str | None = None) -> Section:
        """Append and return a new section; ``intro`` is an optional first paragraph."""
        anchor = f"s{len(self.sections) + 1}"
        sec = Section(title=title, anchor=anchor)
        if intro:
            sec.paragraph(intro)
        self.sections.append(sec)
        return sec

    def include(self, other: Page, prefix: str = "") -> None:
        """Append the sections of ``other`` (titles prefixed with ``prefix``), re-anchored."""
        for sec in other.sections:
            self.section(f"{prefix}{sec.title}").blocks.extend(sec.blocks)

    def render(self) -> str:
        """The page as one HTML string (style inlined, no external resources, no scripts)."""
        css = resources.files("modalign.report").joinpath("style.css").read_text("utf-8")
        toc = "".join(f'<a href="#{s.anchor}">{_html.escape(s.title)}</a>' for s in self.sections)
        sub = f"<p>{_html.escape(self.subtitle)}</p>" if self.subtitle else ""
        body = "\n".join(
            f'<section id="{s.anchor}"><h2>{_html.escape(s.title)}</h2>\n' + "\n".join(s.blocks)
            + "</section>"
            for s in self.sections
        )
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_html.escape(self.title)}</title><style>{css}</style></head>\n"
            f'<body><main><header class="page"><h1>{_html.escape(self.title)}</h1>{sub}</header>'
            f'<nav class="toc">{toc}</nav>\n{body}\n</main></body></html>\n'
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Render and write the page atomically; returns the path."""
        path = Path(path)
        write_bytes_atomic(path, self.render().encode("utf-8"))
        return path
