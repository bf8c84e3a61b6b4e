"""`--tensorboard`: scalars to OUTPUT/tensorboard through torch.utils.tensorboard's SummaryWriter.

Every print interval: train/loss, train/lr and train/img_s at the global iteration; every epoch: each
column of metrics.csv under epoch/ at the epoch number. Only the main process writes.
"""

from __future__ import annotations

import os

from .config import UserError

TENSORBOARD_DIR = "tensorboard"


class Board:
    def __init__(self, enabled: bool, output_dir: str, iters_per_epoch: int, log=print):
        self.writer = None
        self.iters = iters_per_epoch
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)")
        path = os.path.join(output_dir, TENSORBOARD_DIR)
        self.writer = SummaryWriter(path)
        log(f"tensorboard: logging to {path} (view with: tensorboard --logdir {path})")

    def wrap(self, progress, epoch: int):
        """The epoch's progress reporter, also writing what it reports to tensorboard."""
        return progress if self.writer is None else _Tap(progress, self.writer, epoch * self.iters)

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _Tap:
    def __init__(self, progress, writer, base: int):
        self.progress, self.writer, self.base = progress, writer, base

    def update(self, step: int, **values) -> None:
        self.progress.update(step, **values)
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, self.base + step)

    def __getattr__(self, name):
        return getattr(self.progress, name)
