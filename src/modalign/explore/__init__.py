"""``modalign explore``: an interactive, self-contained page of a joint embedding space.

:func:`build_explore` computes what the page shows (map, neighbours, bridge, gap shift, twins,
diagnosis); :func:`render_page` / :func:`write_page` turn it into one offline HTML file;
:mod:`modalign.explore.serve` serves it on 127.0.0.1 with a query box encoded by the model.
"""

from modalign.explore.build import ExploreOptions, build_explore
from modalign.explore.page import render_page, write_page

__all__ = ["ExploreOptions", "build_explore", "render_page", "write_page"]
