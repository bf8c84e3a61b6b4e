"""WebDataset shards (tools/prepare.py, data/shards.py): `xception prepare` (index, re-encoding, resume)
and reading them with every sample at most once per epoch across ranks x workers, exactly once where the
counts divide, the same number of steps on every rank, and every validation sample exactly once."""

import json
import os
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from conftest import make_image_folder, one_line_error, run_cli
from xception.config import Config, ShardSettings, UserError
from xception.data import build_loaders, shards
from xception.data.loaders import Loader
from xception.data.transforms import Uint8Eval, Uint8Train
from xception.runtime import DistContext
from xception.tools import prepare as prep


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """4 classes: 24 train images (8 shards of 3) and 9 val images (8 shards of 1 or 2), short side <= 64."""
    root = tmp_path_factory.mktemp("shards")
    data = make_image_folder(root / "data", classes=("a", "b", "c", "d"), n_train=6, n_val=3, size=(96, 80))
    # 4 classes x 3 val = 12 val images; drop three to get an odd, uneven count
    for name in ("b", "c", "d"):
        os.remove(os.path.join(data, "val", name, "0.jpg"))
    out = str(root / "shards")
    index = prep.prepare(data, out, ShardSettings(max_size=64, quality=90, shard_size=3, min_shards=8), workers=1,
                         log=lambda *a: None)
    return data, out, index


def keys_of(out, name):
    with tarfile.open(os.path.join(out, name)) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def test_prepare_writes_shards_and_an_index(shard_set):
    data, out, index = shard_set
    with open(os.path.join(out, "index.json")) as f:
        assert json.load(f) == index
    assert index["complete"] and index["classes"] == ["a", "b", "c", "d"] and index["quality"] == 90
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["count"] == 24 and len(train["shards"]) == 8
    assert [s["count"] for s in train["shards"]] == [3] * 8
    assert train["class_counts"] == [6, 6, 6, 6]
    assert val["count"] == 9 and len(val["shards"]) == 8 and sum(val["class_counts"]) == 9
    every = [k for s in train["shards"] for k in keys_of(out, s["name"])]
    assert len(every) == len(set(every)) == 24
    with tarfile.open(os.path.join(out, train["shards"][0]["name"])) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        img = Image.open(tar.extractfile(member))
        assert img.format == "JPEG" and min(img.size) == 64  # 96x80 re-encoded with short side 64


def test_prepare_resumes_after_an_interruption(tmp_path, shard_set, monkeypatch):
    data, _, finished_index = shard_set
    out = str(tmp_path / "out")
    real, calls = prep.encode, []

    def dies_on_the_eighth(*a):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(prep, "encode", dies_on_the_eighth)
    settings = ShardSettings(max_size=64, shard_size=3, min_shards=8)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(data, out, settings, workers=1, log=lambda *a: None)
    with open(os.path.join(out, "index.json")) as f:
        partial = json.load(f)
    done = [s["name"] for s in partial["splits"]["train"]["shards"]]
    assert done == ["train-000000.tar", "train-000001.tar"] and not partial["complete"]
    with pytest.raises(UserError, match="not finished"):
        shards.read_index(out)
    before = os.stat(os.path.join(out, done[0])).st_mtime_ns
    monkeypatch.setattr(prep, "encode", real)
    index = prep.prepare(data, out, settings, workers=1, log=lambda *a: None)
    assert os.stat(os.path.join(out, done[0])).st_mtime_ns == before  # finished shards are kept
    assert index["splits"] == finished_index["splits"] and index["complete"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    with pytest.raises(UserError, match="other settings"):
        prep.prepare(data, out, ShardSettings(max_size=32, shard_size=3, min_shards=8), workers=1,
                     log=lambda *a: None)


def stream(out, index, train, rank, world, workers, batch, seed=5):
    split = index["splits"]["train" if train else "val"]
    transform = Uint8Train(71) if train else Uint8Eval(71, 0.875)
    s = shards.ShardStream(out, split, transform, batch, train, shards.Slots(rank, world, workers, seed=seed))
    s.with_keys = True
    return s


def run_epoch(streams, epoch, monkeypatch):
    """Every rank's batches, each rank's workers run in turn in this process (their ids faked)."""
    per_rank = []
    for s in streams:
        s.set_epoch(epoch)
        batches = []
        for worker in range(s.workers):
            monkeypatch.setattr(shards, "get_worker_info", lambda w=worker: type("I", (), {"id": w})())
            batches += list(s)
        per_rank.append(batches)
    monkeypatch.undo()
    return per_rank


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 3), (2, 2, 3), (2, 1, 4), (4, 2, 3), (3, 2, 2)])
def test_training_epoch_reads_each_sample_at_most_once_with_equal_steps(shard_set, monkeypatch, world,
                                                                        workers, batch):
    _, out, index = shard_set
    streams = [stream(out, index, True, r, world, workers, batch) for r in range(world)]
    orders = []
    for epoch in (0, 1):
        per_rank = run_epoch(streams, epoch, monkeypatch)
        steps = {len(b) for b in per_rank}
        assert steps == {streams[0].batches_per_rank()}  # every rank the same number of steps
        assert all(b[0].shape == (batch, 3, 71, 71) for rank in per_rank for b in rank)
        keys = [k for rank in per_rank for b in rank for k in b[2]]
        assert len(keys) == len(set(keys))  # never twice in an epoch, across the whole job
        slots = world * workers
        if 8 % slots == 0 and (8 // slots * 3) % batch == 0:  # shards and batches fill every slot
            assert sorted(keys) == sorted(f"{i:09d}" for i in range(24))  # exactly once
        orders.append(keys)
    assert orders[0] != orders[1]  # reshuffled every epoch


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 1), (4, 3)])
def test_validation_reads_every_sample_exactly_once(shard_set, monkeypatch, world, workers):
    _, out, index = shard_set
    streams = [stream(out, index, False, r, world, workers, 2) for r in range(world)]
    per_rank = run_epoch(streams, 0, monkeypatch)
    keys = [k for rank in per_rank for b in rank for k in b[2]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 9
    assert [len(b) for b in per_rank] == [s.batches_per_rank() for s in streams]
    targets = Counter(t for rank in per_rank for b in rank for t in b[1].tolist())
    assert [targets[c] for c in range(4)] == index["splits"]["val"]["class_counts"]


def test_loaders_with_real_workers_and_a_url(shard_set):
    """Through build_loaders: torch's DataLoader with 2 persistent workers over 2 epochs, the
    index read through a file:// URL as for a remote shard set."""
    data, out, index = shard_set
    cfg = Config(data_path="file://" + os.path.abspath(out), batch_size=3, workers=2, image_size=71,
                 crop_pct=0.875, seed=1)
    ctx = DistContext(device=torch.device("cpu"))
    loaders = build_loaders(cfg, ctx, need_train=True, log=lambda *a: None)
    classes, train, val = loaders.classes, loaders.train, loaders.val
    assert isinstance(train, shards.ShardLoader) and isinstance(val, Loader)
    assert classes == ["a", "b", "c", "d"] and len(train) == 8 and train.num_samples == 24
    assert train.batch_size == 3 and val.num_samples == 9 and loaders.skipped == 0
    seen = []
    for epoch in (0, 1):
        train.set_epoch(epoch)
        batches = list(train)
        assert len(batches) == 8 and all(x.dtype == torch.uint8 and x.shape == (3, 3, 71, 71) for x, _ in batches)
        seen.append(torch.cat([x.flatten(1).float().mean(1) for x, _ in batches]))
    assert not torch.equal(seen[0], seen[1])
    assert sum(x.shape[0] for x, _ in val) == 9 and len(val) == sum(1 for _ in val)


def test_shard_set_detection_and_errors(shard_set, tmp_path):
    data, out, _ = shard_set
    assert shards.is_shard_source(out) and shards.is_shard_source(os.path.join(out, "index.json"))
    assert shards.is_shard_source("https://example.invalid/shards") and not shards.is_shard_source(data)
    with pytest.raises(UserError, match="cannot read"):
        shards.read_index(str(tmp_path / "nothing-here") + "/index.json")
    bad = tmp_path / "index.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match="not an index"):
        shards.read_index(str(tmp_path))
    cfg = Config(data_path=out, batch_size=32, workers=0, image_size=71, crop_pct=0.875, seed=0)
    with pytest.raises(UserError, match="too few training samples"):  # 6 samples per rank < 8 per batch
        build_loaders(cfg, DistContext(torch.device("cpu"), rank=0, world_size=4), True, log=lambda *a: None)


def test_prepare_cli_and_train_cli_on_shards(shard_set, tmp_path):
    data, _, _ = shard_set
    out = tmp_path / "s"
    proc = run_cli("prepare", "--data_path", data, "--out", out, "--max-size", "48", "--shard-size", "4",
                   "--min-shards", "2", "-j", "1")
    assert proc.returncode == 0, proc.stderr
    assert "train 24 images in 6 shards" in proc.stdout
    line = one_line_error(run_cli("prepare", "--data_path", tmp_path / "absent", "--out", tmp_path / "x"))
    assert "no such folder" in line
    proc = run_cli("train", "--data_path", out, "--epochs", "1", "-b", "4", "--image-size", "71", "-j", "0",
                   "--output-dir", tmp_path / "run", "--print-freq", "1", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "24 train / 9 val images, 4 classes" in proc.stdout
