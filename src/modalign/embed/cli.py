"""``modalign embed``: encode a dataset with towers into an embedding store."""

from __future__ import annotations

import argparse
import json
import time

from modalign.cli_support import add_command, add_debug_flag
from modalign.embed.resolve import DEFAULT_TOWERS
from modalign.errors import ModalignError
from modalign.spec import split_key_value

DESCRIPTION = """\
Encode every item of a dataset with one tower per modality into a folder of memory-mappable arrays
(one per modality) with row metadata and a manifest. Resumable; a changed input or tower
re-encodes, an unchanged one is reused. Several runs may share a store: each array is written under
its own lock, and a second run waits for it and reuses it (on a network filesystem keep a single
writer).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "embed", run=run, description=DESCRIPTION,
                    help="encode a dataset into an embedding store")
    p.add_argument("--data", default="emoji",
                   help="emoji[:options], a .csv/.jsonl manifest or a dataset folder "
                        "(default emoji)")
    p.add_argument("--out", default=None,
                   help="store folder (default: under $MODALIGN_HOME/embeddings)")
    p.add_argument("--name", default=None,
                   help="a readable dataset name recorded in the store, shown by `modalign "
                        "stores` and in eval records (the store folder stays keyed by the data "
                        "and towers, so train/eval/search --data still find it)")
    p.add_argument("--modalities", default=None,
                   help="comma-separated modalities to encode (default: all the data has)")
    for mod, spec in DEFAULT_TOWERS.items():
        p.add_argument(f"--{mod}", default=spec, metavar="SPEC",
                       help=f"tower for {mod} (default {spec}; e.g. hf-clip:PATH)")
    p.add_argument("--tower", action="append", default=[], metavar="MODALITY=SPEC",
                   help="tower for another modality name, e.g. --tower sketch=effnet-lite0")
    p.add_argument("--batch-size", type=int, default=64, help="items per batch (default 64)")
    p.add_argument("--normalize", action="store_true",
                   help="L2-normalise stored vectors (for joint-space towers such as CLIP)")
    p.add_argument("--tokens", action="store_true",
                   help="also write token-level features (ragged arrays: MiniLM token states, "
                        "EfficientNet spatial positions, CLIP text and patch tokens, log-mel "
                        "time frames) for the towers that give them")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--verify", action="store_true",
                   help="after embedding, compare every array of the store with its recorded "
                        "checksum (reads every byte; exit 1 if one differs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(p)


def verify_store(path: str) -> int:
    """Print each array of the store at ``path`` with its checksum verdict; 1 if any is bad."""
    from modalign.embed.store import EmbeddingStore

    store = EmbeddingStore(path)
    bad = 0
    for name, problem in store.verify().items():
        if problem is None:
            print(f"  {name}: ok")
        elif problem == "no checksum recorded":
            print(f"  {name}: {problem} (written by an older version; size and shape checked)")
        else:
            bad += 1
            print(f"  {name}: DAMAGED: {problem}; rerun `modalign embed` to re-encode it")
    print(f"{store.path}: {bad} damaged arrays")
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    from modalign.data import load_dataset
    from modalign.distributed.runtime import resolve_device
    from modalign.embed.encode import embed_dataset
    from modalign.embed.paths import default_store_dir
    from modalign.embed.resolve import current_arrays, load_tower
    from modalign.embed.store import EmbeddingStore

    args.device = str(resolve_device(args.device, argument="--device"))
    if args.name is not None and not args.name.strip():
        raise ModalignError(f"--name {args.name!r}: expected a non-empty dataset name")
    progress = not args.no_progress
    ds = load_dataset(args.data, progress=progress)
    wanted = ([m.strip() for m in args.modalities.split(",") if m.strip()]
              if args.modalities else ds.modalities)
    specs = {m: getattr(args, m) for m in DEFAULT_TOWERS if m in wanted}
    example = "MODALITY=SPEC, e.g. --tower sketch=effnet-lite0:image_size=48"
    for t in args.tower:
        m, s = split_key_value(t, "--tower", example)
        if ":" in m:  # 'effnet-lite0:image_size=48': an option, no modality
            raise ModalignError(f"--tower {t!r}: expected {example}")
        specs[m] = s
    missing = [m for m in wanted if m not in specs]
    if missing:
        raise ModalignError(f"no tower for modalities {missing}: pass --tower MODALITY=SPEC")
    unknown = [m for m in specs if m not in ds.modalities]
    if args.modalities and unknown:
        raise ModalignError(f"--modalities {unknown} not in the data (it has {ds.modalities})")
    specs = {m: s for m, s in specs.items() if m in ds.modalities}
    out = args.out or default_store_dir(ds, specs)
    # towers are built only for arrays that are missing or stale (identities remembered by
    # load_tower); --tokens and --name need every tower's pass
    fresh = ([] if args.tokens or args.name is not None else
             current_arrays(ds, specs, EmbeddingStore(out), normalize=args.normalize))
    encoders = {m: load_tower(s, m) for m, s in specs.items() if m not in fresh}
    t = time.perf_counter()
    store = (embed_dataset(ds, encoders, out, batch_size=args.batch_size, progress=progress,
                           device=args.device, normalize=args.normalize, name=args.name)
             if encoders else EmbeddingStore(out))
    if args.tokens:
        _embed_tokens(ds, encoders, store.path, args)
    named = f" as {store.display_name!r}" if store.display_name else ""
    print(f"embedded {ds!r}{named} in {time.perf_counter() - t:.1f} s into {store.path}")
    for name in store.arrays:
        info = store.info(name)
        rate = f", {info['items_per_s']} items/s" if info.get("items_per_s") else ""
        print(f"  {name}: {info['count']} x {info['dim']} ({info.get('encoder', {}).get('name')}"
              f"{rate})")
    print(json.dumps({"store": str(store.path), "arrays": store.arrays}))
    return verify_store(str(store.path)) if args.verify else 0


def _embed_tokens(ds, encoders, path, args: argparse.Namespace) -> None:
    """``--tokens``: the ragged token arrays of every tower that gives tokens."""
    from modalign.embed.tokens import embed_tokens, load_tokens, supports_tokens

    able = {m: e for m, e in encoders.items() if supports_tokens(e)}
    if not able:
        raise ModalignError(f"--tokens: none of the towers {sorted(encoders)} gives token "
                            "features (built-in: minilm, effnet-lite0, logmel, hf-clip)")
    for m in sorted(set(encoders) - set(able)):
        print(f"--tokens: the {m} tower gives no token features; its pooled array only")
    embed_tokens(ds, able, path, batch_size=args.batch_size, progress=not args.no_progress,
                 device=args.device, normalize=args.normalize)
    for m in able:
        tf = load_tokens(path, m)
        print(f"  {m}.tokens: {len(tf)} rows, {len(tf.values)} tokens x {tf.dim}")
