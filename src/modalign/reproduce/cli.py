"""``modalign reproduce``: paper protocols on the standard datasets, in one command each."""

from __future__ import annotations

import argparse
import datetime
import sys
import textwrap
from pathlib import Path
from typing import Any

from modalign.cli_support import add_command, add_command_group, add_debug_flag
from modalign.data.benchmarks import available_benchmarks, benchmark_folder
from modalign.distributed.runtime import setup
from modalign.io import write_bytes_atomic

SUITES = ("cross-the-gap", "contrastive-gap", "clip-benchmark")

_LAYOUT_HELP = "dataset folders as published (see docs/reproduce.md)"


def register(subparsers: Any) -> None:
    """Add ``reproduce`` with its three suites to the ``modalign`` command."""
    from modalign.reproduce.clip_benchmark import DATASETS as CB_DATASETS
    from modalign.reproduce.cross_the_gap import DATASETS as CTG_DATASETS

    suites = add_command_group(
        subparsers, "reproduce", help="run a paper's protocol on the standard datasets",
        dest="suite", metavar="SUITE", exit_code=2,
        description=(
            "Run a published evaluation protocol on local copies of the standard datasets with "
            "your model (transformers CLIP/SigLIP folder, hub name, or open_clip spec). Writes one "
            "JSON record per (dataset, task, method) and a table in the paper's layout with the "
            "published figures beside ours. Nothing is downloaded; datasets are read from "
            "--data-root in their published layouts. Under torchrun, every rank embeds a shard "
            "and rank 0 merges, inverts and scores."),
        epilog=("examples:\n"
                "  modalign reproduce cross-the-gap --model openai/clip-vit-base-patch32 \\\n"
                "      --data-root /data --datasets dtd oxford_pets coco\n"
                "  modalign reproduce contrastive-gap --model ./clip-b32 --data-root /data\n"
                "  modalign reproduce clip-benchmark --model ./clip-b32 --data-root /data \\\n"
                "      --datasets imagenet coco flickr30k\n"
                "  torchrun --nproc-per-node 8 -m modalign reproduce cross-the-gap \\\n"
                "      --model ./clip-l14 --data-root /data --datasets imagenet"))

    ctg = add_command(
        suites, "cross-the-gap", run=run,
        help="image->image (native vs OTI), text->text (native vs OVI), zero-shot inter- vs "
             "intra-modal (Mistretta et al., ICLR 2025)",
        epilog=_ctg_epilog(CTG_DATASETS),
        description=(
            "Cross the Gap protocol: image->image retrieval with native vs OTI queries on CUB, "
            "SOP, ROxford5k/RParis6k and the 11 CoOp datasets; text->text retrieval with native "
            "vs OVI queries on COCO, Flickr30k and nocaps (the first caption queries the other "
            "captions) and on IMDB, 20 Newsgroups and 7 NanoBEIR sets; zero-shot "
            "classification on the CoOp datasets with image vs prompt, OTI-image vs prompt and "
            "image vs OVI-prompt classifiers. mAP over the full ranking."))
    _common(ctg, CTG_DATASETS)
    ctg.add_argument("--methods", nargs="+", choices=("native", "inversion"),
                     default=["native", "inversion"],
                     help="native features, and/or the inverted queries (default: both)")
    ctg.add_argument("--no-zero-shot", action="store_true",
                     help="skip zero-shot classification on the CoOp datasets")
    ctg.add_argument("--oti-steps", type=int, default=150, help="OTI steps (default 150)")
    ctg.add_argument("--ovi-steps", type=int, default=1000, help="OVI steps (default 1000)")
    ctg.add_argument("--oti-tokens", type=int, default=1, help="OTI pseudo-tokens R (default 1)")
    ctg.add_argument("--ovi-tokens", type=int, default=None,
                     help="OVI pseudo-patches P (default: from the architecture and the official "
                          "configs: OpenAI B/32 1, OpenAI L/14 4, OpenCLIP B/32 1, OpenCLIP L/14 "
                          "2, SigLIP B/16 4; 1 with a warning otherwise)")
    ctg.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                     help="inversion precision on CUDA: fp16 autocast with a gradient scaler "
                          "(the official code; default), bf16 autocast, or fp32. The CPU runs "
                          "fp32; stored features are always recomputed in fp32")
    ctg.add_argument("--template", default="a photo of {}",
                     help="OTI template and OVI class prompt (default 'a photo of {}')")
    ctg.add_argument("--inversion-batch-size", type=int, default=64,
                     help="samples optimised together (default 64)")
    ctg.add_argument("--max-queries", type=int, default=None,
                     help="evenly spaced subset of the queries per dataset, for a quick look "
                          "(default: all)")
    ctg.add_argument("--paper-model", default=None,
                     help="published row to print beside ours: 'CLIP B/32', 'CLIP L/14', "
                          "'SigLIP B/16', 'SLIP B/16' (default: matched from --model)")

    cg = add_command(
        suites, "contrastive-gap", run=run, help="gap metrics on COCO pairs (Fahim et al. 2024)",
        description=(
            "Contrastive-gap metrics on COCO image + first-caption pairs of a Karpathy split "
            "(default val, 5,000 pairs): mean positive cosine, centroid distance, linear "
            "separability, uniformity, alignment, cross-uniformity, R@1 both ways. The table "
            "lists the published figures (CLIP trained on COCO, dims 32-128) for reference."))
    _common(cg, None)
    cg.add_argument("--split", default="val", choices=("train", "val", "test"),
                    help="Karpathy split of COCO (default val)")
    cg.add_argument("--max-pairs", type=int, default=None, help="use the first N pairs only")

    cb = add_command(
        suites, "clip-benchmark", run=run,
        help="zero-shot classification and retrieval, CLIP_benchmark keys",
        description=(
            "The CLIP_benchmark tasks with its metric names: zeroshot_classification (acc1, acc5, "
            "mean_per_class_recall) on the CoOp datasets' test splits (ImageNet: val, 80 OpenAI "
            "templates) and zeroshot_retrieval (image_retrieval_recall@K, text_retrieval_recall@K) "
            "on the COCO and Flickr30k Karpathy test splits."))
    _common(cb, CB_DATASETS)


def _ctg_epilog(datasets: tuple[str, ...]) -> str:
    """The backbones and datasets ``reproduce cross-the-gap`` runs (its --help epilog)."""
    from modalign.reproduce.cross_the_gap import TEXT_DATASETS

    images = [d for d in datasets if d not in TEXT_DATASETS]
    texts = [d for d in datasets if d in TEXT_DATASETS]
    return "\n".join([
        "backbones (--model):",
        "  hf-clip:DIR or a CLIPModel folder       OpenAI CLIP B/32, L/14 (fast exact causal OTI)",
        "  hf-siglip:DIR or a SiglipModel folder   SigLIP B/16 (OTI over the full padded text)",
        "  open_clip:ARCH/PRETRAINED               OpenAI CLIP, OpenCLIP, SigLIP (open_clip extra)",
        "  slip:CHECKPOINT.pt                      SLIP B/16, L/16 release files (BPE file beside)",
        "datasets (--datasets):",
        *textwrap.wrap(" ".join(images), 98, initial_indent="  image->image, OTI queries:  ",
                       subsequent_indent=" " * 30),
        *textwrap.wrap(" ".join(texts), 98, initial_indent="  text->text, OVI queries:    ",
                       subsequent_indent=" " * 30),
    ]) + "\n"


def _common(p: argparse.ArgumentParser, datasets: tuple[str, ...] | None) -> None:
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                   help="a transformers CLIPModel/SiglipModel folder, a hub name already in the "
                        "hub cache (org/model), or an encoder spec (hf-clip:DIR, hf-siglip:DIR, "
                        "open_clip:ARCH/PRETRAINED, open_clip:local-dir:DIR, slip:FILE.pt)")
    p.add_argument("--data-root", required=True, type=Path, metavar="DIR",
                   help=f"folder holding the {_LAYOUT_HELP}")
    if datasets is not None:
        p.add_argument("--datasets", nargs="+", choices=datasets, default=None, metavar="NAME",
                       help="datasets to run (default: every one found under --data-root); "
                            "choices: " + ", ".join(datasets))
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/reproduce/SUITE/MODEL)")
    p.add_argument("--device", default="auto",
                   help="cuda, cuda:N, cpu, or auto (cuda when available; default auto)")
    p.add_argument("--batch-size", type=int, default=256, help="embedding batch size")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the inversion inits and of the separability split (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(p)


def _datasets(args: argparse.Namespace, candidates: tuple[str, ...]) -> tuple[str, ...]:
    if args.datasets:
        return tuple(args.datasets)
    found = available_benchmarks(args.data_root, candidates)
    if not found:
        expected = ", ".join(sorted({benchmark_folder(n) for n in candidates}))
        raise FileNotFoundError(f"--data-root {args.data_root}: none of the dataset folders "
                                f"found (expected some of: {expected})")
    return tuple(found)


def run(args: argparse.Namespace) -> int:
    """Run the chosen suite; prints the table and where the records are."""
    from modalign.reproduce import load_towers, resolve_model
    from modalign.reproduce.figures import CONTRASTIVE_GAP_SOURCE, paper_model_for
    from modalign.reproduce.records import RecordBook
    from modalign.reproduce.tables import cross_the_gap_tables, simple_table

    for name, low in (("batch_size", 1), ("inversion_batch_size", 1), ("oti_steps", 0),
                      ("ovi_steps", 0), ("oti_tokens", 1), ("ovi_tokens", 1), ("max_queries", 1),
                      ("max_pairs", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')}={value}: expected an integer >= {low}")
    if not args.data_root.is_dir():
        raise FileNotFoundError(f"--data-root {args.data_root}: no such folder")
    model = resolve_model(args.model)
    # rank 0 inverts and scores while the others wait at the next barrier: allow long waits
    ctx = setup(args.device, argument="--device", timeout=datetime.timedelta(hours=24))
    device = str(ctx.device)
    out = args.out or Path("runs") / "reproduce" / args.suite / model.label
    towers = load_towers(model)
    progress = not args.no_progress
    if args.suite == "cross-the-gap":
        from modalign.reproduce.cross_the_gap import DATASETS, CrossTheGapConfig, run_cross_the_gap
        from modalign.reproduce.figures import CROSS_THE_GAP_I2I
        from modalign.reproduce.inversion import InversionPlan

        if args.paper_model is not None and args.paper_model not in CROSS_THE_GAP_I2I:
            raise ValueError(f"--paper-model {args.paper_model!r}: expected one of "
                             + ", ".join(repr(k) for k in CROSS_THE_GAP_I2I))
        from modalign.reproduce.inversion import ovi_tokens_for

        paper = args.paper_model or paper_model_for(model.given)
        methods = tuple(args.methods)
        ovi_tokens = args.ovi_tokens or (ovi_tokens_for(model, towers)
                                         if "inversion" in methods else 1)
        common = {"template": args.template, "batch_size": args.inversion_batch_size,
                  "seed": args.seed, "precision": args.precision}
        config = CrossTheGapConfig(
            datasets=_datasets(args, DATASETS), methods=methods,
            zero_shot=not args.no_zero_shot,
            oti=InversionPlan("oti", args.oti_steps, args.oti_tokens, **common),
            ovi=InversionPlan("ovi", args.ovi_steps, ovi_tokens, **common),
            max_queries=args.max_queries, batch_size=args.batch_size, device=device,
            paper_model=paper)
        records = run_cross_the_gap(model, towers, args.data_root, out, config, progress)
        table = cross_the_gap_tables(records, model.label, paper)
    elif args.suite == "contrastive-gap":
        from modalign.reproduce.contrastive_gap import run_contrastive_gap

        records = run_contrastive_gap(model, towers, args.data_root, out, split=args.split,
                                      max_pairs=args.max_pairs, batch_size=args.batch_size,
                                      device=device, seed=args.seed, progress=progress)
        table = _gap_table(records, model.label, CONTRASTIVE_GAP_SOURCE)
    else:
        from modalign.reproduce.clip_benchmark import DATASETS, run_clip_benchmark

        records = run_clip_benchmark(model, towers, args.data_root, out,
                                     _datasets(args, DATASETS), batch_size=args.batch_size,
                                     device=device, progress=progress)
        table = "\n".join(
            simple_table(title, [r for r in records if r["task"] == task], keys)
            for task, title, keys in (
                ("zeroshot_classification", "Zero-shot classification",
                 ["acc1", "acc5", "mean_per_class_recall"]),
                ("zeroshot_retrieval", "Zero-shot retrieval",
                 [f"{d}_recall@{k}" for d in ("image_retrieval", "text_retrieval")
                  for k in (1, 5, 10)]))
            if any(r["task"] == task for r in records))
    if not ctx.is_main:
        return 0
    if args.suite != "cross-the-gap":
        book = RecordBook(out)
        book.write(records)
        book.finish(records)
    write_bytes_atomic(out / "table.md", (table + "\n").encode("utf-8"))
    print(table)
    print(f"records: {out / 'records.jsonl'}\ntable:   {out / 'table.md'}", file=sys.stderr)
    return 0


def _gap_table(records: list[dict[str, Any]], label: str, source: str) -> str:
    from modalign.reproduce.figures import CONTRASTIVE_GAP
    from modalign.reproduce.tables import markdown_table

    keys = ["mean_positive_cosine", "linear_separability", "centroid_distance",
            "image_to_text_r@1", "text_to_image_r@1"]
    rows = [[f"{label} (ours)", "–", *(f"{r['metrics'][k]:.3f}" for k in keys)] for r in records]
    rows += [[f"paper: {loss}", str(dim), *(f"{m[k]:.3f}" for k in keys)]
             for (dim, loss), m in CONTRASTIVE_GAP.items()]
    extra = ["uniformity", "alignment", "cross_uniformity", "centroid_cosine"]
    more = ", ".join(f"{k} {records[0]['metrics'][k]:.3f}" for k in extra) if records else ""
    return "\n".join([
        "### Contrastive-gap metrics on COCO", "",
        markdown_table(["Model", "dim", *keys], rows), "",
        f"Ours also: {more}." if more else "",
        f"Paper rows: {source}; those are CLIP models trained from scratch on COCO, shown for "
        "scale, not as the target for a pretrained model."])
