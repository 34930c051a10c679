"""``modalign encode``, ``modalign search`` and ``modalign index build``: queries against your data.

``encode`` turns texts or images into joint-space vectors; ``search`` ranks a dataset's items for
one query (the dataset's embeddings are computed once and cached in the embedding store);
``index build`` writes a faiss index with its id map that ``search --index`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from modalign.cli_support import add_command, add_command_group, add_debug_flag

_MODEL_HELP = ("a model folder (from 'modalign train'), or a joint-space tower spec such as "
               "hf-clip:PATH")

_SEARCH_EPILOG = """\
examples:
  modalign search --model runs/clip/model --data pairs.csv --text "a trash can"
  modalign search --model runs/clip/model --data pairs.csv --image photos/bin.jpg --k 5 --json
  modalign search --model hf-clip:/models/clip --data pairs.csv --text "a red bicycle"
  modalign index build --model runs/clip/model --data pairs.csv --out gallery.faiss
  modalign search --index gallery.faiss --text "a trash can"
"""


def register(sub: argparse._SubParsersAction) -> None:
    enc = add_command(
        sub, "encode", run=run_encode, help="encode texts or images into joint-space vectors",
        description="Encode raw inputs with a model's tower and head (or a joint-space tower) "
                    "into unit vectors; print a summary, or write them with --out.",
        epilog="examples:\n  modalign encode --model runs/clip/model --text 'a trash can' "
               "--text 'a cat'\n  modalign encode --model runs/clip/model --image a.png b.png "
               "--out vecs.safetensors")
    enc.add_argument("--model", required=True, metavar="DIR|SPEC", help=_MODEL_HELP)
    _query_arguments(enc, several=True)
    enc.add_argument("--out", default=None, metavar="FILE",
                     help="write the vectors: .safetensors (key 'embeddings') or .npy")
    enc.add_argument("--json", action="store_true", help="print the vectors as JSON")
    add_debug_flag(enc)

    s = add_command(
        sub, "search", run=run_search, help="search a dataset with a text or image query",
        description="Rank a dataset's items for a query and print the top K with their ids, "
                    "values (caption or path) and cosine scores. The dataset is embedded once "
                    "and cached; --index searches a faiss index written by 'modalign index "
                    "build' instead.",
        epilog=_SEARCH_EPILOG)
    s.add_argument("--model", default=None, metavar="DIR|SPEC",
                   help=_MODEL_HELP + " (with --index: default the index's model)")
    s.add_argument("--data", default=None, metavar="DATA",
                   help="the dataset searched: a .csv/.jsonl manifest, a dataset folder, emoji")
    s.add_argument("--index", default=None, metavar="FILE",
                   help="search this index (from 'modalign index build') instead of --data")
    _query_arguments(s, several=False)
    s.add_argument("--k", type=int, default=10, help="hits per query (default 10)")
    s.add_argument("--modality", default=None,
                   help="the modality searched (default: the model's other modality)")
    s.add_argument("--split", default="all",
                   help="search only this split of --data (default all)")
    s.add_argument("--json", action="store_true", help="print the hits as JSON")
    add_debug_flag(s)

    idx_sub = add_command_group(sub, "index", help="build a faiss search index of a dataset",
                                description="Search indexes on disk (faiss, with an id map).",
                                dest="index_command", metavar="{build}", exit_code=2)
    b = add_command(
        idx_sub, "build", run=run_index_build, help="write a faiss index and its id map",
        description="Embed a dataset's items of one modality and write a faiss index FILE plus "
                    "FILE.json (the id map: one row per vector, and the model and data it came "
                    "from). 'modalign search --index FILE' searches it.",
        epilog=_SEARCH_EPILOG)
    b.add_argument("--model", required=True, metavar="DIR|SPEC", help=_MODEL_HELP)
    b.add_argument("--data", required=True, metavar="DATA", help="the dataset indexed")
    b.add_argument("--out", required=True, metavar="FILE", help="index file to write")
    b.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                   help="flat: exact; ivf, hnsw: approximate, for large galleries (default flat)")
    b.add_argument("--modality", default="image", help="the modality indexed (default image)")
    b.add_argument("--split", default="all", help="index only this split (default all)")
    add_debug_flag(b)


def _query_arguments(p: argparse.ArgumentParser, several: bool) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    if several:
        group.add_argument("--text", action="append", default=None, metavar="TEXT",
                           help="a text to encode; repeat for several")
        group.add_argument("--image", nargs="+", default=None, metavar="PATH",
                           help="image files to encode")
    else:
        group.add_argument("--text", default=None, metavar="TEXT", help="a text query")
        group.add_argument("--image", default=None, metavar="PATH", help="an image query")


def _query(args: argparse.Namespace) -> tuple[str, list[str]]:
    from modalign.errors import ModalignError

    if args.text is not None:
        texts = [args.text] if isinstance(args.text, str) else list(args.text)
        if not all(t.strip() for t in texts):
            raise ModalignError("--text: expected a non-empty text")
        return "text", texts
    paths = [args.image] if isinstance(args.image, str) else list(args.image)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ModalignError(f"--image {missing[0]}: no such file")
    return "image", paths


def _progress() -> bool:
    return sys.stderr.isatty()


def run_encode(args: argparse.Namespace) -> int:
    from modalign.evaluate.semantic import JointSpace

    modality, inputs = _query(args)
    if args.out and Path(args.out).suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out {args.out}: expected a .safetensors or .npy file")
    space = JointSpace(args.model, progress=_progress())
    vectors = space.encode(modality, inputs)
    if args.out:
        _write_vectors(Path(args.out), vectors, {"model": space.name, "modality": modality})
    if args.json:
        print(json.dumps({"model": space.name, "modality": modality, "inputs": inputs,
                          "embeddings": vectors.tolist()}))
        return 0
    print(f"encoded {len(inputs)} {modality} input(s) with {space.name}: "
          f"{tuple(vectors.shape)} unit vectors" + (f" -> {args.out}" if args.out else ""))
    for text, row in zip(inputs, vectors):
        head = ", ".join(f"{v:+.3f}" for v in row[:4].tolist())
        print(f"  {text[:50]!r}: [{head}, ...]")
    return 0


def _write_vectors(path: Path, vectors: Any, meta: dict[str, str]) -> None:
    import numpy as np

    from modalign.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, vectors.numpy())
        else:
            from safetensors.torch import save_file

            save_file({"embeddings": vectors.contiguous()}, str(tmp), metadata=meta)


def run_search(args: argparse.Namespace) -> int:
    from modalign.errors import ModalignError
    from modalign.evaluate.semantic import (
        JointSpace,
        is_tower_spec,
        other_modality,
        resolve_model_dir,
        semantic_search,
    )

    if args.k < 1:
        raise ModalignError(f"--k must be a positive integer, got {args.k}")
    if (args.index is None) == (args.data is None):
        raise ModalignError("pass --data DATA (search its items) or --index FILE (search an "
                            "index from 'modalign index build'), not both")
    modality, inputs = _query(args)
    if args.model is not None and not is_tower_spec(args.model):
        from modalign.late.model import is_late_model

        if is_late_model(resolve_model_dir(args.model)):
            return _run_late_search(args, modality, inputs)
    if args.index is not None:
        from modalign.evaluate.index_file import read_index

        index, gallery, meta = read_index(args.index)
        space = JointSpace(args.model or meta.get("model", ""), progress=_progress())
        target = meta.get("modality", "?")
        if args.modality not in (None, target):
            raise ModalignError(f"--modality {args.modality!r}: the index {args.index} holds "
                                f"{target!r} items")
        where = f"index {args.index} ({meta.get('kind')}, {len(gallery)} {target} items)"
    else:
        if args.model is None:
            raise ModalignError("--data needs --model DIR|SPEC to embed the items and the query")
        space = JointSpace(args.model, progress=_progress())
        target = args.modality or other_modality(space, modality)
        space.check_modality(target)
        gallery = space.gallery(args.data, target, split=args.split)
        index = None
        where = f"{len(gallery)} {target} items of {args.data}" + (
            f" ({args.split} split)" if args.split != "all" else "")
    if index is not None and space.modalities is None and meta.get("model") != space.name:
        raise ModalignError(f"--model {space.name}: the index was built with {meta.get('model')}")
    hits = semantic_search(space.encode(modality, inputs), gallery, args.k, index=index)[0]
    return _print_hits(args, modality, inputs[0], space.name, where, hits)


def _print_hits(args: argparse.Namespace, modality: str, query: str, model: str, where: str,
                hits: list[Any]) -> int:
    if args.json:
        print(json.dumps({"query": {modality: query}, "model": model,
                          "searched": where, "hits": [h.to_dict() for h in hits]}))
        return 0
    print(f"{modality} query {query!r} -> {where}, top {len(hits)}:")
    id_width = max((len(h.id) for h in hits), default=2)
    for h in hits:
        print(f"  {h.rank:>3}  {h.score:+.4f}  {h.id:<{id_width}}  {h.value}")
    return 0


def _run_late_search(args: argparse.Namespace, modality: str, inputs: list[str]) -> int:
    """``search --model LATE_MODEL``: MaxSim of the query's tokens against the data's token
    documents (one per group, made of the rows of the model's document keys)."""
    from modalign.errors import ModalignError
    from modalign.late.search import LateSpace, late_search

    if args.index is not None:
        raise ModalignError("--index: a late-interaction model searches --data by exact MaxSim; "
                            "faiss indexes hold single vectors")
    space = LateSpace(args.model, progress=_progress())
    if args.modality not in (None, *space.document_keys):
        raise ModalignError(f"--modality {args.modality!r}: a late-interaction model searches "
                            f"its documents ({' + '.join(space.document_keys)})")
    gallery = space.gallery(args.data, split=args.split)
    where = (f"{len(gallery)} documents ({' + '.join(space.document_keys)} tokens, MaxSim) of "
             f"{args.data}" + (f" ({args.split} split)" if args.split != "all" else ""))
    hits = late_search(space.encode(modality, inputs), gallery, args.k)[0]
    return _print_hits(args, modality, inputs[0], space.name, where, hits)


def run_index_build(args: argparse.Namespace) -> int:
    import time

    from modalign.evaluate.index_file import write_index
    from modalign.evaluate.search import require_faiss
    from modalign.evaluate.semantic import JointSpace

    require_faiss()  # fail before any embedding when faiss is missing
    space = JointSpace(args.model, progress=_progress())
    space.check_modality(args.modality)
    t = time.perf_counter()
    gallery = space.gallery(args.data, args.modality, split=args.split)
    model = str(space.model_dir.resolve()) if space.model_dir is not None else space.name
    path = write_index(args.out, gallery, args.kind, meta={
        "model": model, "data": str(args.data), "modality": args.modality,
        "split": args.split})
    print(f"indexed {len(gallery)} {args.modality} items of {args.data} ({args.kind}, "
          f"{gallery.dim}-d) in {time.perf_counter() - t:.1f} s: {path} (+ {path.name}.json)")
    return 0
