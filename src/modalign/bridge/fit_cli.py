"""``modalign fit-bridge``: fit a learned gap bridge on paired training embeddings and save it."""

from __future__ import annotations

import argparse
import json

from modalign.cli_support import add_command, add_debug_flag

EPILOG = """\
examples:
  modalign fit-bridge --model runs/clip/model --data emoji --kind procrustes \\
      --source text --target image --out runs/bridges
  modalign fit-bridge --embeddings STORE --kind mlp --source image --target text --out bridges
  # then, alone or chained with the post-hoc bridges:
  modalign eval --model runs/clip/model --data emoji --task retrieval \\
      --bridge learned:path=runs/bridges/procrustes-0123456789ab

The bridge maps every --source embedding toward the --target distribution. It is fitted on the
--split rows, each source row paired with the mean of its group's target rows. The printed JSON
(also stored in the bridge's .json) gives the gap, cross-modal retrieval and intra-modal
retrieval before and after on --eval-split, and seconds per 1,000 mapped queries.
"""


DESCRIPTION = """\
Fit a map from one modality's joint embeddings toward another's on paired training rows: orthogonal
Procrustes, (ridge) least squares, a small residual MLP or Diffusion-Link (a denoising diffusion
model over the target embeddings). Saved as ID.safetensors + ID.json; use it with 'modalign eval
--bridge learned:path=DIR/ID'.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "fit-bridge", run=run, description=DESCRIPTION, epilog=EPILOG,
                    help="fit a learned gap bridge (Procrustes, least squares, MLP, "
                         "Diffusion-Link) and save it")
    src = p.add_argument_group("embeddings")
    src.add_argument("--model", default=None, metavar="DIR", help="a trained model folder")
    src.add_argument("--data", default=None, metavar="DATA", help="data (with --model)")
    src.add_argument("--embeddings", default=None, metavar="DIR",
                     help="an embedding store (joint vectors, or tower features with --model)")
    p.add_argument("--kind", choices=("procrustes", "lstsq", "mlp", "diffusion-link"),
                   default="procrustes", help="the bridge fitted (default procrustes)")
    p.add_argument("--source", default="text", help="modality mapped (default text)")
    p.add_argument("--target", default="image", help="modality aimed at (default image)")
    p.add_argument("--split", default="train", help="split fitted on (default train)")
    p.add_argument("--eval-split", default="test", help="split measured (default test)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder of saved bridges")
    p.add_argument("--no-center", action="store_true",
                   help="fit on uncentred embeddings (uncentred Procrustes keeps the source "
                        "rows' inner products)")
    p.add_argument("--rotation", action="store_true", help="procrustes: det W = +1")
    p.add_argument("--ridge", type=float, default=1e-3, help="lstsq: ridge (default 1e-3)")
    p.add_argument("--hidden", type=int, default=None,
                   help="mlp / diffusion-link: hidden width (default 512 / 1024)")
    p.add_argument("--steps", type=int, default=None,
                   help="mlp / diffusion-link: training steps (default 500 / 2000)")
    p.add_argument("--lr", type=float, default=1e-3, help="mlp / diffusion-link: AdamW lr")
    dl = p.add_argument_group("diffusion-link")
    dl.add_argument("--batch-size", type=int, default=256, help="training batch (default 256)")
    dl.add_argument("--t-start", type=int, default=600,
                    help="step the sources are noised to (default 600 of 1000)")
    dl.add_argument("--ddim-steps", type=int, default=5, help="DDIM steps (default 5)")
    dl.add_argument("--lambda-topo", type=float, default=1.0,
                    help="weight of the topology loss (default 1)")
    dl.add_argument("--no-noise-source", action="store_true",
                    help="start DDIM from the clean source (Diffusion Bridge's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trained bridges (default 0)")
    add_debug_flag(p)


def run(args: argparse.Namespace) -> int:
    from modalign.bridge.learned import fit_bridge
    from modalign.embed.joint import load_joint
    from modalign.errors import ModalignError

    if args.model is None and args.embeddings is None:
        raise ModalignError("pass --model DIR (with --data DATA) or --embeddings DIR")
    joint = load_joint(model_dir=args.model, embeddings_dir=args.embeddings,
                       data=args.data if args.model else None,
                       modalities=[args.source, args.target])
    bridge, report = fit_bridge(
        joint, args.source, args.target, split=args.split, eval_split=args.eval_split,
        kind=args.kind, center=not args.no_center, rotation=args.rotation, ridge=args.ridge,
        hidden=args.hidden, steps=args.steps, lr=args.lr, seed=args.seed,
        batch_size=args.batch_size, t_start=args.t_start, ddim_steps=args.ddim_steps,
        lambda_topo=args.lambda_topo, noise_source=not args.no_noise_source)
    report.update({"model": args.model, "data": args.data, "embeddings": args.embeddings})
    path = bridge.save(args.out, extra=report)
    print(json.dumps({**report, "path": str(path.with_suffix(""))}))
    return 0
