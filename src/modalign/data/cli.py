"""``modalign data``: build the built-in emoji set, inspect any dataset, check a manifest."""

from __future__ import annotations

import argparse
import json
import time

from modalign.cli_support import add_command, add_command_group
from modalign.data import EmojiOptions, build_emoji, load_dataset, load_manifest


def register(sub: argparse._SubParsersAction) -> None:
    dsub = add_command_group(
        sub, "data", help="build, inspect and check paired datasets", dest="data_command",
        metavar="ACTION", exit_code=0,
        description="Build the built-in emoji dataset, inspect a dataset, or check a user "
                    "manifest (CSV/JSONL with image/text/audio columns).")

    b = add_command(dsub, "build", run=_build, help="build a built-in dataset (emoji)",
                    description="Render every emoji concept in the Noto and OpenMoji styles, "
                                "with names, aliases, optional other languages and speech, "
                                "into a cache folder. Reuses or completes an earlier build.")
    b.add_argument("name", choices=["emoji"], help="the built-in dataset to build")
    b.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    b.add_argument("--limit", type=int, default=None, help="keep only the first N concepts")
    b.add_argument("--styles", default="noto,openmoji",
                   help="comma-separated image styles (default noto,openmoji)")
    b.add_argument("--languages", default="",
                   help="extra name languages from the emoji package, e.g. fr,de,es")
    b.add_argument("--speech", action="store_true", help="speak each name with espeak-ng")
    b.add_argument("--voices", default="en-us,en-gb", help="espeak-ng voices (default en-us,en-gb)")
    b.add_argument("--skin-tones", action="store_true", help="keep skin-tone variants")
    b.add_argument("--root", default=None, help="output folder (default: under $MODALIGN_HOME)")

    i = add_command(dsub, "info", run=_info, help="print the counts of a dataset",
                    description="Print modalities, views and split counts of a dataset spec "
                                "(emoji[:options], a manifest file, or a built folder).")
    i.add_argument("data", help="emoji, emoji:limit=200, pairs.csv, pairs.jsonl or a folder")

    c = add_command(dsub, "check", run=_check,
                    help="validate a user manifest (or an embedding store)",
                    description="Read a CSV/JSONL manifest, decode every image, and report "
                                "what would be skipped and why. Given an embedding store "
                                "folder instead, compare every array with its recorded "
                                "checksum (exit 1 if one differs).")
    c.add_argument("manifest", help="a .csv or .jsonl file, or an embedding store folder")


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _build(args: argparse.Namespace) -> int:
    opts = EmojiOptions(size=args.size, limit=args.limit, styles=_split(args.styles),
                        languages=_split(args.languages), speech=args.speech,
                        voices=_split(args.voices), skin_tones=args.skin_tones)
    t = time.perf_counter()
    ds = build_emoji(opts, root=args.root, progress=True)
    print(f"built {ds!r} in {time.perf_counter() - t:.1f} s at {ds.root}")
    print(json.dumps(ds.counts(), indent=2))
    if ds.info.get("skipped"):
        print(f"skipped {len(ds.info['skipped'])} concepts (reasons in {ds.root}/dataset.json)")
    return 0


def _info(args: argparse.Namespace) -> int:
    ds = load_dataset(args.data)
    print(repr(ds))
    print(json.dumps(ds.counts(), indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    from pathlib import Path

    if (Path(args.manifest) / "manifest.json").is_file():
        from modalign.embed.cli import verify_store

        return verify_store(args.manifest)
    ds, report = load_manifest(args.manifest)
    print(repr(ds))
    print(report.summary())
    for s in report.skipped[:20]:
        where = f"line {s['line']}" if "line" in s else f"row {s.get('row')}"
        col = f", column {s['column']}" if "column" in s else ""
        print(f"  {where}{col}: {s['reason']}")
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more")
    from modalign.data.caveats import split_warnings

    for line in split_warnings(ds):
        print(f"warning: {line}")
    return 0
