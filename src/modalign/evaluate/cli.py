"""``modalign eval``: retrieval, intra-modal retrieval and zero-shot classification, as records.

``modalign eval --model DIR --data DATA --task retrieval`` (or ``--embeddings DIR``) writes one
JSON record per run; ``modalign eval merge RECORDS... --out table.csv`` turns records into a table.
The options map one to one onto :func:`modalign.evaluate.run`, which does the work.
"""

from __future__ import annotations

import argparse
import sys

from modalign.cli_support import add_command, add_debug_flag
from modalign.evaluate.runner import INDEXES, SCORINGS, TASKS, TIES

DESCRIPTION = """\
Evaluate joint-space embeddings: cross-modal retrieval both ways, intra-modal retrieval across
views, or zero-shot classification with prompt templates, optionally after a chain of post-hoc
bridges. Metrics are exact over the full ranking, computed in memory-bounded blocks. Each run
writes one JSON record (dataset, split, model, task, protocol, bridges, seed, version, git hash,
metrics).
"""

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
  modalign eval --model runs/clip/model --in emoji:test --task ood --label subgroup \\
      --ood-values group=Flags
  modalign eval --model runs/clip/model --in my_id.csv:test --out-data my_ood.csv:test \\
      --task ood --label label

bridges (repeat --bridge to chain them; each is fitted on --bank-split, default train):
  centering                      subtract each modality's mean, renormalise
  meanshift:source=text,target=image[,scale=1]   move one modality by the gap vector
  invgc[:r_gallery=0.1,r_query=0.1]              inverse graph convolution (gallery only)
  localadj[:r_gallery=..,r_query=..,pool_rate=0.01]  InvGC with local adjacency
  close:std=0.04                 CLOSE noise (training only: the identity here)
  learned:path=DIR/ID            a bridge fitted by 'modalign fit-bridge' (Procrustes, lstsq, MLP)

metrics: recall@K (any relevant in the top K, CLIP-style), true_recall@K, precision@K, ndcg@K,
map (full ranking), map@r, r_precision, mrr; keys name the gallery as CLIP_benchmark does
(image_retrieval_recall@5 = text -> image). Zero-shot: acc1, acc5, mean_per_class_recall.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "eval", run=run, description=DESCRIPTION, epilog=_EPILOG,
                    help="evaluate retrieval, zero-shot classification and OoD detection; "
                         "write result records")
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--model", default=None, metavar="DIR",
                     help="a trained model folder; its heads project the tower features")
    src.add_argument("--data", "--in", default=None, metavar="DATA",
                     help="emoji[:options], a .csv/.jsonl manifest or a dataset folder "
                          "(with --model; with --embeddings only names the dataset)")
    src.add_argument("--embeddings", default=None, metavar="DIR",
                     help="an embedding store: joint-space vectors, or tower features with "
                          "--model")
    _choice(src, "--task", TASKS,
            "retrieval: cross-modal both ways; intra: within one modality; zeroshot: "
            "classification; ood: out-of-distribution detection; compositional: captions "
            "against rule-based negatives (default retrieval)")
    src.add_argument("--split", default="test",
                     help="split evaluated: train, val, test or all (default test)")
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
    _choice(proto, "--ties", TIES,
            "an irrelevant item with exactly the same score as a relevant one is ranked before "
            "it (pessimistic, default) or after it")
    _choice(proto, "--scoring", SCORINGS,
            "retrieval scoring: 'vector' (one embedding per item) or 'maxsim' (late "
            "interaction: --model is a [late] run's model, --embeddings a store with token "
            "arrays; text queries against concept documents)")
    proto.add_argument("--prefilter", type=int, default=0, metavar="N",
                       help="with --scoring maxsim: also report the recall of a centroid "
                            "prefilter of N candidates against exact MaxSim")
    _choice(proto, "--index", INDEXES,
            "retrieval/intra: also search with this faiss index (optional extra) and report its "
            "recall@K and its agreement with the exact top-K (default exact: exact metrics only)")
    proto.add_argument("--label", default="subgroup",
                       help="zeroshot: label name holding the class (default subgroup)")
    proto.add_argument("--template", action="append", default=None, metavar="TEXT",
                       help="zeroshot: prompt template with {} for the class name; repeat for "
                            "several (default: 'a photo of a {}.', 'an emoji of {}.', ...)")
    proto.add_argument("--class-embeddings", default=None, metavar="FILE",
                       help="zeroshot without --model: class prototypes written by "
                            "modalign.evaluate.zeroshot.save_class_embeddings")
    ood = p.add_argument_group("ood: out-of-distribution detection (inputs: --modality)")
    ood.add_argument("--out-data", default=None, metavar="DATA[:split]",
                     help="OOD inputs from another dataset or manifest (with --model); the "
                          "split defaults to --split")
    ood.add_argument("--ood-values", default=None, metavar="LABEL=V1,V2",
                     help="OOD inputs held out of --data by label value, e.g. group=Flags; "
                          "those classes are dropped from the ID classes and the kNN bank")
    ood.add_argument("--temperature", type=float, default=1.0,
                     help="temperature of the MCM and energy scores on cosines (default 1)")
    ood.add_argument("--scores", default="mcm,energy,max_logit,knn",
                     help="scores to compute (default mcm,energy,max_logit,knn; knn uses the "
                          "--bank-split ID rows)")
    ood.add_argument("--knn-k", type=int, default=1, help="neighbour rank of knn (default 1)")
    bridge = p.add_argument_group("bridges and inverted queries")
    bridge.add_argument("--bridge", action="append", default=[], metavar="SPEC",
                        help="a post-hoc bridge, NAME[:key=value,...]; repeat to chain (see below)")
    bridge.add_argument("--bank-split", default="train",
                        help="split the bridges are fitted on (default train)")
    bridge.add_argument("--inverted", action="append", default=[], metavar="QUERY=METHOD",
                        help="replace the queries QUERY (image, or image:noto) by their "
                             "inversion from 'modalign invert' (METHOD oti or ovi, found in the "
                             "store of this model, data and split; METHOD:latest picks the "
                             "newest of several; or an exact array name), matched by item id")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="eval-records", metavar="DIR|FILE.json",
                     help="record folder or file (default ./eval-records)")
    out.add_argument("--name", default=None,
                     help="a name for this run in the record and the table (default: the "
                          "model's run folder)")
    out.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                     help="resamples of the queries for 95%% intervals, and for paired "
                          "differences against native with --bridge/--inverted (default 1000; "
                          "0: off)")
    out.add_argument("--seed", type=int, default=0,
                     help="seed of the bootstrap, stored in the record (default 0)")
    out.add_argument("--chunk-size", type=int, default=1 << 22, metavar="N",
                     help="query-gallery scores held in memory at once (default 4194304)")
    add_debug_flag(out)

    sub_eval = p.add_subparsers(dest="eval_command", metavar="{merge}")
    merge = add_command(
        sub_eval, "merge", run=run_merge, help="merge records into one CSV table",
        description="Read evaluation records (files, or folders of *.json) and write one CSV row "
                    "per record: the settings, then every metric (the union over records).")
    merge.add_argument("records", nargs="+", help="record files or folders")
    merge.add_argument("--out", required=True, metavar="FILE.csv", help="CSV file to write")


def _choice(group: argparse._ArgumentGroup, flag: str, choices: tuple[str, ...],
            help: str) -> None:
    """An option whose default is the first of its choices (the library's default too)."""
    group.add_argument(flag, choices=choices, default=choices[0], help=help)


def run_merge(args: argparse.Namespace) -> int:
    from modalign.evaluate.records import merge_records, write_csv

    rows = merge_records(args.records)
    path = write_csv(rows, args.out)
    print(f"merged {len(rows)} records into {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """``modalign eval``: :func:`modalign.evaluate.runner.run` with the parsed options."""
    from modalign.evaluate.runner import run as run_eval

    outcome = run_eval(
        model=args.model, data=args.data, embeddings=args.embeddings, task=args.task,
        split=args.split, modalities=args.modalities, modality=args.modality,
        query_view=args.query_view, gallery_view=args.gallery_view, relevance=args.relevance,
        k=args.k, ties=args.ties, scoring=args.scoring, prefilter=args.prefilter,
        index=args.index, label=args.label, templates=args.template,
        class_embeddings=args.class_embeddings, out_data=args.out_data,
        ood_values=args.ood_values, temperature=args.temperature, scores=args.scores,
        knn_k=args.knn_k, bridges=args.bridge, bank_split=args.bank_split,
        inverted=args.inverted, bootstrap=args.bootstrap, seed=args.seed,
        chunk_size=args.chunk_size, name=args.name, out=args.out,
        progress=sys.stderr.isatty())
    if outcome.lines:
        print(outcome.table())
    print(f"record: {outcome.path}")
    return 0
