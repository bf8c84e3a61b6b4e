"""--ema: an exponential moving average of the weights and BatchNorm buffers (the paper's "Polyak
averaging at inference time"), kept by torch.optim.swa_utils.AveragedModel and updated after every
--ema-every optimizer steps; evaluated every epoch next to the trained weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .loop import Hook, Step

# --ema-warmup-shape. Both ramps start low and approach 1; power stays the higher (a longer averaging
# window) at every n: at n = 1, 10, 100 ratio gives 0.18, 0.55, 0.92 and power 0.37, 0.80, 0.95.
WARMUP_SHAPES = ("ratio", "power")
DEFAULT_WARMUP_SHAPE = "ratio"


def warmup_decay(shape: str, n: int) -> float:
    """The warm-up's decay before the --ema-decay cap, n = the updates already averaged in.
    ratio: (1 + n) / (10 + n), this project's first ramp. power: 1 - (1 + n) ** (-2/3), the form of timm's
    ModelEmaV3 warm-up (its default gamma 1 and power 2/3); timm counts the same n: its t = step - 1,
    with step = 1 at the first update."""
    if shape == "ratio":
        return (1 + n) / (10 + n)
    if shape == "power":
        return 1.0 - (1.0 + n) ** (-2.0 / 3.0)
    raise ValueError(f"unknown EMA warm-up shape {shape!r}")


class Ema(Hook):
    """The average of `net` (the plain, unwrapped network). `updates` counts the averaging steps on the
    host, so the decay warm-up needs no device read. AveragedModel's first update copies the weights;
    each later one is ema = d * ema + (1 - d) * weights, with d = --ema-decay, or with --ema-warmup a
    decay that starts small and grows, so that the average soon leaves the random initial weights:
    d_n = min(decay, warmup_decay(shape, n)) at the update that finds n = `updates` earlier ones (n >= 1;
    the n = 0 update is the copy). AveragedModel checks its own count on the host at each update: one
    device read per update, which --ema-every K spreads over K steps."""

    def __init__(self, net: nn.Module, step: Step, decay: float, warmup: bool = False, every: int = 1,
                 shape: str = DEFAULT_WARMUP_SHAPE):
        if shape not in WARMUP_SHAPES:
            raise ValueError(f"unknown EMA warm-up shape {shape!r}")  # Config.validate refuses it first
        self.step, self.decay, self.warmup, self.every, self.shape = step, decay, warmup, every, shape
        self.source, self.updates = net, 0
        self.seen = step.updates  # optimizer steps already taken when we last looked
        self.averaged = AveragedModel(net, multi_avg_fn=self._average, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def current_decay(self) -> float:
        return min(self.decay, warmup_decay(self.shape, self.updates)) if self.warmup else self.decay

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
