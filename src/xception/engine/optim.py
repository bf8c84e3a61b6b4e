"""The optimizer and the learning-rate schedule of a training run (torch.optim and its lr_scheduler).

The schedule is stepped once per optimizer step (with --grad-accum-steps K, once per K batches), so that
it ends where --epochs ends and a resume continues it exactly (its state is in the checkpoint)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, SequentialLR

WARMUP_START_FACTOR = 0.01  # linear warm-up starts at 1% of --lr


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list:
    """One group, or (--no-wd-norm-bias) two: conv and linear weights decay; BatchNorm weights and all
    biases (the 1-d parameters) do not: decaying them only shrinks scales the next BatchNorm undoes."""
    if decay_norm_bias:
        return [{"params": [p for p in model.parameters()], "weight_decay": weight_decay}]
    decay, keep = [], []
    for p in model.parameters():
        (keep if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """--opt sgd (momentum, optionally Nesterov), rmsprop or adamw. On CUDA the fused kernels: one launch
    for all parameters, and with fp16 the loss scaler passes its overflow flag into the kernel instead of
    reading it on the host every step. RMSprop has no fused kernel; it runs foreach."""
    groups = param_groups(model, cfg.weight_decay, cfg.wd_norm_bias)
    fused = True if device.type == "cuda" else None
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               fused=fused)
    if cfg.opt == "rmsprop":  # the paper's JFT optimizer; TF's epsilon sits inside the root, torch's outside
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.opt_eps, alpha=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.opt_eps, fused=fused)


def build_scheduler(optimizer, cfg, steps_per_epoch: int):
    """Linear warm-up (from 1% of --lr), then --sched over the remaining optimizer steps:
    cosine to zero; step or exponential: x --decay-rate every --decay-epochs, as a staircase counted from
    the run's start (the paper's 0.045 x 0.94^floor(epoch / 2))."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.sched == "cosine":
        after = CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
    else:
        # "step" and "exponential" are the same staircase here; two names because users know both. The
        # factor depends on the optimizer step only, so the staircase is exact at epoch boundaries.
        every = max(1, round(cfg.decay_epochs * steps_per_epoch))
        rate = cfg.decay_rate
        after = LambdaLR(optimizer, lambda i: rate ** math.floor((i + warmup) / every))
    if warmup <= 0:
        return after
    linear = LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup)
    return SequentialLR(optimizer, [linear, after], milestones=[warmup])


def continue_schedule(optimizer, cfg, steps_per_epoch: int, done: int):
    """The schedule of `cfg` as if the run had started with it, positioned after `done` optimizer steps: for
    a resume whose schedule settings (--epochs, --lr, ...) differ from its checkpoint's. The LR goes to the
    new schedule's value at that step (raising --epochs after a cosine ended: back up to where the longer
    cosine is at that step, then down to zero at the new end)."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group.pop("initial_lr", None)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler stepped before the optimizer": on purpose here
        for _ in range(done):
            scheduler.step()
    return scheduler
