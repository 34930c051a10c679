from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modalign.cli import main
from modalign.data import Item, PairedDataset
from modalign.embed.tokens import embed_tokens
from modalign.errors import ModalignError
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
    assert abs(sum(out["wins"].values()) - 1) < 1e-6

    # the reported recall@1 is the share of queries whose own document scores highest (naive)
    model = LateInteractionModel.from_pretrained(tmp_path / "run" / "model")
    corpus = TokenCorpus(store, "text:alias", ["image", "text:name"], "test")
    scores = maxsim_scores(corpus.project_queries(model), corpus.project_documents(model))
    hits = [int((scores[i] >= scores[i, g]).sum()) == 1 for i, g in
            enumerate(corpus.query_group.tolist())]
    assert out["metrics"]["maxsim/recall@1"] == round(float(np.mean(hits)), 4)
    # the prefilter keeps the 5 documents of highest centroid cosine (here all it re-ranks):
    # its recall@5 is their overlap with the exact MaxSim top 5
    q_tok, d_tok = corpus.project_queries(model), corpus.project_documents(model)
    near = (q_tok.centroids() @ d_tok.centroids().T).topk(5, dim=1).indices.tolist()
    top = scores.topk(5, dim=1).indices.tolist()
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(near, top, strict=True)]
    assert out["prefilter5_recall@5"] == round(float(np.mean(overlap)), 4)

    assert main(["train", "--set", "late.enabled=true", "--set", f"data.embeddings='{store}'",
                 "--set", "late.dim=8", "--set", "train.epochs=1", "--set", "train.batch_size=11",
                 "--set", f"run.dir='{tmp_path / 'cli'}'"]) == 0
    assert main(["eval", "--task", "retrieval", "--scoring", "maxsim", "--model",
                 str(tmp_path / "cli" / "model"), "--embeddings", str(store), "--out",
                 str(tmp_path / "rec.json")]) == 0
    record = json.loads((tmp_path / "rec.json").read_text())
    assert record["task"] == "retrieval:maxsim" and "maxsim/recall@1" in record["metrics"]
    assert main(["eval", "--scoring", "maxsim", "--embeddings", str(store)]) == 2


class CrashError(Exception):
    pass


@pytest.mark.parametrize("crash_at", [7, 9])  # mid-epoch, and the first step of epoch 3
def test_late_run_killed_mid_step_resumes_bitwise(tmp_path, monkeypatch, crash_at):
    import modalign.late.model as late_model
    from modalign.train.checkpoint import load_checkpoint

    store = token_store(tmp_path / "store")
    settings = dict(store=str(store), dim=8, epochs=3, batch_size=11, lr=3e-2,
                    checkpoint_every=3)  # 4 steps an epoch, 12 in all
    full = train_late(LateSettings(run_dir=str(tmp_path / "full"), **settings), progress=False)

    calls = [0]
    real = late_model.maxsim_scores

    def crashing(q, d):
        calls[0] += 1
        if calls[0] == crash_at:  # dies inside step crash_at, after its last checkpoint
            raise CrashError
        return real(q, d)

    monkeypatch.setattr(late_model, "maxsim_scores", crashing)
    with pytest.raises(CrashError):
        train_late(LateSettings(run_dir=str(tmp_path / "killed"), **settings), progress=False)
    monkeypatch.setattr(late_model, "maxsim_scores", real)
    stopped = load_checkpoint(tmp_path / "killed" / "checkpoints").step
    assert stopped == {7: 6, 9: 8}[crash_at]  # every 3 steps and at each epoch end (4, 8)
    with pytest.raises(ModalignError, match="--resume"):
        train_late(LateSettings(run_dir=str(tmp_path / "killed"), **settings), progress=False)
    with pytest.raises(ModalignError, match="lr"):
        train_late(LateSettings(run_dir=str(tmp_path / "killed"), **{**settings, "lr": 1e-3}),
                   progress=False, resume=True)
    resumed = train_late(LateSettings(run_dir=str(tmp_path / "killed"), **settings),
                         progress=False, resume=True)

    assert resumed["steps"] == full["steps"] == 12 and resumed["resumed_at_step"] == stopped
    assert resumed["final_train_loss"] == full["final_train_loss"]
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    ca, cb = (load_checkpoint(tmp_path / r / "checkpoints") for r in ("full", "killed"))
    assert ca.step == cb.step == 12
    sa, sb = ca.trainer["optimizer"]["state"], cb.trainer["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_cli_resume_of_a_late_run_continues_to_more_epochs(tmp_path):
    store = token_store(tmp_path / "store")
    base = ["train", "--set", "late.enabled=true", "--set", f"data.embeddings='{store}'",
            "--set", "late.dim=8", "--set", "train.batch_size=11",
            "--set", f"run.dir='{tmp_path / 'run'}'"]
    assert main([*base, "--set", "train.epochs=1"]) == 0
    assert main([*base, "--set", "train.epochs=1"]) == 2  # checkpoints there: needs --resume
    assert main([*base, "--set", "train.epochs=2", "--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_at_step"] == 4


class FileTokens(GroupTokens):
    """GroupTokens reading a dataset's rows: image paths become ``img/<file name>``."""

    def preprocess(self, inputs):
        return [f"img/{s.rsplit('/', 1)[-1]}" if "/img/" in str(s) else str(s) for s in inputs]

    def token_counts(self, inputs):
        return super().token_counts(self.preprocess(inputs))


def test_search_with_a_late_model_ranks_documents_by_maxsim_like_a_naive_loop(
        tmp_path, monkeypatch, capsys):
    import csv

    from PIL import Image

    import modalign.encoders as encoders
    from modalign.data import load_dataset
    from modalign.embed.encode import raw_input
    from modalign.late.search import LateSpace, late_search

    towers = {"image": FileTokens("image", 10, 1), "text": FileTokens("text", 7, 2)}
    store = tmp_path / "store"
    (tmp_path / "data" / "img").mkdir(parents=True)
    rows = []
    for g in range(0, 60, 3):
        Image.new("RGB", (4, 4)).save(tmp_path / "data" / "img" / f"g{g}.png")
        rows.append({"image": f"img/g{g}.png", "text:name": f"name g{g}",
                     "text:alias": f"alias g{g}", "group": f"g{g:02d}",
                     "split": "train" if g < 44 else "test"})
    manifest = tmp_path / "data" / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ds = load_dataset(manifest)
    embed_tokens(ds, towers, store, progress=False)
    train_late(LateSettings(store=str(store), run_dir=str(tmp_path / "run"), dim=8, epochs=5,
                            batch_size=7, lr=3e-2), progress=False)
    model_dir = tmp_path / "run" / "model"
    model = LateInteractionModel.from_pretrained(model_dir)

    # naive: every group's tokens (image + name rows) projected, sum over query tokens of the max
    def tokens(item):
        tower = towers[item.modality]
        states, mask = tower.encode_tokens(tower.preprocess([raw_input(ds, item)]))
        return model.project(item.modality, states[0][mask[0]])

    with torch.no_grad():
        q = model.project("text", towers["text"].encode_tokens(["alias g33"])[0][0, :2 + 33 % 3])
        naive = {}
        for g in sorted({it.group for it in ds.items}):
            d = torch.cat([tokens(it) for it in ds.items if it.group == g and (
                it.modality == "image" or it.view == "name")])
            naive[g] = float((q @ d.T).max(1).values.sum())
    best = sorted(naive, key=lambda g: -naive[g])[:4]

    hits = late_search(LateSpace(model_dir, towers=towers).encode("text", ["alias g33"]),
                       LateSpace(model_dir, towers=towers).gallery(manifest), k=4)[0]
    assert [h.id for h in hits] == best and [h.rank for h in hits] == [1, 2, 3, 4]
    assert np.allclose([h.score for h in hits], [naive[g] for g in best], atol=1e-5)
    n = int(best[0][1:])
    assert hits[0].value.endswith(f"img/g{n}.png | name g{n}") and hits[0].group == best[0]

    # the CLI finds the towers through the model's store, and prints as single-vector search
    monkeypatch.setattr(encoders, "load_encoder", lambda name, modality=None: towers[modality])
    capsys.readouterr()
    assert main(["search", "--model", str(model_dir), "--data", str(manifest), "--text",
                 "alias g33", "--k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [h["id"] for h in out["hits"]] == best and out["query"] == {"text": "alias g33"}
    assert np.allclose([h["score"] for h in out["hits"]], [naive[g] for g in best], atol=1e-5)
    assert main(["search", "--model", str(model_dir), "--data", str(manifest), "--text",
                 "alias g33", "--k", "2", "--split", "test"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("text query 'alias g33' -> 5 documents (image + text:name tokens")
    assert len(lines) == 3 and lines[1].split()[:1] == ["1"]
    assert main(["search", "--model", str(model_dir), "--data", str(manifest), "--text", "a",
                 "--modality", "audio"]) == 2
