"""The one training epoch and the one evaluation pass: the same code for 1..N processes and any device.

Neither reads a device value on the host except at print steps (and once at the end), so the CPU can
queue work ahead of an accelerator. What else must happen around a step (stopping on a signal or a
non-finite loss, freezing the backbone, averaging weights) is a hook (hooks.py), not a parameter here.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..analysis import multilabel, sigmoid
from ..data import to_device
from ..runtime import DistContext, synchronize
from .precision import Precision

TIMING_WARMUP_ITERS = 5  # first iterations of an epoch left out of img/s (allocator, cudnn autotune, workers)


@dataclass
class Step:
    """One training step on one batch: optional batch mixing (mixup/CutMix), forward under autocast,
    backward (scaled for fp16); every `accum`-th batch also the optimizer step (after `before_update`,
    unscaling and clipping), the LR schedule, and zeroing the gradients.

    Nothing here reads the device on the host: with a fused optimizer (CUDA) the loss scaler hands its
    overflow flag to the optimizer's kernel instead of reading it, the clipping norm stays on the device,
    and the steps the scaler skipped are counted on the device (`overflow_skipped` reads the count, at an
    epoch's end)."""
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    precision: Precision
    accum: int = 1  # batches per optimizer step (--grad-accum-steps)
    clip_grad_norm: float | None = None
    mix: object = None  # (images, targets) -> (images, soft targets), e.g. engine/mix.py
    skipped: torch.Tensor | None = None  # steps the loss scaler skipped, on the device
    pending: int = 0  # batches whose gradients wait for the next optimizer step
    updates: int = 0  # optimizer steps taken (the scaler may have skipped some)
    # Callables run as each optimizer step begins, before unscaling and clipping: what they change in the
    # gradients (e.g. hooks.HeadOnly dropping the frozen backbone's) is what the clip measures and the
    # optimizer applies. They must not read device values on the host either.
    before_update: list = field(default_factory=list)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mix is not None:
            images, targets = self.mix(images, targets)
        last = self.pending + 1 == self.accum
        # Under DDP the gradients are all-reduced only on the batch that ends an accumulation.
        sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            with self.precision.autocast():
                loss = self.criterion(self.model(images), targets)
            part = loss / self.accum if self.accum > 1 else loss  # the mean over the accumulated batches
            scaler = self.precision.scaler
            (scaler.scale(part) if scaler is not None else part).backward()
        self.pending += 1
        if last:
            self._optimizer_step()
        return loss.detach()

    def _optimizer_step(self) -> None:
        for prepare in self.before_update:
            prepare()
        scaler = self.precision.scaler
        if scaler is None:
            self._clip()
            self.optimizer.step()
        else:
            self._scaled_step(scaler)
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.updates += 1
        with warnings.catch_warnings():
            # With fp16 a first overflowing step is skipped, which makes torch warn that the
            # scheduler stepped before the optimizer; that is expected here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            self.scheduler.step()

    def _clip(self) -> None:
        if self.clip_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)

    def _scaled_step(self, scaler: torch.amp.GradScaler) -> None:
        # The dynamic update halves the scale exactly when the step was skipped (inf/NaN gradients): a drop
        # of the scale is the skip count's source. An optimizer post-hook cannot be: a fused optimizer
        # "steps" every time and skips inside its kernel. (_get_scale_async: the scale tensor, not .item().)
        before = scaler._get_scale_async().clone()
        if self.clip_grad_norm is not None:
            scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            self._clip()
        scaler.step(self.optimizer)
        scaler.update()
        if self.skipped is None:
            self.skipped = torch.zeros((), dtype=torch.int64, device=before.device)
        self.skipped += scaler._get_scale_async() < before
        if self.precision.static_scale is not None:  # a static --loss-scale: back to it after each step
            scaler.update(self.precision.static_scale)

    def overflow_skipped(self) -> int:
        """Steps the fp16 loss scaler skipped since the run started (one host read)."""
        return 0 if self.skipped is None else int(self.skipped)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


@dataclass
class EpochPlan:
    steps: int  # iterations in this epoch (the loader's length, or --steps-per-epoch)
    print_freq: int = 10
    channels_last: bool = True
    start_step: int = 0  # a resumed epoch starts here


@dataclass
class EpochStats:
    loss: float
    images_per_sec: float
    seconds: float
    steps_done: int = 0  # of the epoch, counted from its start
    first_step_seconds: float = 0.0  # includes torch.compile's compilation on the first call


class Hook:
    """Something that acts around the steps of an epoch. `after_step` runs after every step and must not
    read device values, except when `check` is set (a print step, or the epoch's last): it returns True to
    stop the epoch."""

    def epoch_start(self, epoch: int) -> None:
        pass

    def after_step(self, step: int, loss: torch.Tensor, check: bool) -> bool:
        return False


def train_one_epoch(step: Step, loader, ctx: DistContext, plan: EpochPlan, hooks=(), progress=None,
                    epoch: int = 0) -> EpochStats:
    """Train over `loader` once (positioned by loader.set_epoch). img/s counts the images of every process
    from iteration TIMING_WARMUP_ITERS on, over wall time between device-synchronised clock reads: data
    loading included, warm-up excluded."""
    step.model.train()
    device, n = ctx.device, plan.steps
    skip = min(plan.start_step + TIMING_WARMUP_ITERS, n - 1)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    timed = done = 0
    first_step = 0.0
    t_epoch = t0 = time.perf_counter()
    batches = iter(loader)  # a loader that cannot skip unread drops the resumed epoch's first batches here
    for hook in hooks:
        hook.epoch_start(epoch)  # after the drop: a resumed epoch's random streams are restored here
    for i, (images, targets) in enumerate(batches, plan.start_step):
        if i >= n:
            break
        loss = step(to_device(images, device, plan.channels_last), targets.to(device, non_blocking=True))
        if i == plan.start_step:
            synchronize(device)
            first_step = time.perf_counter() - t_epoch
        loss_sum += loss
        timed += images.shape[0] if i >= skip else 0
        if i == skip - 1:
            synchronize(device)
            t0 = time.perf_counter()
        done = i + 1
        check = done % plan.print_freq == 0 or done == n
        if check and progress is not None:
            rate = timed * ctx.world_size / max(time.perf_counter() - t0, 1e-9) if timed else 0.0
            progress.update(done, loss=loss.item(), lr=step.lr, img_s=rate)
        if any([hook.after_step(i, loss, check) for hook in hooks]):  # every hook sees every step
            break
    synchronize(device)
    t_end = time.perf_counter()
    # over the processes: one sum (loss, steps, timed images) and one max (the slowest one's time)
    counts = torch.tensor([done - plan.start_step, timed], dtype=torch.float64, device=device)
    loss_total, steps_total, timed_total = ctx.all_reduce(torch.cat([loss_sum.view(1), counts])).tolist()
    elapsed = ctx.all_reduce(torch.tensor([t_end - t0], dtype=torch.float64, device=device), "max").item()
    return EpochStats(loss=loss_total / max(steps_total, 1), images_per_sec=timed_total / max(elapsed, 1e-9),
                      seconds=t_end - t_epoch, steps_done=done, first_step_seconds=first_step)


@dataclass
class TopK:
    """Summed cross-entropy, top-1 and top-5 hits (on the device), and the image count (on the host)."""
    device: torch.device
    sums: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self):
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, top: torch.Tensor) -> None:
        hits = top.eq(targets[:, None])
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        self.sums += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        self.count += targets.shape[0]

    def result(self, ctx: DistContext) -> dict:
        sums = ctx.all_reduce(torch.cat([self.sums, torch.tensor([float(self.count)], dtype=torch.float64,
                                                                      device=self.device)]))
        loss, top1, top5, count = sums.tolist()
        count = max(count, 1)
        return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}


@dataclass
class ClassRecall:
    """Balanced accuracy: the mean over the classes present of each class's top-1 recall (as scikit-learn's
    balanced_accuracy_score). Per class, the images and the top-1 hits among them are tallied on the device
    (index_add_: no host read); sized by the logits of the first batch, and across processes by the largest
    size (a process without a batch has none), then summed once."""
    device: torch.device
    tally: torch.Tensor | None = None  # 2 x classes: images, hits

    def update(self, logits: torch.Tensor, targets: torch.Tensor, top: torch.Tensor) -> None:
        if self.tally is None:
            self.tally = torch.zeros(2, logits.shape[1], dtype=torch.float64, device=self.device)
        hits = top[:, 0].eq(targets).double()
        self.tally[0].index_add_(0, targets, torch.ones_like(hits))
        self.tally[1].index_add_(0, targets, hits)

    def result(self, ctx: DistContext) -> dict:
        tally = self.tally
        if ctx.distributed:
            size = 0 if tally is None else tally.shape[1]
            size = int(ctx.all_reduce(torch.tensor([size], dtype=torch.float64, device=self.device), "max").item())
            tally = torch.zeros(2, size, dtype=torch.float64, device=self.device) if tally is None else tally
            tally = ctx.all_reduce(tally)
        if tally is None:
            return {"balanced_acc": 0.0}
        present = tally[0] > 0
        recall = tally[1][present] / tally[0][present]
        return {"balanced_acc": 100 * recall.mean().item() if recall.numel() else 0.0}


@dataclass
class PerImage:
    """Every image's logits and target, gathered over the processes in the split's order (see
    _gather_rows), for a report or a calibration: {"logits": N x C, "targets": N (or N x C multi-hot)}."""
    device: torch.device
    rows: list = field(default_factory=list)  # per batch: logits | targets, float32
    multi_hot = False  # targets: one class index per image (a column), or multi-hot rows (C columns)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, top: torch.Tensor) -> None:
        self.rows.append(torch.cat([logits, targets.reshape(len(targets), -1).float()], dim=1))

    def result(self, ctx: DistContext) -> dict:
        table = _gather_rows(self.rows, ctx, self.device).numpy()
        width = table.shape[1] // 2 if self.multi_hot else table.shape[1] - 1
        targets = table[:, width:]
        return {"logits": table[:, :width],
                "targets": targets.astype(np.int8) if self.multi_hot else targets[:, 0].astype(np.int64)}


@dataclass
class MultiLabel(PerImage):
    """A multi-label evaluation: the summed binary cross-entropy (mean over classes per image), and from
    every image's sigmoid probabilities and multi-hot targets, gathered over the processes, mAP (scikit-
    learn's average_precision_score, the mean over the classes that have a positive), micro F1 and macro F1
    (over the same classes) of the labels whose probability exceeds `threshold`; all in percent. AP is no
    sum over shares, so the rows are gathered (_gather_rows). `keep`: also return the logits and targets."""
    threshold: float = 0.5
    keep: bool = False
    loss: float | torch.Tensor = 0.0
    multi_hot = True

    def update(self, logits: torch.Tensor, targets: torch.Tensor, top: torch.Tensor) -> None:
        targets = targets.float()
        bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        self.loss = self.loss + bce.mean(dim=1).sum().double()
        super().update(logits, targets, top)

    def result(self, ctx: DistContext) -> dict:
        gathered = super().result(ctx)
        loss = ctx.all_reduce(torch.as_tensor(self.loss, dtype=torch.float64, device=self.device).reshape(1))
        count = len(gathered["targets"])
        _, scores = multilabel(sigmoid(gathered["logits"]), gathered["targets"], self.threshold)
        out = {"loss": loss.item() / max(count, 1), "count": count,
               **{k: 100 * scores[k] for k in ("map", "f1_micro", "f1_macro")}}
        return out | gathered if self.keep else out


def _gather_rows(rows: list, ctx: DistContext, device: torch.device) -> torch.Tensor:
    """Every process's rows (N_r x K), on the CPU, in the split's order: rank r's k-th row goes to row r + kW,
    which undoes EvalSampler's interleaving. A pipeline that shards otherwise (its counts are not that
    interleaving's) gets the ranks' rows one after the other, in rank order."""
    mine = torch.cat(rows).float() if rows else None
    if not ctx.distributed:
        return mine.cpu() if mine is not None else torch.zeros(0, 0)
    sizes = torch.zeros(2, ctx.world_size, dtype=torch.float64, device=device)  # rows, width per rank
    if mine is not None:
        sizes[:, ctx.rank] = torch.tensor(mine.shape, dtype=torch.float64)
    counts, widths = ctx.all_reduce(sizes).long().tolist()
    total, w = sum(counts), ctx.world_size
    table = torch.zeros(total, max(widths), dtype=torch.float32, device=device)
    if mine is not None:
        if all(n == len(range(r, total, w)) for r, n in enumerate(counts)):
            table[ctx.rank::w] = mine
        else:
            start = sum(counts[:ctx.rank])
            table[start:start + len(mine)] = mine
    return ctx.all_reduce(table).cpu()


def val_metrics(ctx: DistContext, multi_label: bool = False, threshold: float = 0.5, keep: bool = False) -> list:
    """The evaluation's metrics: single-label loss, top-1/top-5 and balanced accuracy; multi-label loss,
    mAP and F1 (`keep`: with each image's logits and targets, for a report or a calibration)."""
    if multi_label:
        return [MultiLabel(ctx.device, threshold=threshold, keep=keep)]
    return [TopK(ctx.device), ClassRecall(ctx.device)] + ([PerImage(ctx.device)] if keep else [])


@torch.no_grad()
def evaluate(model, loader, ctx: DistContext, precision: Precision, channels_last: bool, metrics=None,
             progress=None) -> dict:
    """The `metrics` (default: val_metrics' single-label ones; e.g. Confusion added) over the whole split,
    and the image count. Each process evaluates its own share, then the results are combined across the
    processes once, so every sample counts exactly once and no rank waits alone. `model` may be an
    OnnxModel too."""
    model.eval()
    metrics = val_metrics(ctx) if metrics is None else metrics
    for i, (images, targets) in enumerate(loader):
        images = to_device(images, ctx.device, channels_last)
        targets = targets.to(ctx.device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
        logits = logits.float().to(ctx.device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        for metric in metrics:
            metric.update(logits, targets, top)
        if progress is not None:
            progress.update(i + 1)
    out = {}
    for metric in metrics:
        out.update(metric.result(ctx))
    return out
