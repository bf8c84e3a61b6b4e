"""Fault injection, part 2: faults during training. Preemption (SIGTERM/SIGINT) and a bitwise-exact
resume, non-finite losses and fp16 overflow, and a rank killed in a two-process run."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_image_folder, run_cli, weights
from xception import cli
from xception.config import EXIT_NONFINITE, EXIT_PREEMPTED
from xception.engine.hooks import StepGuard
from xception.engine.loop import EpochPlan, Step, train_one_epoch
from xception.engine.precision import Precision
from xception.runtime import DistContext

pytestmark = pytest.mark.faults

# 24 train images, batch 4: 6 steps per epoch; single-process loading so the random streams are exact.
FLAGS = ["--image-size", "71", "--batch-size", "4", "--workers", "0", "--seed", "5", "--print-freq", "1",
         "--epochs", "2", "--device", "cpu", "--lr", "0.05"]
ENV = {"OMP_NUM_THREADS": "1"}  # one thread: CPU kernels then sum in a fixed order


def start(*args):
    env = dict(os.environ, **ENV)
    return subprocess.Popen([sys.executable, "-m", "xception", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def signal_after(proc, marker: str, signum) -> tuple:
    """Send `signum` once `marker` shows in the progress lines; (returncode, stdout, stderr)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, "".join(seen) + err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("faults") / "data", n_train=8, n_val=2)


# The recipe ingredients that draw random numbers or carry state between steps: the EMA (with its decay
# warm-up), mixup/CutMix, RandAugment, random erasing, and accumulation (2 batches per optimizer step: a
# signal stops only at an optimizer step's end, and the progress lines come every 2 batches); the EMA every
# 2 optimizer steps, whose phase must continue across the stop.
RECIPE = ["--ema", "--ema-warmup", "--ema-every", "2", "--mixup", "0.2", "--cutmix", "1.0", "--auto-augment", "ra",
          "--random-erase", "0.25", "--grad-accum-steps", "2"]


@pytest.fixture(scope="module", params=[[], RECIPE], ids=["plain", "recipe"])
def uninterrupted(data, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("full")
    proc = run_cli("train", "--data_path", data, "--output-dir", out, *FLAGS, *request.param, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return out, request.param


def test_sigterm_at_a_random_step_then_resume_is_bitwise_equal(data, uninterrupted, tmp_path):
    uninterrupted, extra = uninterrupted
    accum = 2 if extra else 1
    step = accum * random.Random().randint(1, 11 // accum)  # after batch `step` of 12 (2 epochs x 6)
    marker = f"epoch {1 + (step - 1) // 6}/2 [{(step - 1) % 6 + 1}/6]"
    out = tmp_path / "part"
    code, _, err = signal_after(start("train", "--data_path", data, "--output-dir", out, *FLAGS, *extra), marker,
                                signal.SIGTERM)
    assert code == EXIT_PREEMPTED, (marker, err)
    assert "Traceback" not in err and "SIGTERM received" in err
    assert f"--resume {out / 'checkpoint.pth.tar'}" in err.strip().splitlines()[-1]
    saved = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    done = saved["epoch"] * 6 + saved["epoch_step"]
    assert step <= done <= 12 and saved["epoch_step"] > 0, (marker, saved["epoch"], saved["epoch_step"])
    assert len(saved["rng"]) == 1 and saved["rng"][0]["torch"].dtype == torch.uint8

    assert saved["epoch_step"] % accum == 0  # at an optimizer step's end
    proc = run_cli("train", "--data_path", data, "--output-dir", out, *FLAGS, *extra, "--resume",
                   out / "checkpoint.pth.tar", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"and {saved['epoch_step']} steps of epoch {saved['epoch'] + 1}" in proc.stdout
    full = torch.load(uninterrupted / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    resumed = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    for part in ("model", "ema") if extra else ("model",):
        a, b = full[part], resumed[part]
        assert a.keys() == b.keys()
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, f"{part}, interrupted after {marker}: {len(unequal)} tensors differ, e.g. {unequal[0]}"
    assert resumed["ema_updates"] == full["ema_updates"] == (3 if extra else 0)  # 6 optimizer steps / 2


def test_sigint_also_stops_after_the_step_and_resume_auto_picks_it_up(data, tmp_path):
    """--resume auto, as under torchrun --max-restarts: fresh on the first start, resumes on the next."""
    out = tmp_path / "int"
    flags = ["train", "--data_path", data, "--output-dir", out, *FLAGS, "--epochs", 1, "--resume", "auto"]
    code, _, err = signal_after(start(*flags), "epoch 1/1 [2/6]", signal.SIGINT)
    assert code == EXIT_PREEMPTED and "Traceback" not in err, err
    saved = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and 2 <= saved["epoch_step"] <= 6
    proc = run_cli(*flags, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {out / 'checkpoint.pth.tar'}: epoch 0 done and {saved['epoch_step']} steps" in proc.stdout


def test_a_non_finite_loss_without_loss_scaling_stops_the_run_at_once(data, tmp_path):
    """With --print-freq 100 the loss is first read at the epoch's last step (6): the run stops there, after
    that step's progress line, and the one error line still names step 2, where the loss went non-finite."""
    out = tmp_path / "nan"
    proc = run_cli("train", "--data_path", data, "--output-dir", out, *FLAGS, "--lr", "1e30", "--print-freq", 100,
                   env=ENV)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_NONFINITE and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2 [6/6] loss nan"), proc.stderr
    line = lines[1]
    assert line.startswith("xception: error: ")
    assert "not finite at epoch 1 step 2" in line and "no checkpoint had been written yet" in line
    assert not (out / "checkpoint.pth.tar").exists()


def test_a_non_finite_loss_keeps_the_last_good_checkpoint_untouched(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    common = ["train", "--data_path", data, "--output-dir", out, *FLAGS]
    assert cli.main([str(a) for a in common + ["--stop-after-epochs", "1"]]) == 0
    good = (out / "checkpoint.pth.tar").read_bytes()
    best = (out / "model_best.pth.tar").read_bytes()
    capsys.readouterr()
    calls = {"n": 0}
    real_forward = nn.CrossEntropyLoss.forward

    def poisoned(self, logits, targets):  # the third training step of epoch 2 yields NaN
        calls["n"] += 1
        loss = real_forward(self, logits, targets)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", poisoned)
    code = cli.main([str(a) for a in common + ["--resume", out / "checkpoint.pth.tar"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_NONFINITE
    assert "not finite at epoch 2 step 3" in err[-1] and "(epoch 1) is kept unchanged" in err[-1]
    assert (out / "checkpoint.pth.tar").read_bytes() == good
    assert (out / "model_best.pth.tar").read_bytes() == best


def _tiny_epoch(loss_fn, scaler, max_nonfinite=4, steps=8, print_freq=100, fused=None, static_scale=None):
    """train_one_epoch on a linear model: the real step, scaler and guard, without Xception's cost."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    images = torch.randint(0, 255, (2 * steps, 3, 4, 4), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.randint(0, 3, (2 * steps,))), batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ctx = DistContext(torch.device("cpu"))
    guard = StepGuard(ctx, scaler is not None, max_nonfinite, log=lambda *a: None)
    step = Step(model, loss_fn, optimizer, scheduler, Precision("cpu", None, scaler, static_scale))
    train_one_epoch(step, loader, ctx, EpochPlan(steps, print_freq, channels_last=False), hooks=[guard],
                    progress=None)
    return guard, model, step


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("static", [None, 2.0 ** 16])
def test_fp16_overflow_skips_the_step_and_counts_it(fused, static):
    """Also with the fused SGD (the CUDA choice), whose post-hook fires on skipped steps too, and with a
    static --loss-scale, which must stay where it is."""
    calls = {"n": 0}

    def loss_fn(logits, targets):  # the first 3 steps overflow once scaled (x 2**16), then none do
        calls["n"] += 1
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * 1e36 if calls["n"] <= 3 else loss

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    guard, model, step = _tiny_epoch(loss_fn, scaler, fused=fused, static_scale=static)
    assert guard.stop is None and guard.steps_done == 8
    assert step.overflow_skipped() == 3
    assert scaler.get_scale() == (2.0 ** 16 if static else 2.0 ** 13)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("print_freq", [1, 100])
@pytest.mark.parametrize("scaled,limit,expect_steps", [(True, 4, 4), (True, 1, 1), (False, 4, 1)])
def test_non_finite_losses_stop_after_k_in_a_row_with_scaling_or_at_once_without(scaled, limit, expect_steps,
                                                                                 print_freq):
    """The streak is read at check steps only: with --print-freq 1 the epoch stops at the step where the
    streak reached the limit; with a large one at the epoch's last step, still naming that step."""
    def nan_loss(logits, targets):
        return nn.functional.cross_entropy(logits, targets) * float("nan")

    scaler = torch.amp.GradScaler("cpu") if scaled else None
    guard, model, _ = _tiny_epoch(nan_loss, scaler, max_nonfinite=limit, print_freq=print_freq)
    assert guard.stop == "nonfinite" and guard.stop_step == expect_steps
    assert guard.steps_done == (expect_steps if print_freq == 1 else 8)
    if scaled:  # the scaler skipped every step: the weights are still finite
        assert all(torch.isfinite(p).all() for p in model.parameters())


def _children(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _rank(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


def test_a_killed_rank_stops_the_job_quickly_and_is_named(data, tmp_path):
    proc = start("train", "--nproc", 2, "--data_path", data, "--output-dir", tmp_path / "o", *FLAGS,
                 "--epochs", 50)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "[2/6]" in line:
            ranks = {_rank(pid): pid for pid in _children(proc.pid)}
            os.kill(ranks[1], signal.SIGKILL)
            killed_at = time.monotonic()
            break
    else:
        pytest.fail("".join(seen))
    out, err = proc.communicate(timeout=120)  # no hang
    took = time.monotonic() - killed_at
    assert proc.returncode not in (0, None) and took < 60, (took, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("xception: error: rank 1 failed first: it was killed by SIGKILL"), err
    assert "Traceback" not in err, err
