"""All settings of a run, in one dataclass that the CLI fills and every module receives explicitly."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_CROP_PCT = 0.8975  # timm's eval crop for Xception: 299 / 0.8975 -> resize 333, crop 299


class UserError(Exception):
    """A mistake of the user's (bad path, flag or file): printed as one line, never as a traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


LOADERS = ("auto", "pil", "tv", "dali")  # input pipelines (inputs.py)

@dataclass
class Config:
    # data
    data_path: str = ""
    image_size: int = 299
    crop_pct: float = DEFAULT_CROP_PCT
    crop_scale: tuple = (0.08, 1.0)
    hflip: bool = True
    workers: int = 4
    loader: str = "auto"  # input pipeline: auto (= tv), pil, tv, dali (inputs.py)
    # optimisation
    epochs: int = 90
    steps_per_epoch: Optional[int] = None  # cut each epoch short (performance runs)
    stop_after_epochs: Optional[int] = None  # end this invocation early; the schedule still spans `epochs`
    batch_size: int = 256  # global, split over the processes as in the seed
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    drop_rate: float = 0.0
    # precision
    amp: bool = False
    amp_dtype: str = "float16"
    loss_scale: Optional[str] = None  # a number, or "dynamic"; None means dynamic
    # run
    device: str = "auto"
    dist_backend: Optional[str] = None
    sync_bn: bool = False
    output_dir: str = "."
    resume: Optional[str] = None
    evaluate: bool = False
    seed: Optional[int] = None
    print_freq: int = 10
    case_name: Optional[str] = None
    channels_last: Optional[bool] = None  # None: the measured default for the device
    # torch.compile. Off: on CPU the compiled training step measured slower (12.5 vs 14.1 img/s at 128 px,
    # after a 58 s compile) and frozen inference 15% faster after 13 s of compiling, which pays off only
    # past ~600 images (docs/performance.md); not measured on a GPU yet (benchmarks/gpu.sh does).
    compile: bool = False
    pretrained: Optional[str] = None
    # faults (datacheck.py, preempt.py)
    skip_bad_images: bool = False  # log, count and skip undecodable images instead of stopping
    check_data: bool = True  # decode-check every image before the first epoch
    max_nonfinite_steps: int = 10  # with fp16 loss scaling: stop after this many non-finite losses in a row
    # interop and deployment (weights.py, finetune.py, observe.py, evalreport.py)
    freeze_epochs: int = 0  # train only the classifier for the first K epochs
    tensorboard: bool = False  # log scalars to OUTPUT/tensorboard
    eval_report: bool = False  # xception eval --report: per-class accuracy and confusion matrix
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain types only, so a checkpoint holding it loads with weights_only=True."""
        out = {}
        for key, value in dataclasses.asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    def validate(self, world_size: int = 1) -> None:
        checks = [
            (self.epochs > 0, f"--epochs must be a positive number, got {self.epochs}"),
            (self.steps_per_epoch is None or self.steps_per_epoch > 0,
             f"--steps-per-epoch must be a positive number, got {self.steps_per_epoch}"),
            (self.stop_after_epochs is None or self.stop_after_epochs > 0,
             f"--stop-after-epochs must be a positive number, got {self.stop_after_epochs}"),
            (self.batch_size > 0, f"--batch-size must be a positive number, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be a positive number, got {self.lr}"),
            (self.workers >= 0, f"--workers must be 0 or more, got {self.workers}"),
            (self.loader in LOADERS,
             f"--loader must be auto, pil, tv or dali, got {self.loader!r}"),
            (self.momentum >= 0, f"--momentum must be 0 or more, got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}"),
            (0 <= self.drop_rate < 1, f"--drop-rate must be in [0, 1), got {self.drop_rate}"),
            (self.image_size >= 71, f"--image-size must be at least 71 (the model's minimum), "
                                    f"got {self.image_size}"),
            (0 < self.crop_pct <= 1, f"--crop-pct must be in (0, 1], got {self.crop_pct}"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             f"--crop-scale needs 0 < MIN <= MAX <= 1, got {self.crop_scale[0]} {self.crop_scale[1]}"),
            (self.print_freq > 0, f"--print-freq must be a positive number, got {self.print_freq}"),
            (self.max_nonfinite_steps > 0,
             f"--max-nonfinite-steps must be a positive number, got {self.max_nonfinite_steps}"),
            (self.freeze_epochs >= 0, f"--freeze-epochs must be 0 or more, got {self.freeze_epochs}"),
            (self.amp_dtype in ("float16", "bfloat16"),
             f"--amp-dtype must be float16 or bfloat16, got {self.amp_dtype}"),
            (self.batch_size % world_size == 0,
             f"--batch-size {self.batch_size} is the global batch and must divide evenly by the "
             f"{world_size} processes; use a multiple of {world_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        for flag, path in (("--resume", self.resume), ("--pretrained", self.pretrained)):
            if path and not os.path.isfile(path) and not (flag == "--resume" and path == "auto"):
                what = "is a folder; give a checkpoint file" if os.path.isdir(path) else "no such file"
                raise UserError(f"{flag} {path}: {what}")
        if self.loss_scale not in (None, "dynamic"):
            try:
                scale = float(self.loss_scale)
            except ValueError:
                raise UserError(f"--loss-scale must be a number or 'dynamic', got {self.loss_scale!r}")
            if scale <= 0:
                raise UserError(f"--loss-scale must be positive, got {self.loss_scale}")
