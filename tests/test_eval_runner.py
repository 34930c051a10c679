"""``modalign.evaluate.run``: the Python twin of ``modalign eval``, and its checks before any
tower loads."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import modalign.evaluate as ev
from modalign.cli import main
from modalign.embed.joint import JointEmbeddings, load_joint
from modalign.errors import ModalignError
from modalign.evaluate.inverted import align_inverted
from modalign.evaluate.records import read_record
from modalign.evaluate.runner import OOD_SCORES, run
from test_eval_cli import make_store


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path / "store")


@pytest.mark.parametrize("argv", [
    ["--task", "retrieval", "--bridge", "centering", "--bootstrap", "50"],
    ["--task", "intra", "--modality", "image", "--query-view", "noto", "--gallery-view",
     "openmoji", "--bootstrap", "0"],
])
def test_run_returns_the_record_and_the_table_the_command_prints(store, tmp_path, capsys, argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "--embeddings", str(store.path), *argv,
                     "--out", str(tmp_path / "cli.json")]) == 0
    printed = capsys.readouterr().out.splitlines()
    kwargs = {"task": argv[1], "bootstrap": int(argv[-1])}
    if argv[1] == "retrieval":
        kwargs["bridges"] = ["centering"]
    else:
        kwargs.update(modality="image", query_view="noto", gallery_view="openmoji")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = ev.run(embeddings=store.path, out=tmp_path / "py.json", **kwargs)
    assert printed[:-1] == outcome.table().splitlines() and len(printed) > 2
    assert printed[-1] == f"record: {tmp_path / 'cli.json'}"
    cli, py = read_record(tmp_path / "cli.json"), read_record(tmp_path / "py.json")
    assert cli["metrics"] == py["metrics"] == outcome.record["metrics"]
    assert cli["intervals"] == py["intervals"] and cli["bridges"] == py["bridges"]
    assert outcome.path == tmp_path / "py.json" and outcome.result.metrics == py["metrics"]


def test_run_without_out_writes_nothing_and_names_the_store(store, tmp_path):
    from modalign.io import write_json_atomic

    write_json_atomic(store.path / "dataset.json", {"name": "toy", "display_name": "Toy set"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = run(embeddings=store.path, modalities="image,text", bootstrap=0)
    assert outcome.path is None and outcome.record["dataset"] == "Toy set"
    joint = load_joint(embeddings_dir=store.path)
    assert isinstance(joint, JointEmbeddings) and joint.store.path == store.path
    assert joint.display_name == "Toy set" and sorted(joint) == ["image", "text"]


def test_the_ood_scores_are_the_ones_ood_detection_knows():
    from modalign.evaluate.ood import SCORES

    assert OOD_SCORES == SCORES


def _model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": "modalign.MultiTowerModel"}))
    return folder


BAD = [
    (["--split", "validation"], "--split 'validation': expected one of train, val, test, all"),
    (["--bank-split", "dev", "--bridge", "centering"], "--bank-split 'dev'"),
    (["--task", "ood", "--ood-values", "group=Flags", "--scores", "mcm,entropy"],
     "--scores 'mcm,entropy': expected some of mcm, energy, max_logit, knn"),
    (["--class-embeddings", "nowhere.safetensors", "--task", "zeroshot"],
     "--class-embeddings nowhere.safetensors: no such file"),
    (["--data", "missing.csv"], "--data 'missing.csv': no such file"),
    (["--k", "0"], "--k [0]: expected positive cut-offs"),
    (["--template", "a photo"], "--template 'a photo'"),
    (["--task", "ood"], "--task ood needs OOD inputs"),
    (["--inverted", "image"], "--inverted 'image': expected QUERY=METHOD"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_settings_fail_before_any_tower_loads(tmp_path, monkeypatch, capsys, extra, message):
    import modalign.embed.joint
    import modalign.model

    def refuse(*args, **kwargs):
        raise AssertionError("a tower or the data was loaded before the settings were checked")

    monkeypatch.setattr(modalign.model.MultiTowerModel, "from_pretrained", refuse)
    monkeypatch.setattr(modalign.embed.joint, "load_joint", refuse)
    argv = ["eval", "--model", str(_model_folder(tmp_path)), "--data", "emoji", *extra,
            "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_bad_bridge_or_learned_bridge_file_fails_before_the_data(tmp_path, monkeypatch):
    import modalign.embed.joint

    monkeypatch.setattr(modalign.embed.joint, "load_joint", lambda *a, **k: 1 / 0)
    folder = _model_folder(tmp_path)
    with pytest.raises(ModalignError, match="expected one of"):
        run(model=folder, data="emoji", bridges=["whiten"])
    with pytest.raises(ModalignError, match=r"nope\.json and nope\.safetensors"):
        run(model=folder, data="emoji", bridges=[f"learned:path={tmp_path / 'nope'}"])


def test_checks_run_without_importing_torch(tmp_path):
    """A wrong split, score or file fails in the command's own process without torch."""
    folder = _model_folder(tmp_path)
    code = (
        "import sys, time\n"
        "from modalign.cli import main\n"
        "start = time.process_time()\n"
        f"rcs = [main(['eval', '--model', {str(folder)!r}, '--data', 'emoji'] + extra) for extra in"
        " (['--split', 'dev'], ['--task', 'ood', '--ood-values', 'g=x', '--scores', 'x'],"
        "  ['--data', 'nope.csv'], ['--class-embeddings', 'nope', '--task', 'zeroshot'])]\n"
        "import json\n"
        "print(json.dumps([rcs, 'torch' in sys.modules, time.process_time() - start]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    rcs, torch_loaded, cpu = json.loads(out.stdout.splitlines()[-1])
    assert rcs == [2, 2, 2, 2] and torch_loaded is False
    assert cpu < 0.5  # CPU seconds for the four checks (no torch, no data read)


def test_align_inverted_matches_by_id_and_restricts_to_covered_rows(store):
    test = {m: store.load(m, split="test") for m in ("image", "text")}
    images = test["image"]
    noto = [it for it in images.items if it["view"] == "noto"]
    chosen = noto[::-1][:3]  # three noto queries, stored in reverse order
    vecs = np.stack([np.full(16, float(i)) for i in range(3)]).astype(np.float32)
    store.add_array("inv", vecs, chosen)
    out, over, info = align_inverted(test, {"image:noto": (store, "inv")}, split="test")
    kept = out["image"].filter(view="noto")
    by_id = {it["id"]: float(i) for i, it in enumerate(chosen)}
    assert over["image:noto"][:, 0].tolist() == [by_id[it["id"]] for it in kept.items]
    assert len(kept) == 3 and len(out["image"].filter(view="openmoji")) == 8
    assert info["queries"]["image:noto"]["num_queries"] == 3
    assert info["queries"]["image:noto"]["of"] == 8
    assert out["text"] is test["text"] and "text" not in over


def test_model_and_data_name_the_record_from_the_store_without_reloading_the_data(
        store, tmp_path, monkeypatch):
    import modalign.data
    import modalign.embed.joint
    from modalign.io import write_json_atomic

    write_json_atomic(store.path / "dataset.json", {"name": "toy", "display_name": "Toy set"})
    calls = []

    def fake_load_joint(**kwargs):
        calls.append(kwargs)
        return JointEmbeddings({m: store.load(m) for m in ("image", "text")}, store=store)

    monkeypatch.setattr(modalign.embed.joint, "load_joint", fake_load_joint)
    monkeypatch.setattr(modalign.data, "load_dataset", lambda *a, **k: 1 / 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = run(model=_model_folder(tmp_path), data="emoji", bootstrap=0)
    assert outcome.record["dataset"] == "Toy set" and len(calls) == 1
    assert calls[0]["data"] == "emoji" and calls[0]["embeddings_dir"] is None
