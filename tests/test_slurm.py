"""SLURM: the task variables of `srun` become the process group's, the batch step stays one process, and
examples/slurm/train.sbatch checkpoints on its warning signal, requeues itself and finishes bitwise equal
to an uninterrupted run. The last two run against a real one-node SLURM (tests/slurm_cluster.py), started
once for this module; they are skipped where slurmctld, slurmd or munged are missing."""

import os
import signal
import sys
import time

import pytest
import torch

from conftest import ROOT, make_image_folder, run_cli
from slurm_cluster import Cluster, Unavailable
from xception.engine.hooks import stop_signals
from xception.launcher import adopt_launcher, srun_env

# 48 train images, global batch 4: 12 steps in the one epoch (the signal tests stop it after the second, with
# ten steps to spare on a fast machine); one thread, no loader workers: bitwise repeatable.
FLAGS = ["--image-size", "71", "--seed", "5", "--print-freq", "1", "--device", "cpu", "--lr", "0.05"]
SHAPE = {"epochs": "1", "batch": "4", "workers": "0"}
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SCRIPT = os.path.join(ROOT, "examples", "slurm", "train.sbatch")
STEP = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


def script_flags(data, out) -> list:
    """The flags examples/slurm/train.sbatch gives `xception train`, for the reference run."""
    return ["--data_path", data, "--output-dir", out, "--epochs", SHAPE["epochs"], "--batch-size", SHAPE["batch"],
            "--workers", SHAPE["workers"], "--resume", "auto", *FLAGS]


def model_of(folder):
    return torch.load(os.path.join(folder, "checkpoint.pth.tar"), map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    a, b = model_of(a), model_of(b)
    assert a["epoch"] == b["epoch"] == int(SHAPE["epochs"])
    unequal = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[0]}"


# The environment rules, without a cluster.

def test_an_srun_task_becomes_a_rank_with_the_jobs_first_node_as_rendezvous():
    env = dict(STEP)
    assert srun_env(env) == {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                             "MASTER_ADDR": "gpu07", "MASTER_PORT": str(15000 + 4242)}
    assert adopt_launcher(env) == "srun" and env["RANK"] == "3"
    mixed = dict(STEP, SLURM_STEP_TASKS_PER_NODE="3,1(x2)", SLURM_NODEID="2", MASTER_ADDR="10.0.0.9",
                 MASTER_PORT="29500")
    assert srun_env(mixed)["LOCAL_WORLD_SIZE"] == "1"
    assert (srun_env(mixed)["MASTER_ADDR"], srun_env(mixed)["MASTER_PORT"]) == ("10.0.0.9", "29500")


def test_the_batch_step_one_task_and_torchrun_are_not_taken_for_srun_tasks():
    batch = {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}  # what the batch script sees
    assert srun_env(batch) == {} and adopt_launcher(dict(batch)) == "single process"
    assert srun_env(dict(STEP, SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1")) == {}
    torchrun = dict(STEP, WORLD_SIZE="8", RANK="5", TORCHELASTIC_RUN_ID="x")  # `srun torchrun`: torchrun wins
    assert adopt_launcher(torchrun) == "torchrun" and torchrun["RANK"] == "5"


def test_a_garbled_slurm_layout_is_one_line_user_error():
    from xception.config import UserError
    with pytest.raises(UserError, match="SLURM task layout"):
        srun_env(dict(STEP, SLURM_PROCID="three"))


def test_usr1_stops_a_run_only_inside_a_slurm_job(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOBID", raising=False)
    assert signal.SIGUSR1 not in stop_signals()
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert signal.SIGUSR1 in stop_signals() and signal.SIGTERM in stop_signals()


# Against a real SLURM.

@pytest.fixture(scope="module")
def cluster():
    try:
        c = Cluster().start()
    except Unavailable as e:
        pytest.skip(f"no SLURM cluster here: {e}")
    print(f"slurm cluster up in {c.started_in:.1f} s ({c.root})")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("slurm") / "data", n_train=16, n_val=2)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The same training as two processes started the usual way (`xception train --nproc 2`)."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_cli("train", "--nproc", 2, *script_flags(data, out), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launcher: torchrun: 2 processes" in proc.stdout
    return str(out)


def test_srun_two_tasks_train_like_two_local_processes(cluster, data, reference, tmp_path):
    out = tmp_path / "srun"
    proc = cluster.run("srun", "-n", "2", sys.executable, "-m", "xception", "train",
                       *map(str, script_flags(data, out)), env=dict(cluster.env, **ENV), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("launcher: srun (SLURM job ") == 1, proc.stdout[:2000]  # rank 0 only
    assert "2 tasks, 2 on this node, rendezvous" in proc.stdout
    assert "training on 2 x cpu" in proc.stdout
    assert_same_weights(reference, out)


def test_the_seeds_8p_script_runs_under_srun_with_one_task_per_device(cluster, data, tmp_path):
    """`srun` starts the processes; the script's own --nproc=8 is then not used."""
    script = os.path.join(ROOT, "test", "train_full_8p.sh")
    proc = cluster.run("srun", "-n", "2", "bash", script, f"--data_path={data}", "--epochs=1", "--batch-size=4",
                       "--image-size=71", "--workers=0", "--print-freq=6", cwd=tmp_path, timeout=400,
                       env=dict(cluster.env, PYTHON=sys.executable, **ENV))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("launcher: srun (SLURM job ") == 1 and proc.stdout.count("Final Train Accuracy") == 1
    assert (tmp_path / "Xception_bs4_2p_acc.log").exists()


def submit(cluster, data, out, log) -> str:
    exports = {"DATA": data, "OUT": out, "EPOCHS": SHAPE["epochs"], "BATCH": SHAPE["batch"],
               "WORKERS": SHAPE["workers"], "FLAGS": " ".join(FLAGS), "XCEPTION": f"{sys.executable} -m xception"}
    export = "ALL," + ",".join(f"{k}={v}" for k, v in exports.items())
    proc = cluster.run("sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                       "--time=20", f"--output={log}", f"--export={export}", SCRIPT, env=dict(cluster.env, **ENV))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_for_line(path, text: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout:.0f} s: ...{open(path).read()[-2000:]}")


def test_the_sbatch_example_checkpoints_on_usr1_requeues_and_finishes_bitwise(cluster, data, reference, tmp_path):
    out, log = str(tmp_path / "job"), str(tmp_path / "job.log")
    job = submit(cluster, data, out, log)
    wait_for_line(log, "epoch 1/1 [2/12]")  # mid-epoch: the steps of a tiny image are ~1 s here
    signalled = cluster.run("scancel", "--batch", "--signal=USR1", job)
    assert signalled.returncode == 0, signalled.stderr
    info = cluster.wait_job(job)
    print(f"job {job}: {info['pending_s']} s pending after the requeue")
    text = open(log, errors="replace").read()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-3000:])
    assert info["Restarts"] == "1", text[-3000:]
    assert "slurm: USR1 received" in text and "SIGUSR1 received: finishing the current step" in text
    assert "stopped by SIGUSR1 at epoch 1 step " in text
    assert f"slurm: checkpoint saved in {out}; requeueing job {job}" in text
    assert "slurm: job " + job + " start 1 on" in text and f"resumed from {out}" in text
    assert text.count("launcher: srun (SLURM job ") == 2  # one per start, rank 0 only
    assert "Traceback" not in text
    assert_same_weights(reference, out)


def test_the_sbatch_example_under_plain_scancel_leaves_a_resumable_checkpoint(cluster, data, tmp_path):
    """scancel (SIGTERM to every step, no requeue) or a time limit: the tasks save at the current step and
    the last line says how to continue."""
    out, log = str(tmp_path / "job"), str(tmp_path / "job.log")
    job = submit(cluster, data, out, log)
    wait_for_line(log, "epoch 1/1 [2/12]")
    assert cluster.run("scancel", job).returncode == 0
    info = cluster.wait_job(job)
    assert info["JobState"] == "CANCELLED", info
    wait_for_line(log, "stopped by SIGTERM", timeout=30)
    saved = model_of(out)
    assert saved["epoch"] == 0 and 2 <= saved["epoch_step"] <= 12
    text = open(log, errors="replace").read()
    assert f"--resume {out}/checkpoint.pth.tar" in text and "Traceback" not in text, text[-3000:]
