"""Where a run executes: the device, the process group (one process per device, from the environment that
launcher.py reads), the CPUs this process may use, the random streams of a process, and BatchNorm
synchronised across processes."""

from __future__ import annotations

import datetime
import importlib.util
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as td

from .config import UserError
from .launcher import LAUNCHER, adopt_launcher

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
