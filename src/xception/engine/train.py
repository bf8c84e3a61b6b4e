"""`xception train`: a whole training run, epoch by epoch, with an evaluation, a metrics row and a
checkpoint after each; resumable at an epoch's end or, after a signal, at the step it stopped."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from ..checkpoint import Checkpoint, unwrap
from ..config import BEST_NAME, CHECKPOINT_NAME, Config, UserError
from ..files import WriteError, copy_atomic
from ..model.weights import build_model, from_checkpoint, load_into, read_weights
from ..report import FAULT_COLUMNS
from ..runtime import broadcast_buffers, gather_rng, on_main
from .hooks import Diverged, HeadOnly, Preempted, StepGuard, resume_position
from .loop import EpochPlan, Step, evaluate, train_one_epoch
from .setup import Run

WARMUP_START_FACTOR = 0.01  # linear warm-up starts at 1% of --lr


def build_scheduler(optimizer, cfg: Config, iters_per_epoch: int):
    """Linear warm-up then cosine to zero, stepped every iteration."""
    total = cfg.epochs * iters_per_epoch
    warmup = min(round(cfg.warmup_epochs * iters_per_epoch), total - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
    if warmup <= 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum. On CUDA the fused kernel: one launch for all parameters, and with fp16 the loss
    scaler passes its overflow flag into the kernel instead of reading it on the host every step."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           fused=True if device.type == "cuda" else None)


@dataclass
class Training:
    """The state of a training run between its steps."""
    run: Run
    net: nn.Module  # the plain network (sync-BN converted): what checkpoints hold and evaluation runs
    step: Step  # calls the placed model (DDP and/or compiled)
    guard: StepGuard
    hooks: list
    iters: int  # steps per epoch
    ckpt_path: str
    start_epoch: int = 0
    start_step: int = 0  # of the first epoch, after a mid-epoch resume
    best_top1: float = -math.inf
    saved_path: str | None = None  # the last good checkpoint on disk: the resumed one, then ckpt_path
    saved_epoch: int = 0  # its epoch
    fps: list = field(default_factory=lambda: [0.0, 0.0])  # images and seconds over the epochs


def train(cfg: Config) -> dict:
    """Train for cfg.epochs (resuming if asked), evaluating and checkpointing after every epoch."""
    t_start = time.perf_counter()
    run = Run(cfg, need_train=True, kind="acc")
    t = None
    try:
        t = _setup(run)
        t.guard.install()
        last = None
        for epoch in range(t.start_epoch, _end_epoch(t)):
            last = _epoch(t, epoch)
        return _finish(t, last, time.perf_counter() - t_start)
    except WriteError as e:
        raise _write_failed(e, t) from None
    finally:
        if t is not None:
            t.guard.uninstall()
        run.close()


def _setup(run: Run) -> Training:
    cfg, ctx, log = run.cfg, run.ctx, run.log
    ckpt_path = os.path.join(cfg.output_dir, CHECKPOINT_NAME)
    resume = on_main(ctx, _resume_source, cfg, ckpt_path)  # rank 0 decides: the folder may not be shared
    run.cfg = cfg = cfg.replace(resume=resume)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    # Files named on the command line are read on rank 0 and sent to the others: nodes need not share them.
    pretrained = on_main(ctx, read_weights, cfg.pretrained, "--pretrained") if cfg.pretrained else None
    net = build_model(pretrained, len(run.classes), cfg.drop_rate, log=log)
    ckpt = on_main(ctx, Checkpoint.load, cfg.resume) if cfg.resume else None
    if ckpt is not None:
        run.check_classes(ckpt.class_names, cfg.resume)
        load_into(net, from_checkpoint(ckpt, cfg.resume), allow_new_head=False, log=log)
    model = run.place(net)
    net = unwrap(model)
    optimizer = build_optimizer(model, cfg, ctx.device)
    iters = min(len(run.train_loader), cfg.steps_per_epoch or len(run.train_loader))
    step = Step(model, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), optimizer,
                build_scheduler(optimizer, cfg, iters), run.precision)
    guard = StepGuard(ctx, run.precision.scaler is not None, cfg.max_nonfinite_steps, log)
    t = Training(run, net, step, guard, [guard, HeadOnly(model, optimizer, cfg.freeze_epochs, log)], iters, ckpt_path)
    if ckpt is not None:
        _resume(t, ckpt)
    log(f"training on {ctx.world_size} x {ctx.device.type} ({run.precision.name}, "
        f"{'channels_last' if run.channels_last else 'NCHW'}{', compiled' if cfg.compile else ''}), "
        f"{run.train_loader.num_samples} train / {run.val_loader.num_samples} val images, {len(run.classes)} "
        f"classes, global batch {cfg.batch_size}, {iters} iterations per epoch")
    return t


def _resume_source(cfg: Config, ckpt_path: str):
    """The checkpoint to resume (`--resume auto`: the output folder's, if any), after refusing to overwrite
    a checkpoint of another run."""
    resume = cfg.resume
    if resume == "auto":  # for restarts (torchrun --max-restarts, requeued jobs): resume if there is one
        resume = ckpt_path if os.path.isfile(ckpt_path) else None
    if os.path.exists(ckpt_path) and not (resume and os.path.exists(resume) and os.path.samefile(resume, ckpt_path)):
        raise UserError(f"--output-dir {cfg.output_dir}: already holds {CHECKPOINT_NAME}; continue it "
                        f"with --resume {ckpt_path}, or choose another --output-dir")
    return resume


def _resume(t: Training, ckpt: Checkpoint) -> None:
    cfg, log = t.run.cfg, t.run.log
    if not ckpt.resumable:
        raise UserError(f"--resume {cfg.resume}: holds no resumable training state; use --pretrained to start "
                        f"a new run from its weights")
    try:
        t.step.optimizer.load_state_dict(ckpt.optimizer)
        t.step.scheduler.load_state_dict(ckpt.scheduler)
        if t.run.precision.scaler is not None and ckpt.scaler:
            t.run.precision.scaler.load_state_dict(ckpt.scaler)
    except (KeyError, ValueError) as e:
        raise UserError(f"--resume {cfg.resume}: holds no resumable training state ({e}); "
                        f"use --pretrained to start a new run from its weights")
    t.start_epoch, t.best_top1 = ckpt.epoch, ckpt.best_acc1
    t.saved_path, t.saved_epoch = cfg.resume, ckpt.epoch
    t.start_step = resume_position(ckpt, t.guard, t.run.ctx, log)
    log(f"resumed from {cfg.resume}: epoch {t.start_epoch} done"
        + (f" and {t.start_step} steps of epoch {t.start_epoch + 1}" if t.start_step else "")
        + f", best top-1 {t.best_top1:.3f}")
    if t.start_epoch >= cfg.epochs:
        raise UserError(f"--resume {cfg.resume}: already trained {t.start_epoch} epochs; "
                        f"raise --epochs above {t.start_epoch} to train further")


def _end_epoch(t: Training) -> int:
    cfg = t.run.cfg
    end = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
    if t.start_epoch >= end:
        raise UserError(f"--stop-after-epochs {cfg.stop_after_epochs}: the checkpoint has already "
                        f"trained {t.start_epoch} epochs; raise it or leave it out")
    return end


def _checkpoint(t: Training, epoch: int, **extra) -> Checkpoint:
    run = t.run
    return Checkpoint(model=t.net.state_dict(), epoch=epoch, optimizer=t.step.optimizer.state_dict(),
                      scheduler=t.step.scheduler.state_dict(),
                      scaler=run.precision.scaler.state_dict() if run.precision.scaler else None,
                      best_acc1=t.best_top1, args=run.cfg.to_dict(), class_names=list(run.classes),
                      keras_exact=bool(getattr(t.net, "keras_exact", False)), **extra)


def _fault_counts(t: Training) -> tuple:
    """(images the loaders of this process skipped so far, steps the loss scaler skipped so far)."""
    return t.run.train_loader.skipped() + t.run.val_loader.skipped(), t.step.overflow_skipped()


def _epoch(t: Training, epoch: int) -> dict:
    """Train one epoch, evaluate, report and checkpoint; returns the metrics row."""
    run, cfg, ctx = t.run, t.run.cfg, t.run.ctx
    run.seed_epoch(epoch)
    run.train_loader.set_epoch(epoch, t.start_step)
    progress = run.report.progress(t.iters, f"epoch {epoch + 1}/{cfg.epochs}", epoch * t.iters)
    before = _fault_counts(t)
    plan = EpochPlan(t.iters, cfg.print_freq, run.channels_last, t.start_step)
    stats = train_one_epoch(t.step, run.train_loader, ctx, plan, t.hooks, progress, epoch)
    progress.close()
    if cfg.compile and epoch == t.start_epoch:
        run.log(f"torch.compile: the first step took {stats.first_step_seconds:.1f} s (compilation, not "
                f"counted in img/s)")
    t.start_step = 0
    if t.guard.stop == "nonfinite":  # the weights may be damaged: keep the last checkpoint as it is
        raise Diverged(t.guard.diverged_message(epoch, t.saved_path, t.saved_epoch))
    if t.guard.stop == "signal":
        _save_and_stop(t, epoch, stats.steps_done)
    broadcast_buffers(t.net, ctx)  # every rank evaluates rank 0's BatchNorm statistics, without DDP
    val = evaluate(t.step.model if not ctx.distributed else t.net, run.val_loader, ctx, run.precision,
                   run.channels_last)
    t.fps[0] += stats.images_per_sec * stats.seconds
    t.fps[1] += stats.seconds
    images, overflow = _fault_counts(t)
    during = int(ctx.all_reduce(torch.tensor([float(images - before[0])], dtype=torch.float64,
                                                 device=ctx.device)).item())
    row = {"epoch": epoch + 1, "train_loss": stats.loss, "val_loss": val["loss"], "top1": val["top1"],
           "top5": val["top5"], "lr": t.step.lr, "images_per_sec": stats.images_per_sec,
           "epoch_seconds": stats.seconds, "bad_images_skipped": run.bad_skipped + during,
           "overflow_steps_skipped": overflow - before[1]}
    is_best = val["top1"] > t.best_top1
    t.best_top1 = max(t.best_top1, val["top1"])
    shown = [c for c, on in zip(FAULT_COLUMNS, (cfg.skip_bad_images, run.precision.scaler is not None)) if on]
    run.report.epoch(row, tuple(shown))
    if ctx.is_main:
        _checkpoint(t, epoch + 1).save(t.ckpt_path)
        t.saved_path, t.saved_epoch = t.ckpt_path, epoch + 1
        if is_best:
            copy_atomic(t.ckpt_path, os.path.join(cfg.output_dir, BEST_NAME))
    ctx.barrier()
    return row


def _save_and_stop(t: Training, epoch: int, steps_done: int) -> None:
    rng = gather_rng(t.run.ctx)
    if t.run.ctx.is_main:
        _checkpoint(t, epoch, epoch_step=steps_done, rng=rng).save(t.ckpt_path)
    t.run.ctx.barrier()
    raise Preempted(f"stopped by {t.guard.signal_name} at epoch {epoch + 1} step {steps_done}/{t.iters}; saved "
                    f"{t.ckpt_path}; continue from that step with the same flags and --resume {t.ckpt_path}")


def _finish(t: Training, last: dict, e2e: float) -> dict:
    run = t.run
    fps = t.fps[0] / t.fps[1] if t.fps[1] else 0.0
    result = {"fps": fps, "top1": last["top1"], "top5": last["top5"], "loss": last["train_loss"],
              "e2e_seconds": e2e, "checkpoint": t.ckpt_path, "metrics": run.report.metrics_path}
    run.report.finish(result, run.ctx.device.type, run.ctx.world_size)
    return result


def _write_failed(e: WriteError, t: Training | None) -> WriteError:
    """The one line for a failed write: which file and why, which checkpoint is intact, how to go on."""
    if t is not None and t.saved_path:
        e.args = (f"{e.args[0]}; the last intact checkpoint is {t.saved_path} (epoch {t.saved_epoch}): free "
                  f"space, then continue with the same flags and --resume {t.saved_path}",)
    else:
        e.args = (f"{e.args[0]}; no checkpoint of this run was written yet: free space and start again",)
    return e
