"""--ema: an exponential moving average of the weights and BatchNorm buffers (the paper's "Polyak
averaging at inference time"), kept by torch.optim.swa_utils.AveragedModel and updated after every
--ema-every optimizer steps; evaluated every epoch next to the trained weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .loop import Hook, Step


class Ema(Hook):
    """The average of `net` (the plain, unwrapped network). `updates` counts the averaging steps on the
    host, so the decay warm-up needs no device read. AveragedModel's first update copies the weights;
    each later one is ema = d * ema + (1 - d) * weights, with d = --ema-decay, or with --ema-warmup
    min(decay, (1 + n) / (10 + n)) at the n-th update (small early, so that the average soon leaves the
    random initial weights). AveragedModel checks its own count on the host at each update: one device
    read per update, which --ema-every K spreads over K steps."""

    def __init__(self, net: nn.Module, step: Step, decay: float, warmup: bool = False, every: int = 1):
        self.step, self.decay, self.warmup, self.every = step, decay, warmup, every
        self.source, self.updates = net, 0
        self.seen = step.updates  # optimizer steps already taken when we last looked
        self.averaged = AveragedModel(net, multi_avg_fn=self._average, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    def _average(self, averaged: list, current: list, count) -> None:
        get_ema_multi_avg_fn(self.current_decay())(averaged, current, count)

    def after_step(self, step: int, loss: torch.Tensor, check: bool) -> bool:
        if self.step.updates != self.seen:  # this batch ended with an optimizer step
            self.seen = self.step.updates
            if self.seen % self.every == 0:
                self.update()
        return False

    @torch.no_grad()
    def update(self) -> None:
        self.averaged.update_parameters(self.source)
        self.updates += 1

    def state(self) -> tuple:
        """(plain state dict of the average, update count), for the checkpoint."""
        return self.module.state_dict(), self.updates

    def load(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
        self.averaged.n_averaged.fill_(updates)
