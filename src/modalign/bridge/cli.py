"""``modalign invert``: modality inversion (OTI / OVI) of a split into the embedding store."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from modalign.cli_support import add_command, add_debug_flag

DIRECTIONS = ("image-to-text", "text-to-image")

EPILOG = """\
examples:
  # OTI: every test image of the emoji data becomes a text-side feature (150 steps)
  modalign invert --model runs/clip/model --data emoji --direction image-to-text
  # OVI of the concept names only, fewer steps, on a GPU
  modalign invert --model runs/clip/model --data emoji --direction text-to-image \\
      --view name --steps 300 --device cuda

The inverted features land in the embedding store of the model's towers for that data (or in
--embeddings DIR) as the array <tower modality>.<oti|ovi>.<hash>, rows in the same order as the
source items, in the model's joint space; the hash covers the settings, model, inputs and
targets, so a rerun with the same settings reuses (or resumes) the array and changed settings
make a new one. The last line printed is a JSON summary with the array name.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "invert", run=run,
        help="modality inversion (OTI image->text, OVI text->image) into the store",
        description=(
            "Modality inversion after 'Cross the Gap' (ICLR 2025): for every source item, "
            "optimise pseudo-tokens at the token layer of the OTHER modality's tower so that "
            "tower + the model's head reproduce the item's joint embedding (cosine loss, AdamW, "
            "last iterate). image-to-text (OTI) puts R pseudo-words in a text template; "
            "text-to-image (OVI) puts P pseudo-patches in the image tower. Items are optimised in "
            "independent batches; results do not depend on the batch size."),
        epilog=EPILOG)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="trained model folder (from 'modalign train')")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DATA",
                     help="emoji[:options], a .csv/.jsonl manifest or a dataset folder")
    src.add_argument("--embeddings", metavar="DIR",
                     help="an embedding store of the model's tower features (written there)")
    p.add_argument("--direction", required=True, metavar="SRC-to-DST",
                   help=f"{' or '.join(DIRECTIONS)} (any SRC-to-DST of the model's modalities "
                        "whose DST tower has an inversion hook)")
    p.add_argument("--split", default="test",
                   help="split of the source items: train, val, test or all (default test)")
    p.add_argument("--view", default=None,
                   help="comma-separated views of the source items to invert (default all), "
                        "e.g. 'name' for the concept names")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="invert only the first N source items (quick looks)")
    opt = p.add_argument_group("optimisation (defaults: the official code)")
    opt.add_argument("--steps", type=int, default=None,
                     help="AdamW steps; last iterate kept (default 150 into text, 1000 into image)")
    opt.add_argument("--lr", type=float, default=2e-2, help="learning rate (default 2e-2)")
    opt.add_argument("--weight-decay", type=float, default=0.01,
                     help="AdamW weight decay (default 0.01)")
    opt.add_argument("--init-std", type=float, default=0.02,
                     help="pseudo-tokens start from normal(0, STD) (default 0.02)")
    opt.add_argument("--seed", type=int, default=0,
                     help="base seed; each item's start is seeded by (seed, item id) (default 0)")
    opt.add_argument("--batch-size", type=int, default=64,
                     help="items optimised together (default 64)")
    hook = p.add_argument_group("where the pseudo-tokens go")
    hook.add_argument("--num-tokens", type=int, default=None,
                      help="R pseudo-words (text, default 1) or P pseudo-patches (ViT default 1, "
                           "CNN default 16, a square: a sqrt(P) x sqrt(P) grid)")
    hook.add_argument("--template", default="a photo of {}",
                      help="text template with one {} (default 'a photo of {}')")
    hook.add_argument("--placeholder", default="£",
                      help="a one-token string marking the slot while tokenizing (default £)")
    hook.add_argument("--stage", type=int, default=0,
                      help="CNN image tower: index of the block whose input is optimised "
                           "(default 0, the stem's output)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(p)


def parse_direction(direction: str, modalities: list[str]) -> tuple[str, str]:
    """``"image-to-text"`` -> ``("image", "text")``, both checked against the model's modalities.

    Examples:
        >>> parse_direction("image-to-text", ["image", "text"])
        ('image', 'text')
    """
    src, sep, dst = direction.partition("-to-")
    if not sep or not src or not dst or src == dst:
        raise ValueError(f"--direction {direction!r}: expected SRC-to-DST, e.g. "
                         f"{' or '.join(DIRECTIONS)}")
    missing = [m for m in (src, dst) if m not in modalities]
    if missing:
        raise ValueError(f"--direction {direction!r}: the model has no {missing} tower "
                         f"(it has {modalities})")
    return src, dst


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from modalign.bridge.inversion import (
        InversionSettings,
        ProjectedForward,
        encoder_inversion,
    )
    from modalign.bridge.inversion.store import invert_into_store
    from modalign.distributed.runtime import resolve_device
    from modalign.embed.joint import load_joint
    from modalign.io import file_hash
    from modalign.model import MultiTowerModel

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    model = MultiTowerModel.from_pretrained(args.model).eval()
    src, dst = parse_direction(args.direction, model.modalities)
    split = None if args.split == "all" else args.split
    joint = load_joint(model_dir=args.model, embeddings_dir=args.embeddings, data=args.data,
                       split=split, modalities=[src], progress=not args.no_progress)
    if src not in joint:
        raise ValueError(f"no {src!r} features for this data and model")
    source = joint[src]
    if args.view:
        views = [v.strip() for v in args.view.split(",") if v.strip()]
        source = source.filter(view=views)
    if args.limit is not None:
        source = source.subset(list(range(min(args.limit, len(source)))))
    if len(source) == 0:
        raise ValueError(f"no {src} items in split {args.split!r}"
                         + (f" with views {args.view!r}" if args.view else ""))
    store = joint.store  # the store load_joint read: the inverted array goes beside it

    device = resolve_device(args.device, argument="--device")
    model.to(device)
    tower = model.tower(dst)
    if isinstance(tower, torch.nn.Module):
        tower.to(device)
    base = encoder_inversion(tower, template=args.template, num_tokens=args.num_tokens,
                             placeholder=args.placeholder, stage=args.stage)

    def head(features: torch.Tensor) -> torch.Tensor:
        return model.project(dst, features)

    forward = ProjectedForward(base, head, head_name=f"model head {dst}")
    steps = args.steps if args.steps is not None else (150 if dst == "text" else 1000)
    settings = InversionSettings(steps=steps, lr=args.lr, weight_decay=args.weight_decay,
                                 init_std=args.init_std, seed=args.seed,
                                 batch_size=args.batch_size)
    method = {"text": "oti", "image": "ovi"}.get(dst, f"inv{dst}")
    context: dict[str, Any] = {
        "direction": f"{src}-to-{dst}", "split": args.split, "views": args.view,
        "model_weights": file_hash(Path(args.model) / "model.safetensors"),
        "tower": tower.identity() if hasattr(tower, "identity") else str(type(tower)),
    }
    targets = source.torch().to(device)
    bar = tqdm(total=len(source), unit="item", desc=f"{method} {src}->{dst}",
               disable=args.no_progress or None)
    n_done, cos_total, estimated = 0, 0.0, False

    def on_chunk(done: int, cosine_sum: float) -> None:
        nonlocal n_done, cos_total, estimated
        elapsed = time.perf_counter() - t0
        if not estimated and elapsed > 0.05:  # the first batch computed (not resumed)
            estimated = True
            _print_estimate(done, len(source) - n_done - done, steps, elapsed)
        n_done += done
        cos_total += cosine_sum
        bar.update(done)
        bar.set_postfix(mean_cos=f"{cos_total / n_done:.4f}")

    t0 = time.perf_counter()
    try:
        name = invert_into_store(store, targets, source.items, forward, settings, method=method,
                                 context=context, on_chunk=on_chunk)
    finally:
        bar.close()
    info = store.info(name)["inversion"]
    summary = {"store": str(store.path), "array": name, "count": len(source),
               "direction": f"{src}-to-{dst}", "split": args.split, "steps": steps,
               "mean_final_cosine": round(info["mean_final_cosine"], 6),
               "seconds": round(time.perf_counter() - t0, 2)}
    print(f"inverted {len(source)} {src} items into {dst} features: mean final cosine "
          f"{summary['mean_final_cosine']:.4f}; array {name} in {store.path}")
    print(json.dumps(summary))
    return 0


def _print_estimate(done: int, remaining: int, steps: int, seconds: float,
                    long_s: float = 180.0) -> None:
    """After the first batch: the time the rest will take at the speed measured on it."""
    if remaining <= 0 or done <= 0:
        return
    rest = seconds / done * remaining
    line = (f"first {done} items x {steps} steps took {seconds:.1f} s: about {rest / 60:.1f} "
            f"min more for the other {remaining}")
    if rest > long_s:
        line += ("; for a quicker look pass --limit N, fewer --steps, or (CNN image tower) a "
                 "later --stage")
    print(line, file=sys.stderr, flush=True)
