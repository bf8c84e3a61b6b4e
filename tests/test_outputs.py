"""What a run leaves behind and reads back: the checkpoint schema (today's files and older ones), a failed
write ending in one line with the intact checkpoint named, `xception eval` of a checkpoint at the
checkpoint's own input settings, and the decode-check cache that spares a resumed run the re-check."""

import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TINY, eval_figures, one_line_error, read_metrics, run_cli
from xception import Xception
from xception.checkpoint import FORMAT, VERSION, Checkpoint
from xception.config import EXIT_WRITE, Config, UserError
from xception.data import check
from xception.data.folder import scan_dataset
from xception.engine.optim import build_scheduler
from xception.runtime import DistContext

pytestmark = pytest.mark.slow


def old_format_checkpoint(classes, epoch=1):
    """A checkpoint dict exactly as the writer before the redesign made it: no "version" key."""
    torch.manual_seed(0)
    model = Xception(num_classes=len(classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    cfg = Config(epochs=2, lr=0.05)
    scheduler = build_scheduler(optimizer, cfg, 3)
    for _ in range(3 * epoch):
        optimizer.step()  # no gradients: nothing moves, but the schedule advances in order
        scheduler.step()
    args = {**cfg.to_dict(), "image_size": 71, "crop_pct": 1.0, "batch_size": 4, "seed": 3, "extra": {}}
    return {"format": "xception-checkpoint", "arch": "xception", "epoch": epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None,
            "best_acc1": 33.333, "args": args, "class_names": list(classes), "keras_exact": False}


def test_a_checkpoint_in_the_format_before_the_version_key_still_evaluates_and_resumes(shared_data, tmp_path):
    path = tmp_path / "old.pth.tar"
    torch.save(old_format_checkpoint(["cat", "dog", "fox"]), path)
    ckpt = Checkpoint.load(str(path))
    assert ckpt.epoch == 1 and ckpt.resumable and ckpt.args["image_size"] == 71 and ckpt.epoch_step == 0
    proc = run_cli("eval", "--data_path", shared_data, "--resume", path, "-b", 4, "-j", 0, "--output-dir",
                   tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr
    assert "input image size 71 (the weights' own), crop pct 1 (the weights' own)" in proc.stdout
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth.tar").write_bytes(path.read_bytes())
    proc = run_cli("train", "--data_path", shared_data, "--output-dir", out, *TINY, "--epochs", 2,
                   "--resume", out / "checkpoint.pth.tar")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "epoch 1 done" in proc.stdout
    saved = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert saved["format"] == FORMAT and saved["version"] == VERSION and saved["epoch"] == 2


def test_a_checkpoint_of_a_newer_format_version_is_refused_with_one_line(tmp_path):
    obj = old_format_checkpoint(["a", "b"])
    obj["version"] = VERSION + 1
    path = tmp_path / "new.pth.tar"
    torch.save(obj, path)
    with pytest.raises(UserError, match="newer than this xception reads"):
        Checkpoint.load(str(path))


@pytest.fixture(scope="module")
def one_epoch(shared_data, tmp_path_factory):
    """The output folder of epoch 1 of a 2-epoch TINY run (copied by each test that resumes it)."""
    out = tmp_path_factory.mktemp("one-epoch") / "o"
    proc = run_cli("train", "--data_path", shared_data, "--output-dir", out, *TINY, "--epochs", 2,
                   "--stop-after-epochs", 1)
    assert proc.returncode == 0, proc.stderr
    return out


def _limited(limit_bytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.faults
@pytest.mark.parametrize("culprit", ["checkpoint.pth.tar", "metrics.csv"])
def test_a_failed_write_ends_the_run_with_one_line_naming_the_file_and_the_intact_checkpoint(
        shared_data, one_epoch, tmp_path, culprit):
    """A file-size limit (as a full disk would) stops a write of the resumed run's epoch 2: the checkpoint
    (~180 MB, limit 4 MB), or metrics.csv (grown past a 4 KB limit by rows of earlier runs). One line names
    the file, the OS reason and the intact epoch-1 checkpoint; exit 74; no temporary file left behind."""
    out = tmp_path / "o"
    shutil.copytree(one_epoch, out)
    common = ["train", "--data_path", shared_data, "--output-dir", out, *TINY, "--epochs", 2]
    good = (out / "checkpoint.pth.tar").read_bytes()
    limit = 4 << 20
    if culprit == "metrics.csv":
        header, row = (out / "metrics.csv").read_text().splitlines()[:2]
        (out / "metrics.csv").write_text("\n".join([header] + [row] * 100) + "\n")  # ~12 KB
        limit = 4 << 10  # above what torch's shared-memory counters need
    proc = subprocess.run([sys.executable, "-m", "xception", *map(str, common), "--resume",
                           str(out / "checkpoint.pth.tar")], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="2"), preexec_fn=_limited(limit), timeout=600)
    assert proc.returncode == EXIT_WRITE and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]  # after the progress lines, one line says what happened
    assert line.startswith("xception: error: ") and line.count("xception: error") == 1
    assert f"cannot write {out / culprit}: File too large" in line, line
    assert f"the last intact checkpoint is {out / 'checkpoint.pth.tar'} (epoch 1)" in line, line
    assert line.endswith(f"--resume {out / 'checkpoint.pth.tar'}")
    assert (out / "checkpoint.pth.tar").read_bytes() == good
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


@pytest.mark.faults
def test_plot_that_cannot_write_its_picture_says_so_in_one_line(trained_run, tmp_path):
    _, out, _ = trained_run
    target = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "xception", "plot", str(out), "--out", str(target)],
                          capture_output=True, text=True, preexec_fn=_limited(16 << 10), timeout=300)
    assert proc.returncode == EXIT_WRITE
    assert f"cannot write {target}: File too large" in one_line_error(proc)
    assert not target.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_eval_of_a_checkpoint_uses_its_own_size_and_crop_and_reproduces_its_top1(trained_run, tmp_path):
    """trained_run trained and validated at 71 px with crop 1: `xception eval` with no size flags must
    give its last val top-1 and loss; a flag that differs is used, with a warning."""
    data, out, _ = trained_run
    last = read_metrics(out)[-1]
    proc = run_cli("eval", "--data_path", data, "--resume", out / "checkpoint.pth.tar", "-b", 4, "-j", 0,
                   "--output-dir", tmp_path / "e")
    assert proc.returncode == 0, proc.stderr
    assert "input image size 71 (the weights' own), crop pct 1 (the weights' own)" in proc.stdout
    count, loss, top1, _ = eval_figures(proc)
    assert count == "9" and float(top1) == pytest.approx(float(last["top1"]), abs=1e-3)
    assert float(loss) == pytest.approx(float(last["val_loss"]), rel=1e-4)
    proc = run_cli("eval", "--data_path", data, "--resume", out / "checkpoint.pth.tar", "-b", 4, "-j", 0,
                   "--output-dir", tmp_path / "e2", "--crop-pct", "0.875")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --crop-pct 0.875 overrides the crop pct 1.0" in proc.stdout
    assert "crop pct 0.875 (from the flag)" in proc.stdout


def test_the_decode_check_remembers_good_files_and_checks_changed_ones_again(tiny_data, tmp_path, monkeypatch):
    ctx = DistContext(torch.device("cpu"))
    train, val = scan_dataset(tiny_data)
    checked = []
    real = check.check_image
    monkeypatch.setattr(check, "check_image", lambda path: checked.append(path) or real(path))
    cache = str(tmp_path / "out")
    os.makedirs(cache)
    assert check.find_bad([train, val], ctx, 1, cache, log=lambda *a: None) == []
    assert len(checked) == 21 and os.path.isfile(os.path.join(cache, check.CACHE_NAME))
    checked.clear()
    lines = []
    assert check.find_bad([train, val], ctx, 1, cache, log=lines.append) == []
    assert checked == [] and "0 new or changed of 21 images decode-checked" in lines[-1]
    changed = train.samples[0][0]
    with open(changed, "r+b") as f:  # damage it: same file, new size and time
        f.truncate(40)
    bad = check.find_bad([train, val], ctx, 1, cache, log=lambda *a: None)
    assert checked == [changed] and [p for p, _ in bad] == [changed]
    checked.clear()
    assert [p for p, _ in check.find_bad([train, val], ctx, 1, cache, log=lambda *a: None)] == [changed]
    assert checked == [changed]  # a bad file is never remembered as good


@pytest.mark.faults
def test_prepare_that_cannot_write_a_shard_says_so_in_one_line(shared_data, tmp_path):
    """A full disk while `xception prepare` writes a shard: one line naming the shard, exit 74."""
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "xception", "prepare", "--data_path", shared_data, "--out", str(out),
                           "--shard-size", "12", "--min-shards", "1", "-j", "1"], capture_output=True, text=True,
                          preexec_fn=_limited(8 << 10), timeout=300)
    assert proc.returncode == EXIT_WRITE
    line = one_line_error(proc)
    assert f"cannot write {out / 'train-000000.tar'}: File too large" in line, line
