"""Late interaction on the emoji data: alias query -> concept document (both image styles' spatial
tokens + the name's MiniLM tokens), MaxSim against single-vector scoring.

Trains the same heads twice on the training split (``scoring = maxsim`` and ``single``: cosine of
the mean tokens, same loss and steps) and evaluates both on the test split: recall@K and MRR,
per-modality ablations of the MaxSim model, which modality wins the max, index size, latency
per 1,000 queries and the recall of a centroid prefilter against exact MaxSim. One JSON line per
model.

    python benchmarks/late_interaction.py --store runs/emb --epochs 10
    python benchmarks/late_interaction.py --store runs/emb-speech --documents image,text:name,audio
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from modalign.late.model import LateSettings, evaluate_late, train_late

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="a store with image and text token arrays")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--prefilter", type=int, default=10)
    p.add_argument("--documents", default="image,text:name",
                   help="comma-separated document keys (e.g. image,text:name,audio with speech)")
    args = p.parse_args()
    documents = [k.strip() for k in args.documents.split(",") if k.strip()]
    for scoring in ("maxsim", "single"):
        run = tempfile.mkdtemp(prefix=f"late-{scoring}-")
        c0 = time.process_time()
        summary = train_late(LateSettings(store=args.store, run_dir=run, dim=args.dim,
                                          epochs=args.epochs, batch_size=args.batch,
                                          scoring=scoring, documents=documents),
                           progress=False)
        out = evaluate_late(os.path.join(run, "model"), args.store, split="test",
                            prefilter=args.prefilter)
        print(json.dumps({"trained_with": scoring, "train": summary,
                          "train_cpu_s": round(time.process_time() - c0, 1), **out}), flush=True)


if __name__ == "__main__":
    main()
