"""Reports: self-contained HTML pages with inline figures, and a headless-browser check for them."""

from modalign.report.html import Page, Section, figure_html, format_value, table_html

__all__ = ["Page", "Section", "figure_html", "format_value", "table_html"]
