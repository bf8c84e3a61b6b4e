"""Continuing a training run: which checkpoint `--resume` means (rank 0 decides and reads it), which
settings the run takes from it, and restoring its optimizer, schedule, EMA and position into a `Training`
(engine/train.py) once the model is built.

Settings: a resume takes every setting of config.RESUMED_SETTINGS not given on the command line from the
checkpoint. Given ones win, but the optimizer's kind and parameter groups (OPTIMIZER_STATE_SETTINGS) cannot
change (its saved state would not fit), and a change of a schedule setting (SCHEDULE_SETTINGS) recomputes
the LR schedule as if the run had started with it, continued at the step the checkpoint reached.
"""

from __future__ import annotations

import os

from ..checkpoint import Checkpoint
from ..config import (CHECKPOINT_NAME, METRICS_NAME, OPTIMIZER_STATE_SETTINGS, SCHEDULE_SETTINGS, Config,
                      UserError)
from ..model.hub import is_name
from ..report import read_metrics
from ..runtime import on_main
from .hooks import resume_position
from .optim import continue_schedule


def open_resume(cfg: Config, ctx, log, opened: dict) -> Config:
    """Which checkpoint to resume, read (rank 0 decides and reads: the output folder and the file may not be
    shared, and sends it to the others); the settings not given on the command line are then the
    checkpoint's, so that `--resume` alone continues the run as it was set up."""
    if cfg.resume and is_name(cfg.resume):
        raise UserError(f"--resume {cfg.resume}: published weights hold no training state to continue; train "
                        f"from them with --pretrained {cfg.resume}")
    resume = on_main(ctx, _resume_source, cfg, os.path.join(cfg.output_dir, CHECKPOINT_NAME))
    cfg = cfg.replace(resume=resume)
    if not resume:
        return cfg
    opened["ckpt"] = ckpt = on_main(ctx, Checkpoint.load, resume)
    cfg, taken = cfg.continued_from(ckpt.args)
    if taken:
        log(f"--resume {resume}: continuing with its settings where no flag gives them: "
            + ", ".join(f"{name} {value}" for name, value in taken.items()))
    return cfg


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


def restore(t, ckpt: Checkpoint) -> None:
    cfg, log = t.run.cfg, t.run.log
    if not ckpt.resumable:
        raise UserError(f"--resume {cfg.resume}: holds no resumable training state; use --pretrained to start "
                        f"a new run from its weights")
    _load_optimizer(t, ckpt)
    # optimizer steps taken: the position of the schedule and of --ema-every's phase
    t.step.updates = ckpt.epoch * (t.iters // cfg.grad_accum_steps) + ckpt.epoch_step // cfg.grad_accum_steps
    changed = cfg.differing(ckpt.args, SCHEDULE_SETTINGS)
    if changed:
        t.step.scheduler = continue_schedule(t.step.optimizer, cfg, t.iters // cfg.grad_accum_steps,
                                             t.step.updates)
        log(f"--resume {cfg.resume}: " + ", ".join(f"{k} {ours} (was {was})" for k, (ours, was) in changed.items())
            + f": the LR schedule is the one these settings give from the start, continued at optimizer step "
              f"{t.step.updates} (lr {t.step.lr:.6g})")
    else:
        t.step.scheduler.load_state_dict(ckpt.scheduler)
    if t.ema is not None and ckpt.ema is not None:
        t.ema.load(ckpt.ema, ckpt.ema_updates)
    elif t.ema is not None:
        log(f"--ema: {cfg.resume} holds no average; starting one from its weights")
    if t.ema is not None:
        t.ema.seen = t.step.updates
    t.kept = on_main(t.run.ctx, _kept_checkpoints, cfg.output_dir, cfg.keep_checkpoints)
    t.start_epoch, t.best_score, t.source = ckpt.epoch, ckpt.best_acc1, ckpt.best_source
    t.saved_path, t.saved_epoch = cfg.resume, ckpt.epoch
    t.start_step = resume_position(ckpt, t.guard, t.run.ctx, log)
    log(f"resumed from {cfg.resume}: epoch {t.start_epoch} done"
        + (f" and {t.start_step} steps of epoch {t.start_epoch + 1}" if t.start_step else "")
        + f", best {'mAP' if t.run.cfg.multi_label else 'top-1'} {t.best_score:.3f}")
    if t.start_epoch >= cfg.epochs:
        raise UserError(f"--resume {cfg.resume}: already trained {t.start_epoch} epochs; "
                        f"raise --epochs above {t.start_epoch} to train further")


def _load_optimizer(t, ckpt: Checkpoint) -> None:
    """The optimizer's and loss scaler's state. Flags that change the optimizer's kind or parameter groups
    (given explicitly: otherwise they are the checkpoint's) are refused, naming the checkpoint's values."""
    cfg = t.run.cfg
    differ = cfg.differing(ckpt.args, OPTIMIZER_STATE_SETTINGS)
    if differ:
        flags = " ".join(_flag(k, was) for k, (_, was) in differ.items())
        raise UserError(f"--resume {cfg.resume}: was trained with {flags}, this run asks for "
                        + " ".join(_flag(k, ours) for k, (ours, _) in differ.items())
                        + f", which its optimizer state does not fit; resume with {flags} (or leave the flags "
                          f"out: a resume takes the checkpoint's), or start a new run from its weights with "
                          f"--pretrained {cfg.resume}")
    try:
        t.step.optimizer.load_state_dict(ckpt.optimizer)
        if t.run.precision.scaler is not None and ckpt.scaler:
            t.run.precision.scaler.load_state_dict(ckpt.scaler)
    except (KeyError, ValueError) as e:
        raise UserError(f"--resume {cfg.resume}: its optimizer state does not fit this run ({e}); use "
                        f"--pretrained {cfg.resume} to start a new run from its weights")


def _flag(name: str, value) -> str:
    """The command-line spelling of a setting's value (booleans as --X / --no-X)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {value}"


def _kept_checkpoints(output_dir: str, n: int) -> list:
    """At a resume: the epoch files still on disk, scored from metrics.csv, so that --keep-checkpoints
    goes on ranking them."""
    path = os.path.join(output_dir, METRICS_NAME)
    if n <= 0 or not os.path.isfile(path):
        return []
    metrics = read_metrics(path)
    kept = []
    for i, epoch in enumerate(metrics["epoch"]):
        scores = [metrics.get(k, [None] * (i + 1))[i] for k in ("top1", "ema_top1", "map", "ema_map")]
        if epoch is not None and os.path.isfile(epoch_file(output_dir, int(epoch))):
            kept.append((max(x for x in scores if x is not None), int(epoch)))
    return kept


def epoch_file(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint-epoch{epoch}.pth.tar")
