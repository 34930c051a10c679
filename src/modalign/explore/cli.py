"""``modalign explore``: write (or serve) the interactive page of a joint embedding space."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from modalign.cli_support import add_command, add_debug_flag

DESCRIPTION = """\
Write one self-contained, offline HTML page of a joint embedding space: a 2-d map (PCA, or UMAP
with the explore-umap extra) coloured by modality, positive pairs joinable, the gap vector drawn
between the centroids; hover shows the item; a click lists the top-k in each modality natively,
after a post-hoc bridge, and for its inverted twin (OTI/OVI arrays of the store, drawn with an
arrow); a slider moves one modality along the gap vector and redraws map and lists; a panel gives
gap, separability, uniformity and cone of what is shown. Above --max-points rows, whole groups are
sampled (seeded) and the page says so. --serve serves the page on 127.0.0.1 with a query box
(text or an uploaded image) encoded by the model; Ctrl-C stops it.
"""

EPILOG = """\
examples:
  modalign explore --model runs/emoji-clip/model --data emoji --out explore.html
  modalign explore --embeddings runs/joint-store --split test --bridge invgc
  modalign explore --model runs/emoji-clip/model --data emoji --serve --port 8765
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "explore", run=run, description=DESCRIPTION, epilog=EPILOG,
                    help="an interactive page of a joint space (map, neighbours, gap slider, "
                         "twins)")
    src = p.add_argument_group("input")
    src.add_argument("--model", metavar="DIR", help="a trained model folder (modalign train)")
    src.add_argument("--data", metavar="DATA",
                     help="with --model: emoji, a manifest or a dataset folder")
    src.add_argument("--embeddings", metavar="DIR",
                     help="an embedding store: joint vectors, or with --model tower features")
    src.add_argument("--inverted", metavar="DIR",
                     help="another store holding inverted arrays (modalign invert); the input "
                          "store is always searched")
    p.add_argument("--split", default="test",
                   help="rows shown (default test; 'all' for every row); the bridge and the gap "
                        "vector are fitted on the train split")
    p.add_argument("--modalities", default=None, metavar="A,B",
                   help="comma-separated modalities (default: all)")
    p.add_argument("--pair", default=None, metavar="A,B",
                   help="gap vector mean(A) - mean(B); the slider moves B (default: the first "
                        "two modalities)")
    p.add_argument("--bridge", default="centering",
                   help="post-hoc bridge spec for the second neighbour list, e.g. centering, "
                        "meanshift:source=text,target=image, invgc, localadj, a+b chains, or "
                        "'none' (default centering)")
    p.add_argument("--shifts", default=None, metavar="X,Y,...",
                   help="slider positions in multiples of the gap vector "
                        "(default -0.5,-0.25,0,0.25,0.5,0.75,1,1.25)")
    p.add_argument("--projection", default="pca", choices=("pca", "umap"),
                   help="2-d map (default pca; umap needs the explore-umap extra)")
    p.add_argument("--k", type=int, default=5, help="neighbours per modality (default 5)")
    p.add_argument("--max-points", type=int, default=5000, metavar="N",
                   help="rows shown at most; above it whole groups are sampled (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and the projection")
    p.add_argument("--out", default="explore.html", metavar="HTML",
                   help="the page to write (default ./explore.html)")
    p.add_argument("--title", default=None, help="page title")
    srv = p.add_argument_group("serving")
    srv.add_argument("--serve", action="store_true",
                     help="serve the page with a query box encoded by the model (needs --model)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks one)")
    add_debug_flag(p)


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def run(args: argparse.Namespace) -> int:
    from modalign.errors import ModalignError
    from modalign.explore.build import ExploreOptions, ExploreSpace, build_explore
    from modalign.explore.page import render_page
    from modalign.explore.sources import load_sources
    from modalign.geometry.gapshift import DEFAULT_SHIFTS
    from modalign.io import dumps, write_bytes_atomic

    if args.serve and args.model is None:
        raise ModalignError("--serve encodes queries with the model: pass --model DIR")
    pair = _csv(args.pair)
    if pair is not None and len(pair) != 2:
        raise ModalignError(f"--pair: expected two modalities A,B, got {args.pair!r}")
    try:
        shifts = _csv(args.shifts)
        amounts = tuple(float(x) for x in shifts) if shifts is not None else DEFAULT_SHIFTS
    except ValueError as e:
        raise ModalignError(f"--shifts: expected comma-separated numbers, got "
                            f"{args.shifts!r}") from e
    bridge = None if args.bridge.strip().lower() in ("", "none") else args.bridge
    split = None if args.split in ("all", "") else args.split
    t0 = time.perf_counter()
    src = load_sources(model_dir=args.model, data=args.data, embeddings_dir=args.embeddings,
                       split=split, modalities=_csv(args.modalities),
                       inverted_dir=args.inverted)
    name = Path(args.model).parent.name if args.model else Path(str(args.embeddings)).name
    opts = ExploreOptions(k=args.k, max_points=args.max_points, bridge=bridge,
                          pair=(pair[0], pair[1]) if pair else None, amounts=amounts,
                          projection=args.projection, seed=args.seed,
                          title=args.title or f"modalign explore: {name}")
    space = ExploreSpace.from_embeddings(src.shown, opts)
    data = build_explore(src.shown, bank=src.bank, inverted=src.inverted, values=src.values,
                         options=opts, source=src.source, space=space)
    out = Path(args.out)
    html = render_page(data)
    write_bytes_atomic(out, html.encode("utf-8"))
    samp = data["sampling"]
    print(dumps({"html": str(out), "bytes": len(html.encode("utf-8")),
                      "points": samp["shown_rows"], "total_rows": samp["total_rows"],
                      "sampled": samp["sampled"], "twins": [t["name"] for t in data["twins"]],
                      "seconds": round(time.perf_counter() - t0, 2)}))
    if args.serve:
        from modalign.explore.serve import make_server, model_encoder, serve_forever
        from modalign.model import MultiTowerModel

        model = MultiTowerModel.from_pretrained(args.model)
        server = make_server(render_page(data, serve=True), space, model_encoder(model),
                             host=args.host, port=args.port)
        serve_forever(server)
    return 0
