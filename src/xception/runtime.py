"""Where a run executes: the device, the process group (one process per device; torchrun sets the
environment, or srun's task variables become torchrun's), the local launcher and its report of a failed
rank, the CPUs this process may use, the random streams of a process, and BatchNorm synchronised across
processes."""

from __future__ import annotations

import datetime
import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as td

from .config import EXIT_FAILED_RANK, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USER, UserError

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo", "mps": "gloo"}


def npu_available() -> bool:
    # torch_npu registers the "npu" device when imported; import it only where it is installed.
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401
    return torch.npu.is_available()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks cuda, then npu, then mps, then cpu. Each process uses the device of its local rank."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif npu_available():
            name = "npu"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    kind = name.split(":")[0]
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "npu": npu_available,
        "mps": torch.backends.mps.is_available,
    }
    if kind not in available:
        raise UserError(f"--device {name}: unknown device; use auto, cpu, cuda, npu or mps")
    if not available[kind]():
        raise UserError(f"--device {name}: not available on this machine; use --device auto")
    if kind in ("cuda", "npu") and ":" not in name:
        return torch.device(kind, local_rank)
    return torch.device(name)


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


def rank_zero_log():
    """`print` on the job's rank 0 (torchrun's RANK), silence elsewhere: for lines before the set-up."""
    return print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, which a job scheduler may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_channels_last(device: torch.device) -> bool:
    # Measured on x86 CPUs (docs/performance.md): NHWC is 22-35% faster than NCHW for training here.
    # On CUDA it is the usual choice for autocast on tensor cores, but not measured by us yet
    # (benchmarks/gpu.sh measures both layouts); --no-channels-last overrides.
    return device.type in ("cpu", "cuda")


def accelerator_module(device: torch.device | None):
    """torch.cuda, or torch.npu (registered by torch_npu), for an accelerator device; None otherwise."""
    return torch.get_device_module(device.type) if device is not None and device.type in ("cuda", "npu") else None


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a clock read measures finished work."""
    if (module := accelerator_module(device)) is not None:
        module.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class DistContext:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place across the processes ("sum" or "max"); the tensor itself with one process."""
        if self.distributed:
            td.all_reduce(tensor, op={"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX}[op])
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            td.barrier()


def on_main(ctx: DistContext, decide, *args):
    """decide(*args) on rank 0 only, its answer (or its UserError) broadcast to every rank: for choices
    that read the file system, which need not be shared between nodes."""
    if not ctx.distributed:
        return decide(*args)
    box = [None]
    if ctx.is_main:
        try:
            box = [("ok", decide(*args))]
        except UserError as e:
            box = [("error", (str(e), e.exit_code))]
    td.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(*value)
    return value


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics), e.g. before evaluating without DDP."""
    if ctx.distributed:
        for buffer in module.buffers():
            td.broadcast(buffer, 0)


def configure_kernels(device: torch.device, deterministic: bool = False) -> None:
    """Kernel choice. On CUDA, cuDNN autotunes by default: the input shapes are fixed, so timing the
    candidate convolution algorithms once per shape (the first steps) pays for itself. --deterministic
    trades that for bitwise-reproducible runs: no autotuning, deterministic algorithms wherever torch has
    one (it warns about an op without one, e.g. bincount on CUDA, instead of stopping the run), and the
    CUBLAS_WORKSPACE_CONFIG that cuBLAS needs for it."""
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def setup(device_name: str, backend: str | None = None, timeout_s: float = 1800,
          deterministic: bool = False) -> DistContext:
    """Read torchrun's environment (or srun's, through adopt_launcher); start the process group when
    there is more than one process. Rank 0 names the launcher in one line."""
    launcher = adopt_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if rank == 0:
        print(f"launcher: {LAUNCHER['line']}", flush=True)
    ordinal = local_rank
    if launcher == "srun" and (count := visible_accelerators()) and local_rank >= count:
        ordinal = local_rank % count  # --gpus-per-task: each task sees only its own device(s)
    device = resolve_device(device_name, ordinal)
    if (module := accelerator_module(device)) is not None:
        module.set_device(device)
    configure_kernels(device, deterministic)
    ctx = DistContext(device, rank, world_size, local_rank, local_world_size)
    if ctx.distributed and not td.is_initialized():
        td.init_process_group(backend=backend or BACKENDS[device.type],
                              timeout=datetime.timedelta(seconds=timeout_s))
    return ctx


def cleanup() -> None:
    if td.is_initialized():
        td.destroy_process_group()


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch normalisation over the batches of all processes, with the backward pass in closed form
    (the form torch's own BN kernels use; differentiating the forward ops instead loses ~1e-4 in fp32).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        channels = x.shape[1]
        shape = (1, channels, 1, 1)
        first = torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() / channels)])
        td.all_reduce(first)
        count = first[-1]
        mean = first[:channels] / count
        centred = x - mean.view(shape)
        # Two passes (mean, then squared deviations) keep the variance exact where the mean dominates.
        var = centred.square().sum((0, 2, 3))
        td.all_reduce(var)
        var /= count
        invstd = torch.rsqrt(var + eps)
        xhat = centred.mul_(invstd.view(shape))
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count = count
        ctx.mark_non_differentiable(mean, var, count)
        return xhat * weight.view(shape) + bias.view(shape), mean, var, count

    @staticmethod
    def backward(ctx, grad, *_):
        xhat, weight, invstd = ctx.saved_tensors
        channels = grad.shape[1]
        shape = (1, channels, 1, 1)
        local = torch.cat([grad.sum((0, 2, 3)), (grad * xhat).sum((0, 2, 3))])
        grad_bias, grad_weight = local[:channels].clone(), local[channels:].clone()  # this rank's share
        td.all_reduce(local)  # the global sums carry every rank's loss back to this rank's inputs
        mean_grad, mean_grad_xhat = (local / ctx.count).split(channels)
        grad_x = (grad - mean_grad.view(shape) - xhat * mean_grad_xhat.view(shape)) * (invstd * weight).view(shape)
        return grad_x, grad_weight, grad_bias, None


class GlooSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm over the global batch for devices torch's SyncBatchNorm does not serve (the CPU).
    Outside training, or in one process, it is plain BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and td.is_initialized() and td.get_world_size() > 1 and self.momentum is not None):
            return super().forward(x)
        out, mean, var, count = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1).clamp_min(1), self.momentum)
            self.num_batches_tracked.add_(1)
        return out


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch's SyncBatchNorm on CUDA/NPU; GlooSyncBatchNorm where torch's one does not run."""
    if device.type in ("cuda", "npu"):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            sync = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats, device=child.weight.device,
                                     dtype=child.weight.dtype)
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return model


def visible_accelerators() -> int:
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    if npu_available():
        return torch.npu.device_count()
    return 0


def capture_rng(device: torch.device) -> dict:
    """This process's random streams: torch's CPU generator, Python's, and the accelerator's (dropout on
    CUDA or NPU draws from it)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if (module := accelerator_module(device)) is not None:
        state[device.type] = module.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if (module := accelerator_module(device)) is not None and device.type in state:
        module.set_rng_state(state[device.type], device)


def gather_rng(ctx: DistContext) -> list:
    """Every rank's random streams, in rank order (each rank augments with its own)."""
    mine = capture_rng(ctx.device)
    if not ctx.distributed:
        return [mine]
    out = [None] * ctx.world_size
    td.all_gather_object(out, mine)
    return out


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
