"""A throw-away one-node SLURM cluster for the tests: munged with its own key and socket, slurmctld and
slurmd on free ports, every file in one temporary folder. Clients reach it through `env` (SLURM_CONF).
The node declares two GPUs that are only names (no device files), so that a job script asking for
--gpus-per-task is accepted; the tasks then find no CUDA device and train on the CPU."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "srun", "sbatch", "scontrol", "scancel")


class Unavailable(Exception):
    """The cluster cannot run here (a binary missing, a daemon that did not come up): the reason."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                      None)


def _slurm_conf(root: str, node: str, cpus: int) -> str:
    ctld, slurmd = free_port(), free_port()
    lines = [
        "ClusterName=xtest", f"SlurmctldHost={node}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={ctld}", f"SlurmdPort={slurmd}", "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/sock",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none", "JobRequeue=1", "MailProg=/bin/true", "ReturnToService=2",
        "KillWait=10", "MinJobAge=600", "InactiveLimit=0", "GresTypes=gpu", "SlurmctldDebug=info",
        "SlurmdDebug=info", "MpiDefault=none",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{cpus} State=UNKNOWN",
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    with open(os.path.join(root, "gres.conf"), "w") as f:
        files = ",".join(["/dev/null", "/dev/zero", "/dev/full", "/dev/random"][:cpus])  # stand-ins for GPUs
        f.write(f"AutoDetect=off\nNodeName={node} Name=gpu File={files}\n")
    path = os.path.join(root, "slurm.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _tail(path: str, n: int = 6) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-n:])
    except OSError:
        return "(no log)"


class Cluster:
    def __init__(self, root: str | None = None):
        self.root = root or tempfile.mkdtemp(prefix="xslurm-", dir="/tmp")  # short: socket paths are limited
        self.node = socket.gethostname().split(".")[0]
        self.procs = {}
        self.env = dict(os.environ)
        self.started_in = None

    def _daemon(self, name: str, *args: str) -> None:
        log = open(os.path.join(self.root, f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen([_find(name), *args], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()

    def start(self, timeout: float = 30) -> "Cluster":
        missing = [b for b in BINARIES if _find(b) is None]
        if missing:
            raise Unavailable(f"SLURM/munge binaries missing: {', '.join(missing)}")
        t0 = time.monotonic()
        for sub in ("munge", "state", "spool"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        munge = os.path.join(self.root, "munge")
        subprocess.run([_find("mungekey"), "-c", "-f", "-k", f"{munge}/key"], check=True, capture_output=True)
        self.env["SLURM_CONF"] = _slurm_conf(self.root, self.node, os.cpu_count() or 1)
        self._daemon("munged", "-F", "-f", f"--socket={munge}/sock", f"--key-file={munge}/key",
                     f"--pid-file={munge}/pid", f"--log-file={munge}/log", f"--seed-file={munge}/seed")
        self._wait(lambda: os.path.exists(f"{munge}/sock"), timeout, "munged", f"{munge}/log")
        self._daemon("slurmctld", "-D", "-c", "-i")
        self._daemon("slurmd", "-D", "-N", self.node)
        self._wait(self._node_idle, timeout, "slurmctld/slurmd", os.path.join(self.root, "slurmd.log"))
        self.started_in = time.monotonic() - t0
        return self

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%T").stdout.split()
        return bool(out) and all(state == "idle" for state in out)

    def _wait(self, ready, timeout: float, what: str, log: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                break
            time.sleep(0.1)
        self.stop(keep=True)  # the logs stay for a look
        raise Unavailable(f"{what} did not come up in {timeout:.0f} s: {_tail(log)} "
                          f"[slurmctld: {_tail(os.path.join(self.root, 'slurmctld.log'), 3)}; logs in {self.root}]")

    def run(self, *cmd: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """A client command against this cluster."""
        return subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, **kw)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as KEY -> value (the first word of each value)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def stop(self, keep: bool = False) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def wait_job(self, job_id: str, timeout: float = 600) -> dict:
        """Poll until the job has ended. A requeued job waits PENDING (BeginTime, ~2 minutes) unless its
        start time is moved to now, which works only once it is PENDING; and not in the second of the
        requeue either: slurmd refuses a job credential issued then ("Job credential revoked"). So the
        start is moved 2 s after the job is first seen waiting, and again while it waits."""
        end, waiting, pending = time.monotonic() + timeout, None, 0.0
        while time.monotonic() < end:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                info["pending_s"] = f"{pending:.1f}"  # the time spent waiting to (re)start
                return info
            if state == "PENDING" and info.get("Reason") == "BeginTime":
                waiting = waiting or time.monotonic()
                if time.monotonic() - waiting > 2:
                    self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
            else:
                waiting = None
            pending += 0.3 if state == "PENDING" else 0
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")
