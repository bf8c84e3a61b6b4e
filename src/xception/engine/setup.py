"""What a training run and an evaluation run set up alike: the processes and device, the agreed seed,
the output folder, the loaders, the precision, and the placement of the model (device, layout, DDP,
torch.compile)."""

from __future__ import annotations

import random

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import DEFAULT_CROP_PCT, DEFAULT_IMAGE_SIZE, Config, UserError, derive_seed
from ..data import build_loaders
from ..files import make_folder
from ..model.deploy import compile_frozen
from ..report import Reporter
from ..runtime import cleanup, convert_sync_batchnorm, default_channels_last, on_main, setup
from .precision import make_precision


def _preview(names) -> str:
    names = list(names)
    return "(" + ", ".join(map(str, names[:4])) + (", ..." if len(names) > 4 else "") + ")"


class Run:
    """Everything a training or evaluation run holds besides the model; built once from the config.
    `cfg` is the resolved copy: image size, crop and seed filled in, agreed by every rank. `settle(cfg, ctx,
    log)`, when given, may change the settings once the processes are up and before anything is built from
    them (a resume takes the settings not given from its checkpoint)."""

    def __init__(self, cfg: Config, need_train: bool, kind: str, settle=None):
        self.ctx = setup(cfg.device, cfg.dist_backend, deterministic=cfg.deterministic)
        cfg.validate(self.ctx.world_size)
        self.log = print if self.ctx.is_main else (lambda *a, **k: None)
        if settle is not None:
            cfg = settle(cfg, self.ctx, self.log)
        self.cfg = cfg.replace(seed=self._agreed_seed(cfg.seed), image_size=cfg.image_size or DEFAULT_IMAGE_SIZE,
                               crop_pct=cfg.crop_pct or DEFAULT_CROP_PCT)
        on_main(self.ctx, make_folder, cfg.output_dir, "--output-dir")  # only rank 0 writes there; all hear of a failure
        self.generator = torch.Generator()  # the training order and the loader workers' seeds
        loaders = build_loaders(self.cfg, self.ctx, need_train, self.generator, self.log)
        self.classes, self.train_loader, self.val_loader = loaders.classes, loaders.train, loaders.val
        self.cfg = self.cfg.replace(multi_label=loaders.multi_label)  # a list's `a;b` cells make it multi-label
        self.bad_skipped = loaders.skipped
        self.channels_last = default_channels_last(self.ctx.device) if cfg.channels_last is None else cfg.channels_last
        self.precision = make_precision(self.cfg, self.ctx.device, warn=self.log)
        self.report = Reporter(self.cfg, self.ctx, kind, self.log)

    def _agreed_seed(self, seed) -> int:
        if seed is not None:
            return seed
        drawn = torch.tensor(random.SystemRandom().randrange(2 ** 31), device=self.ctx.device)
        if self.ctx.distributed:  # every rank must agree on the seed
            torch.distributed.broadcast(drawn, 0)
        return int(drawn.item())

    def seed_epoch(self, epoch: int) -> None:
        """Each rank augments differently, each epoch differently, and the same again after a resume."""
        s = derive_seed(self.cfg.seed, self.ctx.rank, epoch)
        torch.manual_seed(s)  # dropout, and augmentation when loading in the main process
        random.seed(s)
        self.generator.manual_seed(s)  # shuffling and the seeds of the loader's workers

    def check_classes(self, saved, source: str, multi_label: bool | None = None) -> None:
        """Refuse weights trained on other classes, or (`multi_label` known) with one label per image where
        the data has several or the other way round."""
        if saved is not None and list(saved) != list(self.classes):
            raise UserError(f"{source}: trained on {len(saved)} classes {_preview(saved)}, the data has "
                            f"{len(self.classes)} {_preview(self.classes)}; use --pretrained {source} "
                            f"to fine-tune on these classes")
        if multi_label is not None and bool(multi_label) != self.cfg.multi_label:
            kinds = ("one label per image", "several labels per image")
            raise UserError(f"{source}: trained with {kinds[bool(multi_label)]}, the data has "
                            f"{kinds[self.cfg.multi_label]}; use --pretrained {source} to fine-tune on it")

    def place(self, model: nn.Module, frozen: bool = False) -> nn.Module:
        """Move to the device and layout; with --sync-bn convert BatchNorm (in place, for `model`'s owner to
        see); wrap for data parallelism; with --compile, compile (`frozen`: weights fixed, for inference).
        With --grad-checkpointing, a trained model recomputes its blocks' activations in backward; set on the
        network itself, before any wrapper hides its method."""
        if self.cfg.grad_checkpointing and not frozen:
            model.set_grad_checkpointing(True)
        model = model.to(self.ctx.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.ctx.distributed and not frozen:
            if self.cfg.sync_bn:
                model = convert_sync_batchnorm(model, self.ctx.device)
            ids = [self.ctx.device.index] if self.ctx.device.type in ("cuda", "npu") else None
            model = DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile:  # lazy: the first call in each mode compiles, timed apart from img/s
            model = compile_frozen(model) if frozen else torch.compile(model)
        return model

    def close(self) -> None:
        self.report.close()
        cleanup()
