"""`xception train`: a whole training run, epoch by epoch, with an evaluation, a metrics row and a
checkpoint after each; resumable at an epoch's end or, after a signal, at the step it stopped."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import Checkpoint, unwrap
from ..config import BEST_NAME, CHECKPOINT_NAME, Config, UserError
from ..files import WriteError, copy_atomic
from ..model.weights import build_model, from_checkpoint, load_into, read_weights
from ..recipes import describe
from ..report import FAULT_COLUMNS
from ..runtime import broadcast_buffers, gather_rng, on_main
from .hooks import Diverged, HeadOnly, Preempted, StepGuard
from .ema import Ema
from .loss import build_criterion
from .loop import EpochPlan, Step, evaluate, train_one_epoch, val_metrics
from .mix import build_mix
from .optim import build_optimizer, build_scheduler
from .resume import epoch_file, open_resume, restore
from .setup import Run
from .track import Trackers, open_trackers

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
    best_score: float = -math.inf  # top-1, or mAP in a multi-label run
    saved_path: str | None = None  # the last good checkpoint on disk: the resumed one, then ckpt_path
    saved_epoch: int = 0  # its epoch
    ema: Ema | None = None  # --ema: the weights' moving average
    source: str = "model"  # which of the two scored higher in the last evaluation: "model" or "ema"
    kept: list = field(default_factory=list)  # --keep-checkpoints: (score, epoch) of the epoch files kept
    fps: list = field(default_factory=lambda: [0.0, 0.0])  # images and seconds over the epochs
    trackers: Trackers | None = None  # --mlflow, --log-wandb (engine/track.py)


def train(cfg: Config) -> dict:
    """Train for cfg.epochs (resuming if asked), evaluating and checkpointing after every epoch."""
    t_start = time.perf_counter()
    opened = {}  # the checkpoint to resume, read once the processes are up
    run = Run(cfg, need_train=True, kind="acc", settle=lambda c, ctx, log: open_resume(c, ctx, log, opened))
    t = None
    try:
        t = _setup(run, opened.get("ckpt"))
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
            if t.trackers is not None:
                t.trackers.close(sys.exc_info()[1])
        run.close()


def _setup(run: Run, ckpt: Checkpoint | None) -> Training:
    cfg, ctx, log = run.cfg, run.ctx, run.log
    ckpt_path = os.path.join(cfg.output_dir, CHECKPOINT_NAME)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    # Files named on the command line are read on rank 0 and sent to the others: nodes need not share them.
    # A checkpoint with an EMA passes on the weights its run ranked higher (as eval uses them).
    # A published name ("imagenet", "keras", "hf-hub:...") is downloaded there, or found in its cache.
    pretrained = (on_main(ctx, read_weights, cfg.pretrained, "--pretrained", "best", cfg.arch) if cfg.pretrained
                  else None)
    if pretrained is not None and pretrained.variant is not None:
        log(f"--pretrained: {pretrained.choice_note}")
    # the network: --arch, else the weights' own, else the original Xception
    arch = cfg.arch or (pretrained.arch if pretrained else None) or (ckpt.arch if ckpt else None) or "xception"
    run.cfg = cfg = cfg.replace(arch=arch)
    net = build_model(pretrained, len(run.classes), cfg.drop_rate, log=log, arch=arch)
    if ckpt is not None:
        run.check_classes(ckpt.class_names, cfg.resume, ckpt.args.get("multi_label", False))
        load_into(net, from_checkpoint(ckpt, cfg.resume), allow_new_head=False, log=log)
    model = run.place(net)
    net = unwrap(model)
    optimizer = build_optimizer(model, cfg, ctx.device)
    iters = _iterations(run)
    accum = cfg.grad_accum_steps
    step = Step(model, build_criterion(run), optimizer,
                build_scheduler(optimizer, cfg, iters // accum), run.precision, accum, cfg.clip_grad_norm,
                build_mix(cfg, len(run.classes)))
    guard = StepGuard(ctx, run.precision.scaler is not None, cfg.max_nonfinite_steps, log, accum)
    t = Training(run, net, step, guard, [guard, HeadOnly(model, optimizer, cfg.freeze_epochs, log, step)], iters, ckpt_path)
    if cfg.ema:
        t.ema = Ema(net, step, cfg.ema_decay, cfg.ema_warmup, cfg.ema_every, cfg.ema_warmup_shape)
        t.hooks.append(t.ema)
    if ckpt is not None:
        restore(t, ckpt)
    log(describe(cfg))
    log(f"training on {ctx.world_size} x {ctx.device.type} ({run.precision.name}, "
        f"{'channels_last' if run.channels_last else 'NCHW'}{', compiled' if cfg.compile else ''}), "
        f"{run.train_loader.num_samples} train / {run.val_loader.num_samples} val images, {len(run.classes)} "
        f"classes, global batch {cfg.batch_size}"
        + (f" x {accum} accumulated = {cfg.batch_size * accum} per optimizer step" if accum > 1 else "")
        + f", {iters} iterations per epoch")
    # last: nothing after it may fail before train() can close the tracker runs
    t.trackers = open_trackers(cfg, ctx, ckpt.trackers if ckpt is not None else None, t.start_epoch, log)
    return t


def _iterations(run: Run) -> int:
    """Batches per epoch: the loader's (or --steps-per-epoch), cut to whole accumulations, so that every
    epoch ends on an optimizer step."""
    cfg = run.cfg
    batches = min(len(run.train_loader), cfg.steps_per_epoch or len(run.train_loader))
    iters = batches // cfg.grad_accum_steps * cfg.grad_accum_steps
    if iters == 0:
        raise UserError(f"--grad-accum-steps {cfg.grad_accum_steps}: an epoch has only {batches} batches; "
                        f"lower it, or lower --batch-size")
    return iters


def _end_epoch(t: Training) -> int:
    cfg = t.run.cfg
    end = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
    if t.start_epoch >= end:
        raise UserError(f"--stop-after-epochs {cfg.stop_after_epochs}: the checkpoint has already "
                        f"trained {t.start_epoch} epochs; raise it or leave it out")
    return end


def _checkpoint(t: Training, epoch: int, **extra) -> Checkpoint:
    run = t.run
    return Checkpoint(model=t.net.state_dict(), epoch=epoch, arch=run.cfg.arch,
                      optimizer=t.step.optimizer.state_dict(),
                      scheduler=t.step.scheduler.state_dict(),
                      scaler=run.precision.scaler.state_dict() if run.precision.scaler else None,
                      best_acc1=t.best_score, args=run.cfg.to_dict(), class_names=list(run.classes),
                      keras_exact=bool(getattr(t.net, "keras_exact", False)),
                      ema=t.ema.state()[0] if t.ema else None, ema_updates=t.ema.updates if t.ema else 0,
                      best_source=t.source, trackers=t.trackers.ids if t.trackers else None, **extra)


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
    # --print-freq counts optimizer steps; the loop counts batches
    plan = EpochPlan(t.iters, cfg.print_freq * cfg.grad_accum_steps, run.channels_last, t.start_step)
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
    val = _evaluate(t, t.net)
    t.fps[0] += stats.images_per_sec * stats.seconds
    t.fps[1] += stats.seconds
    images, overflow = _fault_counts(t)
    during = int(ctx.all_reduce(torch.tensor([float(images - before[0])], dtype=torch.float64,
                                                 device=ctx.device)).item())
    key = "map" if cfg.multi_label else "top1"  # what ranks the epochs (model_best, --keep-checkpoints, EMA)
    row = {"epoch": epoch + 1, "train_loss": stats.loss, "val_loss": val["loss"],
           **{k: val[k] for k in SCORES[cfg.multi_label]}, "lr": t.step.lr,
           "images_per_sec": stats.images_per_sec,
           "epoch_seconds": stats.seconds, "bad_images_skipped": run.bad_skipped + during,
           "overflow_steps_skipped": overflow - before[1]}
    score, source = val[key], "model"
    if t.ema is not None:
        ema = _evaluate(t, t.ema.module)
        row.update({f"ema_{k}": ema[k] for k in EMA_SCORES[cfg.multi_label]})
        if ema[key] > score:
            score, source = ema[key], "ema"
    t.source = source
    is_best = score > t.best_score
    t.best_score = max(t.best_score, score)
    shown = [c for c, on in zip(FAULT_COLUMNS, (cfg.skip_bad_images, run.precision.scaler is not None)) if on]
    run.report.epoch(row, tuple(shown))
    t.trackers.catch_up(epoch + 1)  # the row just written, read back
    if ctx.is_main:
        _checkpoint(t, epoch + 1).save(t.ckpt_path)
        t.saved_path, t.saved_epoch = t.ckpt_path, epoch + 1
        if is_best:
            copy_atomic(t.ckpt_path, os.path.join(cfg.output_dir, BEST_NAME))
        _keep(t, score, epoch + 1)
    ctx.barrier()
    return row


SCORES = {False: ("top1", "top5", "balanced_acc"), True: ("map", "f1_micro", "f1_macro")}  # by multi_label
EMA_SCORES = {False: ("top1", "top5"), True: ("map",)}


def _evaluate(t: Training, net: nn.Module) -> dict:
    """Evaluate a plain network (the trained one, or its average) on every rank's share of val. Every
    rank takes rank 0's BatchNorm statistics first; DDP is left out (it would broadcast them itself, on the
    first forward, which a rank without a val batch never makes: a hang)."""
    run = t.run
    broadcast_buffers(net, run.ctx)
    model = t.step.model if net is t.net and not run.ctx.distributed else net  # compiled when asked
    return evaluate(model, run.val_loader, run.ctx, run.precision, run.channels_last,
                    val_metrics(run.ctx, run.cfg.multi_label, run.cfg.threshold))


def _keep(t: Training, score: float, epoch: int) -> None:
    """--keep-checkpoints N: keep this epoch's checkpoint under its own name while it is among the N best
    (by the better of its top-1, or mAP, and its EMA's); the one it pushes out is deleted."""
    n = t.run.cfg.keep_checkpoints
    if n <= 0:
        return
    ranked = sorted(t.kept + [(score, epoch)], key=lambda se: (-se[0], se[1]))
    if (score, epoch) in ranked[:n]:
        copy_atomic(t.ckpt_path, epoch_file(t.run.cfg.output_dir, epoch))
    for _, dropped in ranked[n:]:
        if dropped != epoch:
            with contextlib.suppress(FileNotFoundError):
                os.remove(epoch_file(t.run.cfg.output_dir, dropped))
    t.kept = ranked[:n]


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
    score = last["map"] if run.cfg.multi_label else last["top1"]  # the seed's "accuracy" line: mAP if multi-label
    result = {"fps": fps, "top1": score, "top5": last.get("top5"), "loss": last["train_loss"],
              "e2e_seconds": e2e, "checkpoint": t.ckpt_path, "metrics": run.report.metrics_path}
    run.report.finish(result, run.ctx.device.type, run.ctx.world_size)
    t.trackers.upload_best()
    return result


def _write_failed(e: WriteError, t: Training | None) -> WriteError:
    """The one line for a failed write: which file and why, which checkpoint is intact, how to go on."""
    if t is not None and t.saved_path:
        e.args = (f"{e.args[0]}; the last intact checkpoint is {t.saved_path} (epoch {t.saved_epoch}): free "
                  f"space, then continue with the same flags and --resume {t.saved_path}",)
    else:
        e.args = (f"{e.args[0]}; no checkpoint of this run was written yet: free space and start again",)
    return e
