"""The shared resumable array writer: concurrent writers, damaged arrays, checksums, bad inputs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bad_files import garbage_png
from modalign.cli import main
from modalign.data import Item, PairedDataset
from modalign.embed import EmbeddingStore, embed_dataset
from modalign.embed.arrays import ArrayWriter, array_lock, check_array_file, disk_full
from modalign.errors import ModalignError

WORKER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from modalign.data import Item, PairedDataset
    from modalign.embed import embed_dataset

    store, role = Path(sys.argv[1]), sys.argv[2]
    go = store.parent / "second-started"

    class SlowText:
        name, modality, dim = "slow-text", "text", 4
        def preprocess(self, inputs):
            return list(inputs)
        def encode(self, batch):
            deadline = time.time() + 60
            while role == "first" and not go.exists() and time.time() < deadline:
                time.sleep(0.02)  # hold the lock until the second process is about to write
            time.sleep(0.15)
            return torch.tensor([[float(len(s)), 1.0, float(s.count("x")), 2.0] for s in batch])
        def identity(self):
            return {"name": self.name}

    items = [Item(f"t{i}", "text", "name", "x" * (i + 1), f"g{i}", "train") for i in range(24)]
    if role == "second":
        go.touch()
    embed_dataset(PairedDataset("toy", items), {"text": SlowText()}, store, batch_size=2,
                  progress=False)
    print("done")
""")


def expected_rows(n: int = 24) -> np.ndarray:
    return np.array([[i + 1, 1.0, i + 1, 2.0] for i in range(n)], np.float32)


def test_two_embed_processes_into_one_store(tmp_path):
    """Two real processes embedding one store: the second waits, then reuses the array; no zero
    rows, the manifest's facts match the file. (Before: zero rows or a crash.)"""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    store_dir = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, str(script), str(store_dir)]
    a = subprocess.Popen([*cmd, "first"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    lock = store_dir / "text.lock"
    deadline = time.time() + 60
    while not (lock.exists() and lock.read_text().startswith("pid")):  # A holds the lock
        assert time.time() < deadline and a.poll() is None, a.communicate()
        time.sleep(0.05)
    b = subprocess.Popen([*cmd, "second"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    _, err_a = a.communicate(timeout=120)
    _, err_b = b.communicate(timeout=120)
    assert a.returncode == 0 and b.returncode == 0, (err_a, err_b)
    assert f"pid {a.pid}" in err_b and "waiting" in err_b
    store = EmbeddingStore(store_dir)
    vectors = np.asarray(store.load("text").vectors)
    np.testing.assert_array_equal(vectors, expected_rows())
    info = store.info("text")
    assert info["count"] == 24 and info["shape"] == [24, 4] and info["dtype"] == "float32"
    assert info["size"] == (store_dir / "text.npy").stat().st_size
    assert store.verify() == {"text": None}
    assert not (store_dir / "text.partial.npy").exists()
    assert not (store_dir / "text.progress.json").exists()


def test_killed_writer_resumes_and_lock_is_released(tmp_path):
    """kill -9 while writing: the lock dies with the process, the next run resumes exactly."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    store_dir = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    a = subprocess.Popen([sys.executable, str(script), str(store_dir), "solo"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = store_dir / "text.progress.json"
    deadline = time.time() + 60
    while not (progress.exists() and json.loads(progress.read_text())["done"] >= 6):
        assert time.time() < deadline and a.poll() is None
        time.sleep(0.02)
    a.kill()
    a.wait()
    done_before = json.loads(progress.read_text())["done"]
    assert 6 <= done_before < 24
    b = subprocess.run([sys.executable, str(script), str(store_dir), "solo"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert b.returncode == 0, b.stderr
    assert "waiting" not in b.stderr
    np.testing.assert_array_equal(EmbeddingStore(store_dir).load("text").vectors, expected_rows())


class Count:
    name, modality, dim = "count", "text", 3

    def __init__(self) -> None:
        self.calls = 0

    def preprocess(self, inputs):
        return list(inputs)

    def encode(self, batch):
        self.calls += 1
        return torch.tensor([[len(s), 1.0, 0.5] for s in batch], dtype=torch.float32)

    def identity(self):
        return {"name": self.name}


def text_dataset(n: int = 6) -> PairedDataset:
    return PairedDataset("toy", [Item(f"t{i}", "text", "name", "y" * (i + 1), f"g{i}", "train")
                                 for i in range(n)])


def test_truncated_array_is_detected_named_and_reencoded(tmp_path, capsys):
    store = embed_dataset(text_dataset(), {"text": Count()}, tmp_path / "s", progress=False)
    path = store.path / "text.npy"
    good = np.asarray(store.load("text").vectors).copy()
    path.write_bytes(path.read_bytes()[:-20])  # a copy that stopped half-way
    assert "truncated" in check_array_file(path)
    with pytest.raises(ModalignError, match=r"text\.npy is damaged \(truncated"):
        store.load("text")  # before: "mmap length is greater than file size"
    enc = Count()
    embed_dataset(text_dataset(), {"text": enc}, store.path, progress=False)
    assert enc.calls > 0  # before: reported success without repairing it
    assert "text.npy is damaged" in capsys.readouterr().err
    np.testing.assert_array_equal(store.load("text").vectors, good)


def test_verify_compares_the_checksum(tmp_path, capsys):
    store = embed_dataset(text_dataset(), {"text": Count()}, tmp_path / "s", progress=False)
    assert main(["data", "check", str(store.path)]) == 0
    path = store.path / "text.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, same shape: only the checksum can tell
    path.write_bytes(bytes(data))
    assert store.check("text") is None
    assert "checksum" in store.verify()["text"]
    capsys.readouterr()
    assert main(["data", "check", str(store.path)]) == 1
    assert "text: DAMAGED: checksum" in capsys.readouterr().out


def test_undecodable_image_is_skipped_and_named(tmp_path):
    """A PNG with valid chunk CRCs but garbage compressed data: embed skips it by name."""
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "ok2.png")
    (tmp_path / "bad.png").write_bytes(garbage_png())
    items = [Item(f"i{k}", "image", "photo", f"{name}.png", f"g{k}", "train")
             for k, name in enumerate(["ok", "bad", "ok2"])]
    ds = PairedDataset("imgs", items, root=tmp_path)

    class Pixels:
        name, modality, dim = "pixels", "image", 3

        def preprocess(self, inputs):
            from modalign.encoders.images import images_to_tensor
            return images_to_tensor(inputs, size=8)

        def encode(self, batch):
            return batch.mean(dim=(2, 3))

        def identity(self):
            return {"name": self.name}

    store = embed_dataset(ds, {"image": Pixels()}, tmp_path / "s", progress=False)
    emb = store.load("image")
    assert [it["id"] for it in emb.items] == ["i0", "i2"]
    np.testing.assert_allclose(emb.vectors, [[255, 0, 0], [0, 0, 255]])
    skipped = store.info("image")["skipped"]
    assert len(skipped) == 1 and skipped[0]["id"] == "i1"


def test_writer_disk_full_is_one_line(tmp_path, monkeypatch):
    err = disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "a.npy",
                    3 << 20)
    assert isinstance(err, ModalignError)
    assert "no space left" in str(err) and "3.1 MB needed" in str(err)
    assert disk_full(OSError(errno.EACCES, "denied"), tmp_path / "a.npy") is None

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with array_lock(tmp_path, "x"), pytest.raises(ModalignError, match="no space left"):
        ArrayWriter(tmp_path, "x", key="k", rows=1000, dim=256)
    assert not (tmp_path / "x.partial.npy").exists()


def test_writer_discards_progress_of_another_key(tmp_path):
    with array_lock(tmp_path, "x"):
        w = ArrayWriter(tmp_path, "x", key="a", rows=4, dim=2)
        w.write(0, np.ones((2, 2), np.float32))
        w.close()
        assert ArrayWriter(tmp_path, "x", key="a", rows=4, dim=2).done == 2
        assert ArrayWriter(tmp_path, "x", key="b", rows=4, dim=2).done == 0
