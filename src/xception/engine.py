"""One training epoch and one evaluation pass: the same code for 1..N processes and any device."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import Config
from .data import to_device
from .distributed import DistContext, synchronize

TIMING_WARMUP_ITERS = 5  # first iterations of an epoch left out of img/s (allocator, cudnn autotune, workers)


@dataclass
class Precision:
    """Autocast dtype (None: fp32) and the fp16 loss scaler (None: no scaling)."""
    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    static_scale: float | None = None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]


def cpu_has_native_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_precision(cfg: Config, device: torch.device, warn=print) -> Precision:
    """--amp: fp16 with a loss scaler on accelerators (static for a numeric --loss-scale), or bf16 without
    one (--amp-dtype bfloat16). A CPU without native bf16 runs fp32: emulated bf16 is ~200x slower."""
    if not cfg.amp:
        return Precision(device.type)
    dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
    if device.type == "cpu":
        if not cpu_has_native_bf16():
            warn("warning: --amp ignored: this CPU has no native bfloat16 (it would run ~200x slower); "
                 "training in fp32")
            return Precision("cpu")
        return Precision("cpu", torch.bfloat16)  # fp16 autocast on CPU has no speed benefit
    if dtype == torch.bfloat16:
        return Precision(device.type, dtype)
    if cfg.loss_scale in (None, "dynamic"):
        return Precision(device.type, dtype, torch.amp.GradScaler(device.type))
    scale = float(cfg.loss_scale)
    # A static scale: the scaler still skips steps whose gradients overflow, but never changes the scale.
    return Precision(device.type, dtype, torch.amp.GradScaler(device.type, init_scale=scale), scale)


@dataclass
class EpochStats:
    loss: float
    images_per_sec: float
    seconds: float
    images: int
    first_step_seconds: float = 0.0  # includes torch.compile's compilation on the first call


def _step(model, images, targets, criterion, optimizer, precision: Precision) -> torch.Tensor:
    with precision.autocast():
        loss = criterion(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    if precision.scaler is None:
        loss.backward()
        optimizer.step()
    else:
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update(precision.static_scale)
    return loss.detach()


def train_one_epoch(model: nn.Module, loader, criterion, optimizer, scheduler, precision: Precision,
                    ctx: DistContext, cfg: Config, progress, channels_last: bool, start_step: int = 0,
                    guard=None) -> EpochStats:
    """Train over `loader` once, stepping the LR schedule every iteration. A resumed epoch starts at
    `start_step`; `guard` (preempt.StepGuard) may stop the epoch after any step (signal, non-finite loss).

    img/s counts the images of every process from iteration TIMING_WARMUP_ITERS on, over wall time
    between device-synchronised clock reads: data loading included, warm-up excluded.
    """
    model.train()
    device = ctx.device
    n = len(loader) if cfg.steps_per_epoch is None else min(len(loader), cfg.steps_per_epoch)
    skip = min(start_step + TIMING_WARMUP_ITERS, n - 1)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = timed = steps = 0
    first_step = 0.0
    t_epoch = t0 = time.perf_counter()
    batches = loader if guard is None else guard.batches(loader, start_step)
    for i, (images, targets) in enumerate(batches, start_step):
        if i >= n:
            break
        images = to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        loss = _step(model, images, targets, criterion, optimizer, precision)
        if i == start_step:
            synchronize(device)
            first_step = time.perf_counter() - t_epoch
        with warnings.catch_warnings():
            # With fp16 a first overflowing step is skipped, which makes torch warn that the
            # scheduler stepped before the optimizer; that is expected here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            scheduler.step()
        loss_sum += loss
        seen += images.shape[0]
        if i >= skip:
            timed += images.shape[0]
        if i == skip - 1:
            synchronize(device)
            t0 = time.perf_counter()
        if (i + 1) % cfg.print_freq == 0 or i + 1 == n:
            rate = timed * ctx.world_size / max(time.perf_counter() - t0, 1e-9) if timed else 0.0
            progress.update(i + 1, loss=loss.item(), lr=optimizer.param_groups[0]["lr"], img_s=rate)
        steps += 1
        if guard is not None and guard.after_step(i, loss):
            break
    synchronize(device)
    t_end = time.perf_counter()
    totals = ctx.all_reduce_sum(torch.tensor([loss_sum.item(), seen, timed], dtype=torch.float64,
                                             device=device))
    elapsed = torch.tensor([t_end - t0], dtype=torch.float64, device=device)
    if ctx.distributed:
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    loss_total, seen_total, timed_total = totals.tolist()
    return EpochStats(loss=loss_total / max(steps * ctx.world_size, 1),
                      images_per_sec=timed_total / max(elapsed.item(), 1e-9),
                      seconds=t_end - t_epoch, images=int(seen_total), first_step_seconds=first_step)


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: Precision, ctx: DistContext,
             channels_last: bool, progress=None) -> dict:
    """Loss, top-1 and top-5 over the whole split: each process sums over its own shard, then the sums
    are added across processes once, so every sample counts exactly once and no rank waits alone."""
    model.eval()
    device = ctx.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for i, (images, targets) in enumerate(loader):
        images = to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        sums += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             torch.tensor(float(targets.numel()), dtype=torch.float64, device=device)])
        if progress is not None:
            progress.update(i + 1)
    loss, top1, top5, count = ctx.all_reduce_sum(sums).tolist()
    count = max(count, 1)
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}
