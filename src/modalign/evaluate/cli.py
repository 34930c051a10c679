"""``modalign eval``: retrieval, intra-modal retrieval and zero-shot classification, as records.

``modalign eval --model DIR --data DATA --task retrieval`` (or ``--embeddings DIR``) writes one
JSON record per run; ``modalign eval merge RECORDS... --out table.csv`` turns records into a table.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TASKS = ("retrieval", "intra", "zeroshot")

_EPILOG = """\
examples:
  modalign eval --model runs/clip/model --data emoji --task retrieval
  modalign eval --model runs/clip/model --data emoji --task retrieval \\
      --bridge centering --bridge localadj:r_gallery=0.2,r_query=0.2
  modalign eval --embeddings STORE --task intra --modality image \\
      --query-view noto --gallery-view openmoji --relevance group
  modalign eval --model runs/clip/model --data emoji --task zeroshot --label subgroup
  modalign eval --embeddings STORE --task zeroshot --label group \\
      --class-embeddings classes.safetensors
  modalign eval merge runs/eval/ --out table.csv

bridges (repeat --bridge to chain them; each is fitted on --bank-split, default train):
  centering                      subtract each modality's mean, renormalise
  meanshift:source=text,target=image[,scale=1]   move one modality by the gap vector
  invgc[:r_gallery=0.1,r_query=0.1]              inverse graph convolution (gallery only)
  localadj[:r_gallery=..,r_query=..,pool_rate=0.01]  InvGC with local adjacency
  close:std=0.04                 CLOSE noise (training only: the identity here)

metrics: recall@K (any relevant in the top K, CLIP-style), true_recall@K, precision@K, ndcg@K,
map (full ranking), map@r, r_precision, mrr; keys name the gallery as CLIP_benchmark does
(image_retrieval_recall@5 = text -> image). Zero-shot: acc1, acc5, mean_per_class_recall.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate retrieval and zero-shot classification; write result records",
        description="Evaluate joint-space embeddings: cross-modal retrieval both ways, "
                    "intra-modal retrieval across views, or zero-shot classification with "
                    "prompt templates, optionally after a chain of post-hoc bridges. Metrics are "
                    "exact over the full ranking, computed in memory-bounded blocks. Each run "
                    "writes one JSON record (dataset, split, model, task, protocol, bridges, "
                    "seed, version, git hash, metrics).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--model", default=None, metavar="DIR",
                     help="a trained model folder; its heads project the tower features")
    src.add_argument("--data", default=None, metavar="DATA",
                     help="emoji[:options], a .csv/.jsonl manifest or a dataset folder "
                          "(with --model; with --embeddings only names the dataset)")
    src.add_argument("--embeddings", default=None, metavar="DIR",
                     help="an embedding store: joint-space vectors, or tower features with "
                          "--model")
    src.add_argument("--task", choices=TASKS, default="retrieval",
                     help="retrieval: cross-modal both ways; intra: within one modality; "
                          "zeroshot: classification (default retrieval)")
    src.add_argument("--split", default="test", help="split evaluated (default test)")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--modalities", default="image,text", metavar="A,B",
                       help="the two modalities of --task retrieval (default image,text)")
    proto.add_argument("--modality", default="image",
                       help="modality of --task intra, inputs of --task zeroshot (default image)")
    proto.add_argument("--query-view", default=None, metavar="VIEW",
                       help="intra: view of the queries (e.g. noto, name); default all rows")
    proto.add_argument("--gallery-view", default=None, metavar="VIEW",
                       help="intra: view of the gallery (e.g. openmoji); with --query-view both "
                            "directions run; default all rows, queries removed from their own "
                            "ranking")
    proto.add_argument("--relevance", default="group", metavar="group|LABEL",
                       help="what counts as relevant: the same group (default) or the same "
                            "value of a label such as subgroup")
    proto.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], metavar="K",
                       help="cut-offs for the @K metrics (default 1 5 10)")
    proto.add_argument("--ties", choices=("pessimistic", "optimistic"), default="pessimistic",
                       help="an irrelevant item with exactly the same score as a relevant one is "
                            "ranked before it (pessimistic, default) or after it")
    proto.add_argument("--index", choices=("exact", "flat", "ivf", "hnsw"), default="exact",
                       help="retrieval/intra: also search with this faiss index (optional extra) "
                            "and report its recall@K and its agreement with the exact top-K "
                            "(default exact: exact metrics only)")
    proto.add_argument("--label", default="subgroup",
                       help="zeroshot: label name holding the class (default subgroup)")
    proto.add_argument("--template", action="append", default=None, metavar="TEXT",
                       help="zeroshot: prompt template with {} for the class name; repeat for "
                            "several (default: 'a photo of a {}.', 'an emoji of {}.', ...)")
    proto.add_argument("--class-embeddings", default=None, metavar="FILE",
                       help="zeroshot without --model: class prototypes written by "
                            "modalign.evaluate.zeroshot.save_class_embeddings")
    bridge = p.add_argument_group("bridges and inverted queries")
    bridge.add_argument("--bridge", action="append", default=[], metavar="SPEC",
                        help="a post-hoc bridge, NAME[:key=value,...]; repeat to chain (see below)")
    bridge.add_argument("--bank-split", default="train",
                        help="split the bridges are fitted on (default train)")
    bridge.add_argument("--inverted", action="append", default=[], metavar="QUERY=ARRAY",
                        help="replace the queries QUERY (e.g. image, or image:noto) by array "
                             "ARRAY of the --embeddings store (e.g. inverted features), matched "
                             "by item id; the record says so")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="eval-records", metavar="DIR|FILE.json",
                     help="record folder or file (default ./eval-records)")
    out.add_argument("--seed", type=int, default=0, help="seed, stored in the record (default 0)")
    out.add_argument("--chunk-size", type=int, default=1 << 22, metavar="N",
                     help="query-gallery scores held in memory at once (default 4194304)")
    out.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)

    sub_eval = p.add_subparsers(dest="eval_command", metavar="{merge}")
    merge = sub_eval.add_parser(
        "merge", help="merge records into one CSV table",
        description="Read evaluation records (files, or folders of *.json) and write one CSV row "
                    "per record: the settings, then every metric (the union over records).")
    merge.add_argument("records", nargs="+", help="record files or folders")
    merge.add_argument("--out", required=True, metavar="FILE.csv", help="CSV file to write")
    merge.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from modalign.evaluate.records import merge_records, write_csv

    rows = merge_records(args.records)
    path = write_csv(rows, args.out)
    print(f"merged {len(rows)} records into {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from modalign.embed.joint import load_joint
    from modalign.evaluate.records import make_record, write_record

    torch.manual_seed(args.seed)
    if args.model is None and args.embeddings is None:
        raise ValueError("pass --model DIR (with --data DATA) or --embeddings DIR")
    joint = load_joint(model_dir=args.model, embeddings_dir=args.embeddings,
                       data=args.data if args.model else None, split=None)
    test = {m: e.filter(split=args.split) for m, e in joint.items()}
    bank = {m: e.filter(split=args.bank_split) for m, e in joint.items()} if args.bridge else None
    for m, e in test.items():
        if len(e) == 0:
            raise ValueError(f"--split {args.split!r}: modality {m!r} has no rows in that split")
    overrides, inversion = _inverted_queries(args, test)
    common: dict[str, Any] = {"bridges": args.bridge, "ties": args.ties,
                              "chunk_size": args.chunk_size}
    if args.task == "retrieval":
        from modalign.evaluate.retrieval import cross_modal_retrieval

        pair = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
        if len(pair) != 2:
            raise ValueError(f"--modalities {args.modalities!r}: expected two, e.g. image,text")
        result = cross_modal_retrieval(test, pair, relevance=args.relevance, k_values=args.k,
                                       bank=bank, queries_override=overrides,
                                       inversion=inversion, progress=True, index=args.index,
                                       **common)
    elif args.task == "intra":
        from modalign.evaluate.retrieval import intra_modal_retrieval

        emb = _modality(test, args.modality)
        result = intra_modal_retrieval(
            emb, args.modality, query_view=args.query_view, gallery_view=args.gallery_view,
            relevance=args.relevance, k_values=args.k,
            bank=bank[args.modality] if bank is not None else None, queries_override=overrides,
            inversion=inversion, progress=True, index=args.index, **common)
    else:
        result = _zero_shot(args, joint, test, bank, overrides, inversion, common)
    model_name = args.model or f"embeddings:{args.embeddings}"
    dataset = args.data or Path(str(args.embeddings)).name
    record = make_record(dataset=dataset, split=args.split, model=model_name,
                         task=result.task, protocol=result.protocol, metrics=result.metrics,
                         bridges=result.bridges, inversion=result.inversion, seed=args.seed)
    path = write_record(record, args.out)
    _print_summary(result.metrics)
    print(f"record: {path}")
    return 0


def _zero_shot(args: argparse.Namespace, joint: Mapping[str, Any], test: Mapping[str, Any],
               bank: Mapping[str, Any] | None, overrides: Mapping[str, Any],
               inversion: Mapping[str, Any] | None, common: Mapping[str, Any]) -> Any:
    from modalign.evaluate.zeroshot import (
        DEFAULT_TEMPLATES,
        class_name,
        encode_prototypes,
        load_class_embeddings,
        zero_shot_classification,
    )

    inputs = _modality(test, args.modality)
    templates = tuple(args.template) if args.template else DEFAULT_TEMPLATES
    if args.class_embeddings:
        classnames, prototypes = load_class_embeddings(args.class_embeddings)
        templates = ()
    elif args.model:
        from modalign.model import MultiTowerModel

        model = MultiTowerModel.from_pretrained(args.model)
        if "text" not in model.modalities:
            raise ValueError(f"--task zeroshot: the model {args.model} has no text tower to "
                             "encode class prompts; pass --class-embeddings FILE")
        classnames = sorted({v for v in joint[args.modality].labels(args.label) if v})
        if not classnames:
            raise ValueError(f"--label {args.label!r}: the {args.modality} items carry no such "
                             "label")
        prototypes = encode_prototypes(lambda p: model.encode("text", p),
                                       [class_name(c) for c in classnames], templates)
    else:
        raise ValueError("--task zeroshot with --embeddings needs class prototypes: pass "
                         "--model DIR (its text tower encodes the prompts) or "
                         "--class-embeddings FILE")
    return zero_shot_classification(
        inputs, prototypes, classnames, label=args.label, input_key=args.modality,
        prototype_key="text", bridges=common["bridges"], bank=bank,
        query_override=overrides.get(args.modality), inversion=inversion,
        templates=templates, ties=common["ties"], chunk_size=common["chunk_size"])


def _inverted_queries(args: argparse.Namespace, test: Mapping[str, Any]
                      ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if not args.inverted:
        return {}, None
    import numpy as np
    import torch

    from modalign.embed.store import EmbeddingStore

    if args.embeddings is None:
        raise ValueError("--inverted QUERY=ARRAY reads ARRAY from the --embeddings store; pass "
                         "--embeddings DIR")
    store = EmbeddingStore(args.embeddings)
    overrides: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    for spec in args.inverted:
        key, eq, name = spec.partition("=")
        if not eq or not key or not name:
            raise ValueError(f"--inverted {spec!r}: expected QUERY=ARRAY, e.g. image=image_oti")
        modality, _, view = key.partition(":")
        queries = _modality(test, modality)
        if view:
            queries = queries.filter(view=view)
        features = store.load(name, split=args.split)
        row = {it["id"]: i for i, it in enumerate(features.items)}
        missing = [it["id"] for it in queries.items if it["id"] not in row]
        if missing:
            raise ValueError(f"--inverted {spec!r}: array {name!r} has no rows for "
                             f"{len(missing)} query ids (e.g. {missing[:3]})")
        order = np.array([row[it["id"]] for it in queries.items], dtype=np.int64)
        overrides[key] = torch.from_numpy(np.asarray(features.vectors[order], dtype=np.float32))
        arrays[key] = {"array": name, **{k: v for k, v in store.info(name).items()
                                         if k not in ("file", "count", "dtype")}}
    return overrides, {"name": "inverted-queries", "queries": arrays}


def _modality(embeddings: Mapping[str, Any], modality: str) -> Any:
    if modality not in embeddings:
        raise ValueError(f"--modality {modality!r}: not among the embeddings "
                         f"({sorted(embeddings)})")
    return embeddings[modality]


def _print_summary(metrics: Mapping[str, float]) -> None:
    headline = re.compile(r"(_retrieval_recall@\d+|_map|_mrr|^acc1|^acc5|^mean_per_class_recall)$")
    shown = [k for k in metrics if headline.search(k)]
    width = max((len(k) for k in shown), default=0)
    for key in shown:
        print(f"  {key:<{width}}  {metrics[key]:.4f}")
