"""All settings of a run in one dataclass, which the CLI fills and every part receives explicitly; the
user-error type and the exit codes; and the constants that more than one part of the package needs.

This module is the bottom floor: it imports nothing of ours and no third-party library.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from typing import Optional

# The model's input: what the original weights expect (Chollet 2017; Keras and timm agree).
DEFAULT_IMAGE_SIZE = 299
MIN_INPUT_SIZE = 71  # the smallest input on which every stride-2 stage still has a pixel (as in Keras)
DEFAULT_CROP_PCT = 0.8975  # timm's eval crop for Xception: 299 / 0.8975 -> resize 333, crop 299
PIXEL_MEAN = PIXEL_STD = 0.5  # pixels scaled to [-1, 1]: x / 127.5 - 1

# File names in an output folder.
CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
METRICS_NAME = "metrics.csv"
MLFLOW_IN_OUTPUT = "auto"  # --mlflow without a URI: a SQLite store in the output folder (engine/track.py)

# The Xception family (model/family.py builds them): the 2017 original first, the default and the seed's.
ARCHS = ("xception", "xception41", "xception65", "xception71", "xception41p", "xception65p")
LOADERS = ("auto", "pil", "tv", "dali")  # input pipelines (data/__init__.py)
SAMPLERS = ("shuffle", "balanced")  # training order of an image folder (data/loaders.py)
LOSSES = ("ce", "bce", "asl")  # training losses (engine/loss.py): ce single-label; bce, asl multi-label
AUTO_AUGMENT = ("ra", "ta", "aa", "augmix")  # RandAugment, TrivialAugmentWide, AutoAugment (ImageNet), AugMix
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "step", "exponential")  # step and exponential are staircases (engine/optim.py)
DEFAULT_OPSET = 17  # ONNX opset of `xception export`

# What a resumed run takes from its checkpoint's saved settings unless the command line (or --recipe) gives
# it: the settings that shape the run (optimizer and its state, schedule, EMA, batch, augmentation, input).
RESUMED_SETTINGS = ("recipe", "seed", "epochs", "batch_size", "image_size", "crop_pct", "amp", "opt", "nesterov", "opt_eps", "momentum", "weight_decay", "wd_norm_bias", "lr", "sched",
                    "warmup_epochs", "decay_epochs", "decay_rate", "label_smoothing", "drop_rate",
                    "clip_grad_norm", "grad_accum_steps", "ema", "ema_decay", "ema_warmup", "ema_warmup_shape", "ema_every",
                    "auto_augment", "ra_magnitude", "ra_num_ops", "random_erase", "mixup", "cutmix", "mix_prob",
                    "mix_switch_prob", "sampler", "class_weights", "loss", "multi_label", "threshold")
# Of those, the ones whose change makes the optimizer's saved state unloadable (its parameter groups, its kind).
OPTIMIZER_STATE_SETTINGS = ("opt", "wd_norm_bias")
# Of those, the ones that define the LR schedule: a resume with another value recomputes it (engine/optim.py).
SCHEDULE_SETTINGS = ("epochs", "lr", "sched", "warmup_epochs", "decay_epochs", "decay_rate", "batch_size",
                     "grad_accum_steps", "steps_per_epoch")

# Exit codes. 0: done.
EXIT_FAILED_RANK = 1  # a process of a multi-process job failed (the launcher names it)
EXIT_USER = 2  # a mistake of the user's: a flag, a path, a data file, a checkpoint
EXIT_NONFINITE = 3  # the loss stopped being finite: lower --lr, or resume from the last good checkpoint
EXIT_WRITE = 74  # EX_IOERR: a file could not be written (disk full, quota, permissions)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving a resumable checkpoint; run again with --resume
EXIT_INTERRUPTED = 130  # a second Ctrl-C


class UserError(Exception):
    """Something the user can mend (bad path, flag or file, a full disk): printed as one line, never as
    a traceback, and the process exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_USER):
        super().__init__(message)
        self.exit_code = exit_code


def check_file(path: str, flag: str, give: str) -> None:
    """Refuse a path given for `flag` that is missing or a folder; `give` says what to give instead."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; give {give}")


def import_extra(module: str, who: str, extra: str, package: str | None = None):
    """`module`, imported; without it a one-line UserError: `who` needs `package` (default: the module's
    top name), and the optional extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{who} needs the {package or module.split('.')[0]} package: "
                        f"pip install 'xception[{extra}]'") from None


def derive_seed(*parts: int) -> int:
    """One seed from several integers (run seed, rank, epoch, worker slot ...): distinct tuples give
    distinct streams, and the same tuple the same stream after a resume. derive_seed(0, 0, e) == e."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2 ** 63)
    return seed


@dataclass
class ShardSettings:
    """How `xception prepare` writes a shard set (recorded in its index.json)."""
    max_size: int = 384  # short side at most this many pixels; 0 keeps the size
    quality: int = 90  # Pillow, 4:2:0 chroma: visually lossless for training, ~40 KB at 384 px
    shard_size: int = 1000  # samples per shard at most
    min_shards: int = 64  # enough for 8 ranks x 8 workers without idle slots

    def check(self) -> None:
        if self.shard_size < 1 or self.min_shards < 1 or self.max_size < 0 or not 1 <= self.quality <= 100:
            raise UserError("--shard-size and --min-shards must be positive, --max-size 0 or more, --quality 1..100")


@dataclass
class Config:
    # data
    data_path: str = ""
    image_column: str = "image"  # a Hugging Face dataset's image column (data/hfds.py)
    label_column: str = "label"  # ... and its label column
    train_list: Optional[str] = None  # text lists of `path label` lines (data/listfile.py), instead of a folder
    val_list: Optional[str] = None
    classes_file: Optional[str] = None  # --classes: the class order of a list file, one name a line
    # several labels per image: set by --multi-label, or by the data (a list file's `a;b` label cells)
    multi_label: bool = False
    eval_split: str = "val"  # xception eval --split: a CSV list file's val, test or calib rows
    image_size: Optional[int] = None  # None: DEFAULT_IMAGE_SIZE, or for eval the weights' own
    crop_pct: Optional[float] = None  # None: DEFAULT_CROP_PCT, or for eval the weights' own
    crop_scale: tuple = (0.08, 1.0)
    hflip: bool = True
    workers: int = 4
    loader: str = "auto"  # input pipeline: auto (= tv), pil, tv, dali
    skip_bad_images: bool = False  # log, count and skip undecodable images instead of stopping
    check_data: bool = True  # decode-check every image (not checked before) ahead of the first epoch
    sampler: str = "shuffle"  # training order: shuffle (each image once per epoch) or balanced (SAMPLERS)
    arch: Optional[str] = None  # one of ARCHS; None: the weights' own (--pretrained/--resume), else xception
    # augmentation (data/transforms.py) and batch mixing (engine/mix.py)
    auto_augment: Optional[str] = None  # one of AUTO_AUGMENT
    ra_magnitude: int = 9  # RandAugment: strength of each op (0..30)
    ra_num_ops: int = 2  # RandAugment: ops per image
    random_erase: float = 0.0  # probability of erasing a random rectangle of a training image
    mixup: float = 0.0  # Beta(alpha, alpha) for mixup; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) for CutMix; 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    mix_switch_prob: float = 0.5  # with both on: probability of CutMix rather than mixup
    # optimisation
    recipe: Optional[str] = None  # a named set of defaults (recipes.py); explicit flags win
    opt: str = "sgd"  # one of OPTIMIZERS
    nesterov: bool = False
    opt_eps: float = 1e-8  # RMSprop / AdamW epsilon
    wd_norm_bias: bool = True  # False: no weight decay on BatchNorm weights and biases (parameter groups)
    clip_grad_norm: Optional[float] = None  # clip the global gradient norm to this (after unscaling)
    grad_accum_steps: int = 1  # micro-batches per optimizer step: effective batch = batch_size x this
    sched: str = "cosine"  # one of SCHEDULES, after the linear warm-up
    decay_epochs: float = 2.0  # step/exponential: decay every this many epochs
    decay_rate: float = 0.94  # step/exponential: multiply the LR by this at each decay
    ema: bool = False  # keep an exponential moving average of the weights (Polyak averaging)
    ema_decay: float = 0.9998  # per EMA update
    ema_warmup: bool = False  # ramp the decay up over the first updates (shape: ema_warmup_shape)
    ema_warmup_shape: str = "ratio"  # ratio: min(decay, (1 + n) / (10 + n)); power: min(decay, 1 - (1 + n) ** -2/3)
    ema_every: int = 1  # update the EMA every K optimizer steps
    keep_checkpoints: int = 0  # also keep the N best epochs' checkpoints, named by epoch
    epochs: int = 90
    steps_per_epoch: Optional[int] = None  # cut each epoch short (performance runs)
    stop_after_epochs: Optional[int] = None  # end this invocation early; the schedule still spans `epochs`
    batch_size: int = 256  # global, split over the processes as in the seed
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    loss: Optional[str] = None  # one of LOSSES; None: ce for single-label data, bce for multi-label
    threshold: float = 0.5  # multi-label: a label is predicted when its probability exceeds this (F1, predict)
    class_weights: Optional[str] = None  # per-class loss weights: "balanced", or a FILE of `class weight` lines
    warmup_epochs: float = 0.0
    drop_rate: float = 0.0
    freeze_epochs: int = 0  # train only the classifier for the first K epochs
    max_nonfinite_steps: int = 10  # with fp16 loss scaling: stop after this many non-finite losses in a row
    # precision and layout
    amp: bool = False
    amp_dtype: str = "float16"
    loss_scale: Optional[str] = None  # a number, or "dynamic"; None means dynamic
    channels_last: Optional[bool] = None  # None: the measured default for the device
    # torch.compile. Off: on CPU the compiled training step measured slower (12.5 vs 14.1 img/s at 128 px,
    # after a 58 s compile) and frozen inference 15% faster after 13 s of compiling, which pays off only
    # past ~600 images (docs/performance.md); not measured on a GPU yet (benchmarks/gpu.sh does).
    compile: bool = False
    # recompute the blocks' activations in backward instead of keeping them (less memory, more time per step)
    grad_checkpointing: bool = False
    # run
    device: str = "auto"
    dist_backend: Optional[str] = None
    sync_bn: bool = False
    deterministic: bool = False  # cuDNN autotuning off, deterministic kernels only (runtime.configure_kernels)
    output_dir: str = "."
    resume: Optional[str] = None  # a checkpoint; for eval also an .onnx file; "auto" for train
    pretrained: Optional[str] = None
    evaluate: bool = False
    seed: Optional[int] = None
    print_freq: int = 10
    case_name: Optional[str] = None
    tensorboard: bool = False  # log scalars to OUTPUT/tensorboard
    # experiment trackers (engine/track.py), rank 0 only; not taken from a resumed checkpoint
    mlflow: Optional[str] = None  # a tracking URI, or MLFLOW_IN_OUTPUT (OUTPUT/mlflow.db); None: off
    log_wandb: bool = False  # Weights & Biases (its WANDB_* variables apply: WANDB_MODE=offline ...)
    tracker_project: Optional[str] = None  # MLflow experiment / W&B project; None: the output folder's name
    log_checkpoint: bool = False  # send model_best to the trackers as an artefact at the end
    eval_report: bool = False  # xception eval --report: the files of evalreport.py
    positive: Optional[str] = None  # --report: the class scored against the rest (ROC); two classes: the second
    target_fpr: float = 0.01  # --report: the operating point with the highest recall at this false-positive rate
    group_by: Optional[str] = None  # --report: a list file's column whose images form one group (`group`)
    group_regex: Optional[str] = None  # --report: the group of an image: this pattern's match on its path
    calibrate: bool = False  # xception eval --calibrate: fit a temperature on the evaluated split
    temperature: float = 1.0  # the logits are divided by this (a calibrated checkpoint's; eval --calibrate)
    tta: Optional[str] = None  # xception eval --tta flip: average the logits of each image and its mirror
    # eval/predict/export of a checkpoint holding an EMA: the trained weights (raw) or the EMA; neither: the
    # weights the run's own evaluation ranked higher (its best_source)
    raw_weights: bool = False
    ema_weights: bool = False
    # The settings of RESUMED_SETTINGS that the command line (or --recipe) gave; None: all of them (a Config
    # built in code means every value it holds). A resume takes the others from its checkpoint.
    explicit: Optional[tuple] = None

    def to_dict(self) -> dict:
        """Plain types only, so a checkpoint holding it loads with weights_only=True."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def continued_from(self, saved: dict) -> tuple:
        """(this config with every setting of RESUMED_SETTINGS that was not given explicitly taken from a
        checkpoint's saved settings, {name: value} of those that changed)."""
        if self.explicit is None:
            return self, {}
        taken = {}
        for name in RESUMED_SETTINGS:
            if name in self.explicit or name not in saved:
                continue
            value = tuple(saved[name]) if isinstance(saved[name], list) else saved[name]
            if value != getattr(self, name):
                taken[name] = value
        return self.replace(**taken), taken

    def differing(self, saved: dict, names) -> dict:
        """{name: (ours, saved)} of the settings in `names` whose value differs from a checkpoint's."""
        return {n: (getattr(self, n), saved[n]) for n in names if n in saved and saved[n] != getattr(self, n)}

    def validate(self, world_size: int = 1) -> None:
        """Refuse a bad setting with one line naming the flag."""
        for ok, message in self._checks(world_size):
            if not ok:
                raise UserError(message)
        for flag, path in (("--resume", self.resume), ("--pretrained", self.pretrained)):
            if not path or (flag == "--resume" and path == "auto"):
                continue
            # A published name (model/hub.py's is_name; this module imports nothing of ours) is no file: the
            # weights reader downloads it (eval --weights NAME); train refuses to --resume one (engine/train.py).
            if path in ("imagenet", "keras") or path.startswith("hf-hub:"):
                continue
            check_file(path, flag, "a checkpoint file")
        if self.class_weights not in (None, "none", "balanced"):
            check_file(self.class_weights, "--class-weights", "balanced, none or a text file of `class weight` lines")
        if self.loss_scale not in (None, "dynamic"):
            try:
                scale = float(self.loss_scale)
            except ValueError:
                raise UserError(f"--loss-scale must be a number or 'dynamic', got {self.loss_scale!r}")
            if scale <= 0:
                raise UserError(f"--loss-scale must be positive, got {self.loss_scale}")

    def _recipe_checks(self) -> list:
        def within(flag: str, value, low, high) -> tuple:
            return low <= value <= high, f"{flag} must be in [{low}, {high}], got {value}"

        def one_of(flag: str, value, allowed) -> tuple:
            return value is None or value in allowed, f"{flag} must be one of {', '.join(allowed)}, got {value!r}"

        return [
            one_of("--arch", self.arch, ARCHS), one_of("--auto-augment", self.auto_augment, AUTO_AUGMENT), one_of("--opt", self.opt, OPTIMIZERS),
            one_of("--sched", self.sched, SCHEDULES),
            within("--ra-magnitude", self.ra_magnitude, 0, 30), (self.ra_num_ops >= 1, "--ra-num-ops must be 1 or more"),
            within("--random-erase", self.random_erase, 0, 1), within("--mix-prob", self.mix_prob, 0, 1),
            within("--mix-switch-prob", self.mix_switch_prob, 0, 1),
            (self.mixup >= 0, f"--mixup must be 0 (off) or a positive alpha, got {self.mixup}"),
            (self.cutmix >= 0, f"--cutmix must be 0 (off) or a positive alpha, got {self.cutmix}"),
            (self.opt_eps > 0, f"--opt-eps must be positive, got {self.opt_eps}"),
            (self.clip_grad_norm is None or self.clip_grad_norm > 0,
             f"--clip-grad-norm must be positive, got {self.clip_grad_norm}"),
            (self.grad_accum_steps >= 1, f"--grad-accum-steps must be 1 or more, got {self.grad_accum_steps}"),
            (self.decay_epochs > 0, f"--decay-epochs must be positive, got {self.decay_epochs}"),
            (0 < self.decay_rate <= 1, f"--decay-rate must be in (0, 1], got {self.decay_rate}"),
            (0 < self.ema_decay < 1, f"--ema-decay must be in (0, 1), got {self.ema_decay}"),
            (self.ema_every >= 1, f"--ema-every must be 1 or more, got {self.ema_every}"),
            one_of("--ema-warmup-shape", self.ema_warmup_shape, ("ratio", "power")),
            (self.keep_checkpoints >= 0, f"--keep-checkpoints must be 0 or more, got {self.keep_checkpoints}"),
        ]

    def _checks(self, world_size: int) -> list:
        def positive(flag: str, value) -> tuple:
            return value is None or value > 0, f"{flag} must be a positive number, got {value}"

        def at_least_zero(flag: str, value) -> tuple:
            return value >= 0, f"{flag} must be 0 or more, got {value}"

        return [
            positive("--epochs", self.epochs), positive("--steps-per-epoch", self.steps_per_epoch),
            positive("--stop-after-epochs", self.stop_after_epochs), positive("--batch-size", self.batch_size),
            positive("--lr", self.lr), positive("--print-freq", self.print_freq),
            positive("--max-nonfinite-steps", self.max_nonfinite_steps),
            at_least_zero("--workers", self.workers), at_least_zero("--momentum", self.momentum),
            at_least_zero("--weight-decay", self.weight_decay), at_least_zero("--warmup-epochs", self.warmup_epochs),
            at_least_zero("--freeze-epochs", self.freeze_epochs),
            (self.loader in LOADERS, f"--loader must be {', '.join(LOADERS)}, got {self.loader!r}"),
            (self.sampler in SAMPLERS, f"--sampler must be {', '.join(SAMPLERS)}, got {self.sampler!r}"),
            (self.class_weights is None or bool(self.class_weights.strip()),
             "--class-weights must be balanced, none or a file of `class weight` lines, got ''"),
            (self.loss is None or self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (0 < self.threshold < 1, f"--threshold must be in (0, 1), got {self.threshold}"),
            (0 < self.target_fpr < 1, f"--target-fpr must be in (0, 1), got {self.target_fpr}"),
            (not (self.group_by and self.group_regex), "give --group-by or --group-regex, not both"),
            (self.mlflow is None or bool(self.mlflow.strip()), "--mlflow takes a tracking URI or nothing, got ''"),
            (not self.log_checkpoint or self.mlflow is not None or self.log_wandb,
             "--log-checkpoint sends model_best to a tracker: add --mlflow and/or --log-wandb"),
            (self.eval_split in ("val", "test", "calib"), f"--split must be val, test or calib, got {self.eval_split!r}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.drop_rate < 1, f"--drop-rate must be in [0, 1), got {self.drop_rate}"),
            (self.image_size is None or self.image_size >= MIN_INPUT_SIZE,
             f"--image-size must be at least {MIN_INPUT_SIZE} (the model's minimum), got {self.image_size}"),
            (self.crop_pct is None or 0 < self.crop_pct <= 1, f"--crop-pct must be in (0, 1], got {self.crop_pct}"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             f"--crop-scale needs 0 < MIN <= MAX <= 1, got {self.crop_scale[0]} {self.crop_scale[1]}"),
            (self.amp_dtype in ("float16", "bfloat16"), f"--amp-dtype must be float16 or bfloat16, got {self.amp_dtype}"),
            *self._recipe_checks(),
            (world_size == 1 or ":" not in self.device,
             f"--device {self.device}: with {world_size} processes each takes the device of its local rank; "
             f"give --device {self.device.split(':')[0]} (and CUDA_VISIBLE_DEVICES to choose the devices)"),
            (self.batch_size % world_size == 0,
             f"--batch-size {self.batch_size} is the global batch and must divide evenly by the "
             f"{world_size} processes; use a multiple of {world_size}"),
        ]
