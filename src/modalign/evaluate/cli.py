"""``modalign eval``: retrieval, intra-modal retrieval and zero-shot classification, as records.

``modalign eval --model DIR --data DATA --task retrieval`` (or ``--embeddings DIR``) writes one
JSON record per run; ``modalign eval merge RECORDS... --out table.csv`` turns records into a table.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modalign.errors import SmallDataWarning

TASKS = ("retrieval", "intra", "zeroshot", "ood", "compositional")

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
  modalign eval --model runs/clip/model --in emoji:test --task ood --label subgroup \
      --ood-values group=Flags
  modalign eval --model runs/clip/model --in my_id.csv:test --out-data my_ood.csv:test \
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
    p = sub.add_parser(
        "eval", help="evaluate retrieval, zero-shot classification and OoD detection; "
                     "write result records",
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
    src.add_argument("--data", "--in", default=None, metavar="DATA",
                     help="emoji[:options], a .csv/.jsonl manifest or a dataset folder "
                          "(with --model; with --embeddings only names the dataset)")
    src.add_argument("--embeddings", default=None, metavar="DIR",
                     help="an embedding store: joint-space vectors, or tower features with "
                          "--model")
    src.add_argument("--task", choices=TASKS, default="retrieval",
                     help="retrieval: cross-modal both ways; intra: within one modality; "
                          "zeroshot: classification; ood: out-of-distribution detection "
                          "(default retrieval)")
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
    proto.add_argument("--ties", choices=("pessimistic", "optimistic"), default="pessimistic",
                       help="an irrelevant item with exactly the same score as a relevant one is "
                            "ranked before it (pessimistic, default) or after it")
    proto.add_argument("--scoring", choices=("vector", "maxsim"), default="vector",
                       help="retrieval scoring: 'vector' (one embedding per item) or 'maxsim' "
                            "(late interaction: --model is a [late] run's model, --embeddings "
                            "a store with token arrays; text queries against concept documents)")
    proto.add_argument("--prefilter", type=int, default=0, metavar="N",
                       help="with --scoring maxsim: also report the recall of a centroid "
                            "prefilter of N candidates against exact MaxSim")
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

    torch.manual_seed(args.seed)
    if args.scoring == "maxsim":
        return _maxsim_retrieval(args)
    _check_arguments(args)
    if args.task == "ood":
        return _run_ood(args)
    inverted = _resolve_inverted(args)  # before any tower runs: a wrong name fails at once
    joint = load_joint(model_dir=args.model, embeddings_dir=args.embeddings,
                       data=args.data if args.model else None, split=None,
                       progress=sys.stderr.isatty())
    test = _split_rows(joint, args.split, "--split")
    bank = _split_rows(joint, args.bank_split, "--bank-split") if args.bridge else None
    test, overrides, inversion = _inverted_queries(args, test, inverted)
    result = _evaluate(args, joint, test, bank, overrides, inversion)
    baseline = None
    if args.bootstrap and (args.bridge or overrides):
        baseline = _evaluate(args, joint, test, None, {}, None)
    _write_and_print(args, result, baseline)
    _small_data_warnings(result, args.split)
    return 0


def _small_data_warnings(result: Any, split: str, minimum: int = 30) -> None:
    """Say so when a metric rests on fewer than ``minimum`` queries."""
    counts = [(f"{d['query']} → {d['gallery']}", d["num_queries"])
              for d in result.protocol.get("directions", [])]
    if "num_inputs" in result.protocol:
        counts.append(("zero-shot", result.protocol["num_inputs"]))
    small = [f"{name}: {n}" for name, n in counts if n < minimum]
    if small:
        more = ("" if split == "all" else
                "; a 'split' column in the manifest or --split all gives more")
        warnings.warn(f"few queries ({', '.join(small)}) in split {split!r}: read the "
                      f"intervals, not the third decimal{more}", SmallDataWarning, stacklevel=2)


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked without loading data or towers."""
    from modalign.errors import ModalignError
    from modalign.evaluate.inverted import parse_inverted

    if args.model is None and args.embeddings is None:
        raise ModalignError("pass --model DIR (with --data DATA) or --embeddings DIR")
    if args.model is not None:
        from modalign.evaluate.semantic import resolve_model_dir

        resolve_model_dir(args.model)
        if args.data is None and args.embeddings is None:
            raise ModalignError("--model needs --data DATA (or --embeddings DIR of tower "
                                "features)")
    if any(k < 1 for k in args.k):
        raise ModalignError(f"--k {args.k}: expected positive cut-offs")
    if args.bootstrap < 0:
        raise ModalignError(f"--bootstrap {args.bootstrap}: expected 0 (off) or a number of "
                            "resamples such as 1000")
    if args.task == "retrieval":
        _pair(args)
    for spec in args.inverted:
        parse_inverted(spec)


def _pair(args: argparse.Namespace) -> tuple[str, str]:
    from modalign.errors import ModalignError

    pair = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ModalignError(f"--modalities {args.modalities!r}: expected two different "
                            "modalities, e.g. image,text")
    return pair[0], pair[1]


def _split_rows(joint: Mapping[str, Any], split: str, option: str) -> dict[str, Any]:
    """The rows of ``split`` (``all``: every row), with a clear error when one is empty."""
    from modalign.errors import ModalignError

    if split == "all":
        return dict(joint)
    out = {m: e.filter(split=split) for m, e in joint.items()}
    for m, e in out.items():
        if len(e) == 0:
            present = sorted({it.get("split", "") for it in joint[m].items})
            raise ModalignError(f"{option} {split!r}: the {m} items have no rows in that split "
                                f"(splits present: {present}); pass {option} all to use every "
                                "row")
    return out


def _evaluate(args: argparse.Namespace, joint: Mapping[str, Any], test: Mapping[str, Any],
              bank: Mapping[str, Any] | None, overrides: Mapping[str, Any],
              inversion: Mapping[str, Any] | None) -> Any:
    bridges = args.bridge if bank is not None else []
    common: dict[str, Any] = {"bridges": bridges, "ties": args.ties,
                              "chunk_size": args.chunk_size}
    progress = sys.stderr.isatty()
    if args.task == "retrieval":
        from modalign.evaluate.retrieval import cross_modal_retrieval

        return cross_modal_retrieval(test, _pair(args), relevance=args.relevance,
                                     k_values=args.k, bank=bank, queries_override=overrides,
                                     inversion=inversion, progress=progress, index=args.index,
                                     **common)
    if args.task == "intra":
        from modalign.evaluate.retrieval import intra_modal_retrieval

        emb = _modality(test, args.modality)
        return intra_modal_retrieval(
            emb, args.modality, query_view=args.query_view, gallery_view=args.gallery_view,
            relevance=args.relevance, k_values=args.k,
            bank=bank[args.modality] if bank is not None else None, queries_override=overrides,
            inversion=inversion, progress=progress, index=args.index, **common)
    if args.task == "compositional":
        return _compositional(args, test)
    return _zero_shot(args, joint, test, bank, overrides, inversion, common)


def _write_and_print(args: argparse.Namespace, result: Any, baseline: Any | None) -> None:
    from modalign.evaluate.bootstrap import bootstrap_intervals, paired_bootstrap
    from modalign.evaluate.records import make_record, write_record
    from modalign.naming import dataset_name

    intervals: dict[str, tuple[float, float]] = {}
    comparisons = []
    boot = None
    if args.bootstrap:
        boot = {"samples": args.bootstrap, "seed": args.seed, "level": 0.95, "unit": "query",
                "method": "percentile"}
        intervals = bootstrap_intervals(result.per_query, samples=args.bootstrap, seed=args.seed)
        if baseline is not None:
            what = [w for w, on in (("bridges", bool(args.bridge)),
                                    ("inverted queries", bool(result.inversion))) if on]
            comparisons.append({
                "baseline": "native", "treatment": " + ".join(what), "paired": True,
                "differences": paired_bootstrap(result.per_query, baseline.per_query,
                                                samples=args.bootstrap, seed=args.seed)})
    model = args.model or f"embeddings:{args.embeddings}"
    dataset = (_store_display_name(args)
               or (dataset_name(args.data) if args.data else Path(str(args.embeddings)).name))
    record = make_record(dataset=dataset, split=args.split, model=model, task=result.task,
                         protocol=result.protocol, metrics=result.metrics,
                         bridges=result.bridges, inversion=result.inversion, seed=args.seed,
                         name=args.name, intervals=intervals, bootstrap=boot,
                         comparisons=comparisons)
    path = write_record(record, args.out)
    _print_summary(result, intervals, comparisons,
                   _pair(args) if args.task == "retrieval" else None)
    print(f"record: {path}")


def _store_display_name(args: argparse.Namespace) -> str | None:
    """The name given with ``modalign embed --name`` to the store this evaluation read."""
    from modalign.embed.store import DATASET_INFO, EmbeddingStore

    if args.embeddings is not None:
        path = Path(args.embeddings)
    elif args.model is not None and args.data and (Path(args.model) / "config.json").is_file():
        from modalign.data import load_dataset
        from modalign.embed.paths import default_store_dir
        from modalign.io import read_json

        towers = (read_json(Path(args.model) / "config.json").get("model") or {}).get("towers")
        if not towers:
            return None
        path = default_store_dir(load_dataset(args.data), dict(towers))
    else:
        return None
    return EmbeddingStore(path).display_name if (path / DATASET_INFO).is_file() else None


def _compositional(args: argparse.Namespace, test: Mapping[str, Any]) -> Any:
    """Each --modality item against its group's caption (the ``name`` text) and rule-based
    negatives of that caption, encoded by the model's text tower."""
    import numpy as np
    import torch

    from modalign.errors import ModalignError
    from modalign.evaluate.compositional import evaluate_compositional
    from modalign.model import MultiTowerModel

    if not args.model:
        raise ModalignError("--task compositional needs --model DIR (its text tower encodes the "
                         "generated negative captions)")
    model = MultiTowerModel.from_pretrained(args.model)
    if "text" not in model.modalities:
        raise ModalignError(f"--task compositional: the model {args.model} has no text tower")
    queries, texts = _modality(test, args.modality), _modality(test, "text")
    caption: dict[str, str] = {}
    for it in sorted(texts.items, key=lambda it: it.get("view") != "name"):
        if it.get("value"):
            caption.setdefault(it["group"], str(it["value"]))
    rows = [i for i, it in enumerate(queries.items) if it["group"] in caption]
    if not rows:
        raise ModalignError(f"--task compositional: no {args.modality} item of --split "
                         f"{args.split!r} has a caption in its group")
    z = torch.as_tensor(np.asarray(queries.vectors))[rows]
    return evaluate_compositional(z, [caption[queries.items[i]["group"]] for i in rows],
                                  lambda t: model.encode("text", t), seed=args.seed)


def _zero_shot(args: argparse.Namespace, joint: Mapping[str, Any], test: Mapping[str, Any],
               bank: Mapping[str, Any] | None, overrides: Mapping[str, Any],
               inversion: Mapping[str, Any] | None, common: Mapping[str, Any]) -> Any:
    from modalign.evaluate.zeroshot import (
        default_templates,
        resolve_classes,
        zero_shot_classification,
    )

    if args.label == "group":
        joint = {m: _group_as_label(e) for m, e in joint.items()}
        test = {m: _group_as_label(e) for m, e in test.items()}
        bank = {m: _group_as_label(e) for m, e in bank.items()} if bank is not None else None
    inputs = _modality(test, args.modality)
    templates = (tuple(args.template) if args.template
                 else default_templates(str(args.data or "")))
    classnames, prototypes, templates = resolve_classes(
        "zeroshot", joint[args.modality].labels(args.label), label=args.label,
        class_embeddings=args.class_embeddings, model_dir=args.model, templates=templates)
    if len(classnames) <= 5:
        warnings.warn(f"zero-shot with {len(classnames)} classes: acc5 counts the true class "
                      f"among the top 5 of {len(classnames)}, so it means little",
                      SmallDataWarning, stacklevel=2)
    return zero_shot_classification(
        inputs, prototypes, classnames, label=args.label, input_key=args.modality,
        prototype_key="text", bridges=common["bridges"], bank=bank,
        query_override=overrides.get(args.modality), inversion=inversion,
        templates=templates, ties=common["ties"], chunk_size=common["chunk_size"])


def _run_ood(args: argparse.Namespace) -> int:
    """``--task ood``: ID inputs from --data, OOD inputs from --out-data or --ood-values."""
    from modalign.errors import ModalignError
    from modalign.evaluate.ood import ood_cli_task
    from modalign.evaluate.records import make_record, write_record

    if args.model is None and args.embeddings is None:
        raise ModalignError("--task ood: pass --model DIR (with --in DATA) or --embeddings DIR")
    result, dataset = ood_cli_task(args)
    metrics = {k: v for k, v in result.metrics.items() if not k.endswith(("_lo", "_hi"))}
    intervals = {k: [result.metrics[f"{k}_lo"], result.metrics[f"{k}_hi"]] for k in metrics
                 if f"{k}_lo" in result.metrics}
    record = make_record(dataset=dataset, split=args.split, model=args.model or
                         f"embeddings:{args.embeddings}", task=result.task,
                         protocol=result.protocol, metrics=metrics, seed=args.seed,
                         name=args.name, intervals=intervals,
                         bootstrap=result.protocol.get("intervals"))
    path = write_record(record, args.out)
    for key, value in metrics.items():
        if key.endswith(("/auroc", "/fpr@95tpr", "/aupr_in")) or key == "id_acc1":
            lo_hi = intervals.get(key)
            ci = f"  [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else ""
            print(f"  {key:<20}  {value:.4f}{ci}")
    print(f"record: {path}")
    return 0


def _resolve_inverted(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """``--inverted`` values -> query key -> (store, array name), resolved before loading."""
    if not args.inverted:
        return {}
    from modalign.embed.store import EmbeddingStore
    from modalign.evaluate.inverted import parse_inverted, resolve_inverted
    from modalign.io import cached_file_hash

    if args.embeddings is not None:
        store = EmbeddingStore(args.embeddings)
    else:
        from modalign.data import load_dataset
        from modalign.embed.paths import default_store_dir
        from modalign.model import MultiTowerModel

        towers = MultiTowerModel.from_pretrained(args.model).config.towers
        store = EmbeddingStore(default_store_dir(load_dataset(args.data), towers))
    weights = (cached_file_hash(Path(args.model) / "model.safetensors") if args.model is not None
               else None)
    out = {}
    for raw in args.inverted:
        spec = parse_inverted(raw)
        out[spec.query] = (store, resolve_inverted(spec, store, split=args.split,
                                                   model_weights=weights))
    return out


def _inverted_queries(args: argparse.Namespace, test: Mapping[str, Any],
                      inverted: Mapping[str, tuple[Any, str]]
                      ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Replace query sets by inverted arrays, matched by item id.

    An array that covers only some of the queries (``modalign invert --limit``) restricts the
    evaluation to those items of that modality; the record says how many.
    """
    if not inverted:
        return dict(test), {}, None
    import numpy as np
    import torch

    from modalign.errors import ModalignError

    test = dict(test)
    overrides: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    for key, (store, name) in inverted.items():
        modality, _, view = key.partition(":")
        features = store.load(name, split=None if args.split == "all" else args.split)
        row = {it["id"]: i for i, it in enumerate(features.items)}
        rows = _modality(test, modality)
        queries = rows.filter(view=view) if view else rows
        covered = [it["id"] in row for it in queries.items]
        if not any(covered):
            raise ModalignError(f"--inverted {key}={name}: the array has none of the "
                                f"{len(queries)} {key} query ids of split {args.split!r}")
        total = len(queries)
        if not all(covered):  # evaluate on the inverted subset of this modality
            keep = [it["id"] in row or (view and it.get("view") != view) for it in rows.items]
            test[modality] = rows.subset(np.array(keep, dtype=bool))
            rows = test[modality]
            queries = rows.filter(view=view) if view else rows
        order = np.array([row[it["id"]] for it in queries.items], dtype=np.int64)
        overrides[key] = torch.from_numpy(np.asarray(features.vectors[order], dtype=np.float32))
        arrays[key] = {"array": name, "num_queries": len(queries), "of": total,
                       **{k: v for k, v in store.info(name).items()
                          if k not in ("file", "count", "dtype")}}
    return test, overrides, {"name": "inverted-queries", "queries": arrays}


def _group_as_label(emb: Any) -> Any:
    """The rows with their group as the label ``group`` (where they carry no such label)."""
    from modalign.embed.store import Embeddings

    items = [it if (it.get("labels") or {}).get("group")
             else {**it, "labels": {**(it.get("labels") or {}), "group": it["group"]}}
             for it in emb.items]
    return Embeddings(emb.vectors, items, emb.group_index)


def _modality(embeddings: Mapping[str, Any], modality: str) -> Any:
    if modality not in embeddings:
        raise ValueError(f"--modality {modality!r}: not among the embeddings "
                         f"({sorted(embeddings)})")
    return embeddings[modality]


def _print_summary(result: Any, intervals: Mapping[str, Any],
                   comparisons: list[dict[str, Any]], pair: tuple[str, str] | None) -> None:
    """The headline metrics, directions in words, with intervals and paired differences."""
    from modalign.evaluate.vocabulary import describe_metric

    headline = re.compile(r"(_retrieval_recall@\d+|_map|_mrr|^acc1|^acc5|^mean_per_class_recall)$")
    shown = [k for k in result.metrics if headline.search(k)]
    queries = pair or {d["gallery"]: d["query"] for d in result.protocol.get("directions", [])}
    labels = {k: describe_metric(k, queries) for k in shown}
    width = max((len(v) for v in labels.values()), default=0)
    diffs = comparisons[0]["differences"] if comparisons else {}
    for key in shown:
        value = result.metrics[key]
        line = f"  {labels[key]:<{width}}  {value:.4f}"
        if key in intervals:
            lo, hi = intervals[key]
            line += f"  [{lo:.4f}, {hi:.4f}]"
        if key in diffs:
            d = diffs[key]
            lo, hi = d["interval"]
            verdict = "" if lo <= 0.0 <= hi else "  *"
            line += f"  vs native {d['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]{verdict}"
        print(line)
    if intervals:
        print("  [..]: 95% bootstrap interval over queries"
              + ("; vs native: paired difference, * where the interval excludes 0"
                 if diffs else ""))


def _maxsim_retrieval(args: argparse.Namespace) -> int:
    """``--task retrieval --scoring maxsim``: late-interaction retrieval, one record."""
    from modalign.errors import ModalignError
    from modalign.evaluate.records import make_record, write_record
    from modalign.late.model import evaluate_late

    if args.task != "retrieval" or not args.model or not args.embeddings:
        raise ModalignError("--scoring maxsim: expected --task retrieval, --model (a late-"
                            "interaction model folder) and --embeddings (its token store)")
    out = evaluate_late(args.model, args.embeddings, split=args.split, k_values=args.k,
                        prefilter=args.prefilter)
    protocol = {k: v for k, v in out.items() if k != "metrics"}
    record = make_record(dataset=Path(str(args.embeddings)).name, split=args.split,
                         model=args.model, task="retrieval:maxsim",
                         protocol={**protocol, "scoring": "maxsim"}, metrics=out["metrics"],
                         seed=args.seed)
    path = write_record(record, args.out)
    width = max(len(k) for k in out["metrics"])
    for key, value in out["metrics"].items():
        print(f"  {key:<{width}}  {value:.4f}")
    print(f"record: {path}")
    return 0
