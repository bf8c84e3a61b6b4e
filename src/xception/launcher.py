"""Who started this process, and how to start more: torchrun's variables, or an srun task's SLURM variables
made into torchrun's (one task per device; the rendezvous at the job's first node); `--nproc N` started
through torchrun's own launcher on this node, and the one line that names the process of a job that failed
first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import torch.distributed as td

from .config import EXIT_FAILED_RANK, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USER, UserError


def _tasks_here(spec: str, node: int) -> int:
    """The entry for node `node` of SLURM's tasks-per-node list, e.g. "2(x3),1": 2 tasks on each of the
    first three nodes, 1 on the fourth."""
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[min(node, len(counts) - 1)]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[07-09,12],cpu1" -> "gpu07"): `scontrol show hostnames`
    when scontrol is there, else the list's own first name."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]*)(?:\[([^\],-]*))?", nodelist)
    return match.group(1) + (match.group(2) or "")


def srun_env(env) -> dict:
    """torchrun's variables for a task that srun started (one task per device), or {} outside a job step.
    The batch script of an sbatch job also carries SLURM_NTASKS and SLURM_PROCID, but no step id: it is
    one process. The rendezvous: the job's first node, port 15000 + job id % 20000, unless MASTER_ADDR and
    MASTER_PORT are set."""
    if env.get("SLURM_PROCID") is None or (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")) is None:
        return {}
    try:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
        rank, local = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        local_world = _tasks_here(spec, int(env.get("SLURM_NODEID", "0"))) if spec else world
        job = int(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0")
    except ValueError as e:
        raise UserError(f"cannot read the SLURM task layout from the environment ({e})")
    if world < 2:
        return {}  # one task: a single process, which may start --nproc processes itself
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    return {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(local_world),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
            "MASTER_PORT": env.get("MASTER_PORT") or str(15000 + job % 20000)}


LAUNCHER = {}  # what adopt_launcher() saw: {"name": ..., "line": ...}


def adopt_launcher(env=None) -> str:
    """Which launcher started this process: "torchrun" (its WORLD_SIZE/RANK win, also under `srun
    torchrun`), "srun" (SLURM's task variables become torchrun's), or "single process". LAUNCHER["line"]
    says it in words. Idempotent: once srun's variables are adopted, the process stays an srun task."""
    env = os.environ if env is None else env
    if LAUNCHER.get("name") == "srun" and env is os.environ:
        return "srun"
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    in_job = f" in SLURM job {job}" if job else ""
    if env.get("WORLD_SIZE") is not None:
        name = "torchrun" if env.get("TORCHELASTIC_RUN_ID") else "WORLD_SIZE/RANK from the environment"
        line = f"{name}{in_job}: {env['WORLD_SIZE']} processes"
    elif (tasks := srun_env(env)):
        env.update(tasks)
        step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
        name, line = "srun", (f"srun (SLURM job {job} step {step}): {tasks['WORLD_SIZE']} tasks, "
                              f"{tasks['LOCAL_WORLD_SIZE']} on this node, rendezvous "
                              f"{tasks['MASTER_ADDR']}:{tasks['MASTER_PORT']}")
    else:
        name, line = "single process", "single process" + in_job
    LAUNCHER.update(name=name, line=line)
    return name


def report_failed_ranks(failures: dict, nproc: int) -> int:
    """One line naming the process that failed first, from torchrun's failures {rank: ProcessFailure}.
    torchrun stops the survivors with SIGTERM, and they may then fail too, so those are named last."""
    codes = {rank: f.exitcode for rank, f in failures.items()}
    if len(set(codes.values())) == 1 and next(iter(codes.values())) in (EXIT_NONFINITE, EXIT_PREEMPTED):
        return next(iter(codes.values()))  # every rank stopped the same way and rank 0 has said why

    def how(f) -> str:
        return f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"

    first = min(failures, key=lambda r: (failures[r].exitcode == -signal.SIGTERM, failures[r].timestamp, r))
    others = [f"rank {r} {how(f)}" for r, f in sorted(failures.items()) if r != first]
    print(f"xception: error: rank {first} failed first: it {how(failures[first])} (its output is above)"
          + (f"; then {', '.join(others)}" if others else "") + f"; {len(failures)} of {nproc} processes failed",
          file=sys.stderr)
    return EXIT_FAILED_RANK


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because another process of the job went away (not a bug of this one)."""
    dist_error = getattr(td, "DistError", ())
    text = str(exc)
    return isinstance(exc, dist_error) or (isinstance(exc, RuntimeError) and (
        "gloo" in text or "Connection reset by peer" in text or "Connection closed by peer" in text))


def launch_local(nproc: int, argv: list) -> int:
    """Start `xception ARGV` as `nproc` processes on this node through torchrun's own launcher (the seed's
    --multiprocessing-distributed). Returns the exit code: a user error's 2 when every failed rank says so."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "xception", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        if set(codes.values()) == {EXIT_USER}:
            return EXIT_USER  # a user error, already printed by the ranks
        return report_failed_ranks(e.failures, nproc)
    except SignalException as e:
        # torchrun passed the signal on to every process, which saved a resumable checkpoint (or, past its
        # grace period, was killed, leaving the previous one).
        print(f"xception: stopped by {e.sigval.name}; continue with the same flags and --resume", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
