"""What a checkpoint's weights and settings mean downstream: eval reproduces model_best's best_acc1 with the
weights the run ranked best (trained or EMA); a resume with a longer --epochs continues the schedule that
--epochs gives; --ema-every keeps its phase across a resume; a resume takes the settings not given from the
checkpoint and names the ones that cannot change."""

import math

import pytest
import torch

from conftest import TINY, one_line_error, read_metrics, run_cli
from xception.cli import main
from xception.config import Config
from xception.engine.optim import build_optimizer, build_scheduler, continue_schedule

pytestmark = pytest.mark.slow


def _eval_top1(capsys, data, weights, out, *flags):
    """`xception eval` in this process (no interpreter start per call): (top-1, stdout)."""
    argv = ["eval", "--data_path", data, "--weights", weights, "--workers", 0, "--batch-size", 9, "--output-dir",
            out, "--no-check-data", *flags]
    assert main([str(a) for a in argv]) == 0
    stdout = capsys.readouterr().out
    line = next(line for line in stdout.splitlines() if " images: loss " in line)
    return float(line.split("top1 ")[1].split()[0]), stdout


def test_eval_of_model_best_reproduces_best_acc1_with_the_weights_the_run_chose(shared_data, tmp_path, capsys):
    # An EMA with decay 0.9999 barely leaves the initial weights in 9 steps: the two sets of weights differ.
    out = tmp_path / "run"
    proc = run_cli("train", "--data_path", shared_data, "--epochs", 3, "--output-dir", out, *TINY,
                   "--ema", "--ema-decay", "0.9999")
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(out)
    best = torch.load(out / "model_best.pth.tar", map_location="cpu", weights_only=True)
    scores = [(max(float(r["top1"]), float(r["ema_top1"])), -i) for i, r in enumerate(rows)]
    best_row = rows[-max(scores)[1]]  # the first epoch with the highest score (ranking is strict)
    source = "ema" if float(best_row["ema_top1"]) > float(best_row["top1"]) else "model"
    assert best["epoch"] == int(best_row["epoch"]) and best["best_source"] == source
    assert best["best_acc1"] == pytest.approx(max(float(best_row["top1"]), float(best_row["ema_top1"])), abs=1e-3)

    top1, stdout = _eval_top1(capsys, shared_data, out / "model_best.pth.tar", tmp_path / "e1")
    assert top1 == pytest.approx(best["best_acc1"], abs=1e-3)
    assert ("using the EMA weights" if source == "ema" else "using the trained weights") in stdout
    # each flag takes its set, whose top-1 the run recorded for that epoch
    raw, _ = _eval_top1(capsys, shared_data, out / "model_best.pth.tar", tmp_path / "e2", "--raw-weights")
    ema, stdout = _eval_top1(capsys, shared_data, out / "model_best.pth.tar", tmp_path / "e3", "--ema-weights")
    assert raw == pytest.approx(float(best_row["top1"]), abs=1e-3) and "(--ema-weights)" in stdout
    assert ema == pytest.approx(float(best_row["ema_top1"]), abs=1e-3)
    # the last epoch's checkpoint: the better of that epoch's two
    last, _ = _eval_top1(capsys, shared_data, out / "checkpoint.pth.tar", tmp_path / "e4")
    assert last == pytest.approx(max(float(rows[-1]["top1"]), float(rows[-1]["ema_top1"])), abs=1e-3)
    both = run_cli("eval", "--data_path", shared_data, "--weights", out / "model_best.pth.tar", "--raw-weights",
                   "--ema-weights", "--output-dir", tmp_path / "e5")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def _lrs(cfg: Config, steps_per_epoch: int, steps: int, optimizer=None, scheduler=None) -> list:
    optimizer = optimizer or build_optimizer(torch.nn.Linear(1, 1), cfg, torch.device("cpu"))
    scheduler = scheduler or build_scheduler(optimizer, cfg, steps_per_epoch)
    out = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("sched", ["cosine", "exponential"])
def test_a_continued_schedule_equals_the_longer_run_from_the_start(sched):
    short, long = Config(epochs=2, lr=0.05, warmup_epochs=1, sched=sched), Config(epochs=4, lr=0.05,
                                                                                   warmup_epochs=1, sched=sched)
    net = torch.nn.Linear(1, 1)
    optimizer = build_optimizer(net, short, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, short, 3)
    _lrs(short, 3, 6, optimizer, scheduler)
    assert optimizer.param_groups[0]["lr"] < 1e-12 or sched != "cosine"  # the short cosine ended at zero
    saved = optimizer.state_dict()
    again = build_optimizer(net, long, torch.device("cpu"))
    again.load_state_dict(saved)
    continued = continue_schedule(again, long, 3, 6)
    fresh = _lrs(long, 3, 12)
    assert again.param_groups[0]["lr"] == fresh[5]
    assert _lrs(long, 3, 6, again, continued) == fresh[6:]  # bitwise: the same arithmetic from step 0


def test_raising_epochs_on_resume_continues_the_longer_schedule(trained_run, tmp_path):
    data, run, _ = trained_run  # 2 epochs of 3 steps, cosine from 0.05 to 0
    out = tmp_path / "longer"
    proc = run_cli("train", "--data_path", data, "--epochs", 4, "--output-dir", out, *TINY,
                   "--resume", run / "checkpoint.pth.tar")
    assert proc.returncode == 0, proc.stderr
    assert "epochs 4 (was 2): the LR schedule is the one these settings give from the start" in proc.stdout
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [3, 4]
    fresh = _lrs(Config(epochs=4, lr=0.05), 3, 12)
    got = [float(r["lr"]) for r in rows]
    assert got == pytest.approx([fresh[8], fresh[11]], rel=1e-5, abs=1e-12)
    assert got[0] > got[1] and got[1] < 1e-9  # down to zero at the new end, not back up to the peak


def _tensors_equal(a: dict, b: dict) -> list:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_ema_every_k_and_settings_not_given_continue_across_a_resume(shared_data, tmp_path):
    # 3 optimizer steps per epoch and an EMA every 2: the phase at the resume is odd
    flags = [*TINY, "--ema", "--ema-every", 2, "--ema-decay", "0.5"]
    shaping = ["--no-wd-norm-bias", "--label-smoothing", "0.1", "--opt", "adamw", "--lr", "0.001"]
    full, part = tmp_path / "full", tmp_path / "part"
    proc = run_cli("train", "--data_path", shared_data, "--epochs", 2, "--output-dir", full, *flags, *shaping)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train", "--data_path", shared_data, "--epochs", 2, "--stop-after-epochs", 1, "--output-dir",
                   part, *flags, *shaping)
    assert proc.returncode == 0, proc.stderr
    ckpt = part / "checkpoint.pth.tar"
    # Given against the checkpoint: refused in one line naming the checkpoint's values
    refused = run_cli("train", "--data_path", shared_data, "--epochs", 2, "--output-dir", part, *flags,
                      "--resume", ckpt, "--wd-norm-bias", "--opt", "sgd")
    line = one_line_error(refused)
    assert "was trained with --opt adamw --no-wd-norm-bias" in line and "resume with --opt adamw" in line
    # Left out: taken from the checkpoint, said in a line; the run continues exactly
    proc = run_cli("train", "--data_path", shared_data, "--epochs", 2, "--output-dir", part,
                   *[f for f in flags if f not in ("--lr", "0.05")], "--resume", ckpt)
    assert proc.returncode == 0, proc.stderr
    said = next(line for line in proc.stdout.splitlines() if "continuing with its settings" in line)
    for setting in ("wd_norm_bias False", "label_smoothing 0.1", "opt adamw", "lr 0.001"):
        assert setting in said, said
    a = torch.load(full / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    b = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert a["ema_updates"] == b["ema_updates"] == 3  # 6 optimizer steps, every 2nd
    assert not _tensors_equal(a["model"], b["model"])
    assert not _tensors_equal(a["ema"], b["ema"])
    assert math.isclose(a["best_acc1"], b["best_acc1"])
