"""`--loader dali`: NVIDIA DALI reads the image folder, decodes JPEGs on the GPU ("mixed": Huffman on the
CPU, the rest with nvJPEG) and crops, resizes and flips there; the optional extra `dali` installs it
(`pip install -e ".[dali]"`, the nvidia-dali-cuda130 wheel).

Same transforms as the CPU paths: train RandomResizedCrop (area --crop-scale, aspect 3/4..4/3, bilinear
with antialiasing) and a p=0.5 flip; eval resize of the short side to image_size / crop_pct (bicubic,
antialiased) and a centre crop. Batches stay uint8 NCHW (channels-last memory) for loaders.to_device.

Same sharding per rank: the reader's shard_id/num_shards are the rank and the world size. Training
reshuffles the whole list every epoch with the run's seed (the same permutation on every rank) and
runs floor(samples / world / per-rank batch) steps on every rank, so DDP never waits on a rank with a
shorter shard; evaluation pads the last batch and drops the padding, so every image counts once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import UserError, derive_seed
from .folder import Split, scan_dataset
from .loaders import Loader, per_process
from .transforms import RATIO, eval_resize_size

READER = "Reader"


@dataclass
class Placement:
    """Where one DALI pipeline runs: its batch, its shard of the file list, the GPU and CPU threads."""
    batch: int
    rank: int = 0
    world: int = 1
    device_id: int | None = 0
    threads: int = 1
    device: str = "mixed"  # "mixed": decode on the GPU; "cpu": the same graph on the CPU (a check without GPU)


def graph(fn, types, split: Split, cfg, train: bool, where: Placement):
    """The DALI operator graph; returns (images, labels) as DataNodes."""
    seed = cfg.seed or 0
    if train:  # one permutation per epoch, the same on every rank: the reader's own seed
        order = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed)
    else:  # every rank keeps its shard and pads its last batch (the iterator drops the padding)
        order = dict(stick_to_shard=True, pad_last_batch=True)
    jpegs, classes = fn.readers.file(files=[p for p, _ in split.samples], labels=[t for _, t in split.samples],
                                     shard_id=where.rank, num_shards=where.world, name=READER, **order)
    if train:
        images = fn.decoders.image_random_crop(jpegs, device=where.device, output_type=types.RGB,
                                               random_area=list(cfg.crop_scale), random_aspect_ratio=list(RATIO),
                                               num_attempts=10)
        images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5) if cfg.hflip else 0
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", mirror=mirror)
    else:
        images = fn.decoders.image(jpegs, device=where.device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=eval_resize_size(cfg.image_size, cfg.crop_pct),
                           interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC",
                                          crop=(cfg.image_size, cfg.image_size))
    return images, (classes.gpu() if where.device == "mixed" else classes)


def build_pipeline(split: Split, cfg, train: bool, where: Placement):
    from nvidia.dali import fn, pipeline_def, types

    # the reader's seed is the run's (one shuffle for all ranks); the augmentation's differs per rank
    @pipeline_def(batch_size=where.batch, num_threads=where.threads, device_id=where.device_id,
                  seed=derive_seed(cfg.seed or 0, where.rank) % (2 ** 31) + 1, prefetch_queue_depth=2)
    def pipe():
        return graph(fn, types, split, cfg, train, where)

    pipeline = pipe()
    pipeline.build()
    return pipeline


class DaliLoader(Loader):
    """(uint8 N x 3 x H x W images with NHWC memory, int64 labels), both on the GPU (on the CPU with a
    `device="cpu"` graph), `len()` batches: the DALI epoch's `steps`, or the first `limit` of them
    (--steps-per-epoch). DALI reshuffles by itself after every epoch (the reader's shuffle_after_epoch).

    Every pass starts at the start of a DALI epoch. DALI's iterator cannot be reset part-way (reset()
    ignores the request mid-epoch), so a pass that ended early (`limit` below the epoch, a run stopped
    part-way, a rank whose shard holds one batch more than `steps`) left it mid-epoch; the next pass first
    reads the rest of that epoch and drops it (`_finish_dali_epoch`). That costs decoding the rest of the
    epoch; doing it then, not after the last batch, keeps it out of the timed steps, and a run's last
    epoch never pays it."""

    def __init__(self, iterator, split: Split, steps: int, batch: int, limit: int | None = None):
        self.iterator, self.batch_size = iterator, batch
        self.steps = min(steps, limit) if limit else steps
        self.num_samples = len(split.samples)
        self.mid_epoch = False  # the DALI iterator gave batches of an epoch and has not ended that epoch

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        # dropping start_step batches of a new pipeline would not skip the checkpoint's batches: a fresh
        # reader starts its shuffle sequence over, so they are other files than the ones trained on
        if start_step > 0:
            raise UserError(f"--resume: the checkpoint stopped after {start_step} steps of epoch {epoch + 1}, and "
                            f"--loader dali cannot continue an epoch part-way (a new DALI reader starts its own "
                            f"file order, so it cannot leave out the images already trained on); resume with "
                            f"--loader tv, which runs the epoch's remaining steps in its own order (some of the "
                            f"epoch's images repeat, others are left out); --loader dali can resume from a "
                            f"checkpoint written at the end of an epoch")

    def _finish_dali_epoch(self) -> None:
        """Read the DALI iterator to the end of its epoch (auto_reset then starts the next one). Only while
        mid-epoch: at an epoch boundary another read would start, and eat, a whole new epoch."""
        while self.mid_epoch:
            self.mid_epoch = next(self.iterator, None) is not None

    def _batches(self):
        for _ in range(self.steps):
            out = next(self.iterator, None)
            self.mid_epoch = out is not None
            if out is None:  # the DALI epoch ended (auto_reset started the next): fewer batches than steps
                return
            yield out[0]["images"].permute(0, 3, 1, 2), out[0]["labels"].reshape(-1).long()

    def __iter__(self):
        self._finish_dali_epoch()
        return self._batches()


def dali_loaders(cfg, ctx, need_train: bool, log=print) -> tuple:
    """(classes, train loader or None, val loader) of an image folder, decoded on this rank's GPU."""
    # checked first, so that the refusal is the same on any machine (not masked by the device check);
    # training only: an evaluation never augments, whatever settings it carries
    extras = ([f"--auto-augment {cfg.auto_augment}"] if cfg.auto_augment else []) + \
             ([f"--random-erase {cfg.random_erase:g}"] if cfg.random_erase > 0 else [])
    if need_train and extras:
        raise UserError(f"{' and '.join(extras)}: not available with --loader dali (its GPU graph only crops, "
                        f"resizes and flips); use --loader tv, which applies them on the CPU workers")
    if ctx.device.type != "cuda":
        raise UserError("--loader dali decodes on a CUDA GPU; this run's device is "
                        f"{ctx.device.type} (use --loader tv)")
    try:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError:
        raise UserError("--loader dali needs NVIDIA DALI: pip install -e \".[dali]\" (nvidia-dali-cuda130)")
    train_split, val_split = scan_dataset(cfg.data_path, need_train=need_train)
    per_rank, workers = per_process(cfg, ctx)
    where = Placement(per_rank, ctx.rank, ctx.world_size, ctx.device.index or 0, max(1, workers))

    def loader(split, train):
        iterator = DALIGenericIterator([build_pipeline(split, cfg, train, where)], ["images", "labels"],
                                       reader_name=READER, auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL)
        n = len(split.samples)
        if train:  # the smallest rank shard (floor(n / world)) decides: every rank runs the same steps
            steps = (n // ctx.world_size) // per_rank
            if steps < 1:
                raise UserError(f"--data_path {cfg.data_path}: {n} training images are fewer than one batch "
                                f"of {per_rank} per process")
        else:
            shard = n * (ctx.rank + 1) // ctx.world_size - n * ctx.rank // ctx.world_size  # DALI's split
            steps = math.ceil(shard / per_rank)
        return DaliLoader(iterator, split, steps, per_rank, cfg.steps_per_epoch if train else None)

    train_loader = loader(train_split, True) if need_train else None
    log(f"--loader dali: GPU decoding with {where.threads} CPU thread(s) per process")
    return val_split.classes, train_loader, loader(val_split, False)
