"""Experiment trackers without a network: a run logging to MLflow (a local SQLite store) and to W&B (offline
files) is stopped by SIGTERM in its second epoch and resumed; each tracker then holds one run with every
epoch once, equal to metrics.csv. The tracker's view and the checkpoint's disagreeing (a crash between the
two) neither repeats nor loses an epoch. A tracker that cannot start stops the run before training."""

import glob
import json
import os
import signal
import struct

import pytest

from conftest import make_image_folder, one_line_error, read_metrics, run_cli
from test_faults_runtime import signal_after, start
from xception.config import EXIT_PREEMPTED

# 12 train images, batch 4: 3 steps per epoch
FLAGS = ["--image-size", "71", "--crop-pct", "1", "--batch-size", "4", "--workers", "0", "--seed", "3",
         "--print-freq", "1", "--epochs", "2", "--device", "cpu", "--lr", "0.05", "--ema", "--ema-decay", "0.5"]


def offline_env(tmp):
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp), "WANDB_DISABLE_GIT": "true",
            "WANDB_CONSOLE": "off"}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A run stopped by SIGTERM at epoch 2 step 1, then resumed: (output folder, W&B folder)."""
    root = tmp_path_factory.mktemp("track")
    data = make_image_folder(root / "data", n_train=4, n_val=2)
    out, wdir = root / "run", root / "wandb"
    wdir.mkdir()
    env = offline_env(wdir)
    os.environ.update(env)  # start() passes this process's environment on
    try:
        args = ["train", "--data_path", data, "--output-dir", out, *FLAGS, "--mlflow", "--log-wandb", "--log-checkpoint"]
        code, _, err = signal_after(start(*args), "epoch 2/2 [1/3]", signal.SIGTERM)
    finally:
        for key in env:
            os.environ.pop(key)
    assert code == EXIT_PREEMPTED, err
    proc = run_cli(*args, "--resume", out / "checkpoint.pth.tar", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--mlflow: run" in proc.stdout and "(continued)" in proc.stdout, proc.stdout
    return out, wdir


def test_mlflow_holds_one_run_with_every_epoch_once_equal_to_metrics_csv(resumed):
    from mlflow.tracking import MlflowClient
    out, _ = resumed
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("run")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run"
    run_id = runs[0].info.run_id
    rows = {int(r["epoch"]): r for r in read_metrics(out)}
    assert sorted(rows) == [1, 2]
    for key in ("train_loss", "val_loss", "top1", "top5", "lr", "ema_top1", "epoch_seconds"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
        assert {m.step: m.value for m in history} == {e: float(r[key]) for e, r in rows.items()}, key
    params = runs[0].data.params
    assert params["epochs"] == "2" and params["ema"] == "True" and params["mlflow"] == "auto"
    assert params["resume"] == "None"  # a parameter keeps the first invocation's value
    assert [a.path for a in client.list_artifacts(run_id)] == ["model_best.pth.tar"]  # --log-checkpoint
    assert (out / "mlflow-artifacts").is_dir()
    import torch
    saved = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert saved["trackers"]["mlflow"] == run_id


def wandb_records(path):
    """The records of a W&B run file (a LevelDB-style log of protobuf records), read without wandb's
    service: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type: 1 whole, 2 first, 3 middle,
    4 last)."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def test_wandb_offline_runs_share_one_id_and_hold_every_epoch_once(resumed):
    out, wdir = resumed
    files = sorted(glob.glob(str(wdir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2, files  # the stopped invocation and the resumed one
    ids, epochs, artifacts = set(), [], []
    rows = {int(r["epoch"]): r for r in read_metrics(out)}
    for path in files:
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
            if record.WhichOneof("record_type") == "artifact":
                artifacts.append((record.artifact.type, record.artifact.name))
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                epochs.append(items["epoch"])
                assert items["_step"] == items["epoch"]
                assert items["top1"] == float(rows[items["epoch"]]["top1"])
                assert items["ema_top1"] == float(rows[items["epoch"]]["ema_top1"])
    assert sorted(epochs) == [1, 2]
    assert artifacts == [("model", "run-best")]  # --log-checkpoint, at the end of the resumed invocation
    import torch
    saved = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert ids == {saved["trackers"]["wandb"]}
    assert json.load(open(out / "wandb-epochs.json")) == {"id": saved["trackers"]["wandb"], "epochs": [1, 2]}


def test_a_tracker_ahead_of_or_behind_the_checkpoint_gets_each_epoch_once(tmp_path):
    """In-process: epochs 1-2 logged; a resume from a checkpoint of epoch 1 (the tracker ahead) repeats
    nothing; one whose checkpoint reached epoch 3 while the flag was off (the tracker behind) gets 3."""
    from mlflow.tracking import MlflowClient
    from xception.config import Config
    from xception.engine.track import open_trackers
    from xception.report import append_metrics
    from xception.runtime import DistContext
    import torch
    ctx = DistContext(device=torch.device("cpu"))
    cfg = Config(output_dir=str(tmp_path), mlflow="auto", epochs=3)
    for epoch in (1, 2, 3):
        append_metrics(str(tmp_path / "metrics.csv"), {"epoch": epoch, "train_loss": 1.0 / epoch, "top1": 10.0 * epoch})
    first = open_trackers(cfg, ctx, None, 0, print)
    first.catch_up(2)
    first.close(None)
    again = open_trackers(cfg, ctx, first.ids, 1, print)  # the checkpoint says 1 epoch
    again.catch_up(2)  # epoch 2 trained again: already held
    again.close(None)
    later = open_trackers(cfg, ctx, first.ids, 3, print)  # backfills epoch 3 from metrics.csv
    later.close(None)
    off = open_trackers(cfg.replace(mlflow=None), ctx, first.ids, 3, print)  # the flag off: nothing at all
    assert off.on == [] and off.ids == first.ids  # the ids stay in the next checkpoint
    history = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        first.ids["mlflow"], "top1")
    assert sorted((m.step, m.value) for m in history) == [(1, 10.0), (2, 20.0), (3, 30.0)]


def test_a_tracker_that_cannot_start_stops_the_run_before_training(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=1, n_val=1)
    out = tmp_path / "bad"
    proc = run_cli("train", "--data_path", data, "--output-dir", out, *FLAGS, "--mlflow", "bogus://nowhere")
    line = one_line_error(proc)
    assert line.startswith("xception: error: --mlflow bogus://nowhere: cannot start a run"), line
    assert not (out / "checkpoint.pth.tar").exists() and not (out / "metrics.csv").exists()


@pytest.mark.parametrize("flags, package", [({"log_wandb": True}, "wandb"), ({"mlflow": "auto"}, "mlflow")])
def test_a_missing_package_names_its_extra(tmp_path, monkeypatch, flags, package):
    import torch
    from xception.config import Config, UserError
    from xception.engine.track import open_trackers
    from xception.runtime import DistContext
    for name in (package, f"{package}.entities", f"{package}.tracking"):  # `import PACKAGE...` now fails
        monkeypatch.setitem(__import__("sys").modules, name, None)
    with pytest.raises(UserError, match=rf"needs the {package} package: pip install 'xception\[{package}\]'"):
        open_trackers(Config(output_dir=str(tmp_path), **flags), DistContext(device=torch.device("cpu")), None, 0, print)
    assert os.listdir(tmp_path) == []
