from __future__ import annotations

import json
import re
import zlib

import numpy as np
import torch

from modalign.cli import main
from modalign.data import Item, PairedDataset
from modalign.embed.tokens import embed_tokens
from modalign.late.maxsim import maxsim_scores
from modalign.late.model import (
    LateInteractionModel,
    LateSettings,
    TokenCorpus,
    evaluate_late,
    train_late,
)

LATENT = np.random.default_rng(0).normal(size=(60, 5))


class GroupTokens:
    """Toy token tower: tokens are noisy linear maps of the group latent named in the input,
    a different map per kind of input (image, name, alias): the heads must learn to align them."""

    def __init__(self, modality: str, dim: int, seed: int) -> None:
        self.name, self.modality, self.dim = f"toy-{modality}", modality, dim
        rng = np.random.default_rng(seed)
        self.proj = {kind: rng.normal(size=(5, dim)) for kind in ("img/", "name", "alias")}

    def preprocess(self, inputs):
        return list(inputs)

    def token_counts(self, inputs):
        return [2 + int(re.search(r"g(\d+)", str(s)).group(1)) % 3 for s in inputs]

    def encode_tokens(self, batch):
        counts = self.token_counts(batch)
        out = torch.zeros(len(batch), max(counts), self.dim)
        mask = torch.zeros(len(batch), max(counts), dtype=torch.bool)
        for i, s in enumerate(batch):
            g = int(re.search(r"g(\d+)", str(s)).group(1))
            rng = np.random.default_rng(zlib.crc32(str(s).encode()))
            proj = self.proj[str(s)[:4] if str(s).startswith("img/") else str(s).split()[0]]
            for j in range(counts[i]):
                out[i, j] = torch.from_numpy(LATENT[g] @ proj
                                             + 1.0 * rng.normal(size=self.dim)).float()
                mask[i, j] = True
        return out, mask

    def identity(self):
        return {"name": self.name}


def token_store(path):
    items = []
    for g in range(60):
        split = "train" if g < 44 else "test"
        items.append(Item(f"i{g}", "image", "flat", f"img/g{g}.png", f"g{g:02d}", split))
        items.append(Item(f"n{g}", "text", "name", f"name g{g}", f"g{g:02d}", split))
        items.append(Item(f"a{g}", "text", "alias", f"alias g{g}", f"g{g:02d}", split))
    ds = PairedDataset("toy", items)
    embed_tokens(ds, {"image": GroupTokens("image", 10, 1), "text": GroupTokens("text", 7, 2)},
                 path, progress=False)
    return path


def test_training_on_maxsim_beats_untrained_heads_and_cli_writes_a_record(tmp_path):
    store = token_store(tmp_path / "store")
    untrained = evaluate_late(LateInteractionModel({"image": 10, "text": 7}, dim=8), store,
                              query="text:alias", documents=["image", "text:name"])
    settings = LateSettings(store=str(store), run_dir=str(tmp_path / "run"), dim=8, epochs=30,
                            batch_size=11, lr=3e-2)
    summary = train_late(settings, progress=False)
    assert summary["steps"] == 30 * 4
    out = evaluate_late(tmp_path / "run" / "model", store, k_values=(1, 5), prefilter=5)
    assert out["queries"] == out["gallery"] == 16
    assert out["metrics"]["maxsim/recall@1"] >= untrained["metrics"]["maxsim/recall@1"] + 0.25
    assert set(out["ablations"]) == {"without image", "without text:name"}
    assert abs(sum(out["wins"].values()) - 1) < 1e-6 and 0 <= out["prefilter5_recall@5"] <= 1

    # the reported recall@1 is the share of queries whose own document scores highest (naive)
    model = LateInteractionModel.from_pretrained(tmp_path / "run" / "model")
    corpus = TokenCorpus(store, "text:alias", ["image", "text:name"], "test")
    scores = maxsim_scores(corpus.project_queries(model), corpus.project_documents(model))
    hits = [int((scores[i] >= scores[i, g]).sum()) == 1 for i, g in
            enumerate(corpus.query_group.tolist())]
    assert out["metrics"]["maxsim/recall@1"] == round(float(np.mean(hits)), 4)

    assert main(["train", "--set", "late.enabled=true", "--set", f"data.embeddings='{store}'",
                 "--set", "late.dim=8", "--set", "train.epochs=1", "--set", "train.batch_size=11",
                 "--set", f"run.dir='{tmp_path / 'cli'}'"]) == 0
    assert main(["eval", "--task", "retrieval", "--scoring", "maxsim", "--model",
                 str(tmp_path / "cli" / "model"), "--embeddings", str(store), "--out",
                 str(tmp_path / "rec.json")]) == 0
    record = json.loads((tmp_path / "rec.json").read_text())
    assert record["task"] == "retrieval:maxsim" and "maxsim/recall@1" in record["metrics"]
    assert main(["eval", "--scoring", "maxsim", "--embeddings", str(store)]) == 2
