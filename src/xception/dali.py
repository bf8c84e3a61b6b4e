"""`--loader dali`: NVIDIA DALI reads the image folder, decodes JPEGs on the GPU ("mixed": Huffman on the
CPU, the rest with nvJPEG) and crops, resizes and flips there; the optional extra `dali` installs it
(`pip install -e ".[dali]"`, the nvidia-dali-cuda130 wheel).

Same transforms as the CPU paths: train RandomResizedCrop (area --crop-scale, aspect 3/4..4/3, bilinear
with antialiasing) and a p=0.5 flip; eval resize of the short side to image_size / crop_pct (bicubic,
antialiased) and a centre crop. Batches stay uint8 NCHW (channels-last memory) for data.to_device.

Same sharding per rank: the reader's shard_id/num_shards are the rank and the world size. Training
reshuffles the whole list every epoch with the run's seed (the same permutation on every rank) and
runs floor(samples / world / per-rank batch) steps on every rank, so DDP never waits on a rank with a
shorter shard; evaluation pads the last batch and drops the padding, so every image counts once.
"""

from __future__ import annotations

import math

from .config import UserError
from .decode import RATIO

READER = "Reader"


def graph(fn, types, files, labels, train: bool, size: int, resize_to: int, crop_scale, hflip: bool,
          shard_id: int, num_shards: int, seed: int, device: str = "mixed"):
    """The DALI operator graph; returns (images, labels) as DataNodes. device "mixed" decodes on the GPU;
    "cpu" runs the same graph on the CPU (a check of the graph where there is no GPU)."""
    if train:  # one permutation per epoch, the same on every rank: the reader's own seed
        order = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed)
    else:  # every rank keeps its shard and pads its last batch (the iterator drops the padding)
        order = dict(stick_to_shard=True, pad_last_batch=True)
    jpegs, classes = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                     name=READER, **order)
    if train:
        images = fn.decoders.image_random_crop(jpegs, device=device, output_type=types.RGB,
                                               random_area=list(crop_scale), random_aspect_ratio=list(RATIO),
                                               num_attempts=10)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", mirror=mirror)
    else:
        images = fn.decoders.image(jpegs, device=device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=resize_to, interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", crop=(size, size))
    return images, (classes.gpu() if device == "mixed" else classes)


def build_pipeline(split, cfg, train: bool, batch: int, rank: int, world: int, device_id, threads: int,
                   device: str = "mixed"):
    from nvidia.dali import fn, pipeline_def, types

    from .data import eval_resize_size

    files = [path for path, _ in split.samples]
    labels = [target for _, target in split.samples]
    seed = cfg.seed or 0

    # the reader's seed is the run's (one shuffle for all ranks); the augmentation's differs per rank
    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed * 7919 + rank + 1,
                  prefetch_queue_depth=2)
    def pipe():
        return graph(fn, types, files, labels, train, cfg.image_size, eval_resize_size(cfg.image_size, cfg.crop_pct),
                     cfg.crop_scale, cfg.hflip, rank, world, seed, device)

    pipeline = pipe()
    pipeline.build()
    return pipeline


class _Epochs:
    def set_epoch(self, epoch: int) -> None:  # DALI reshuffles by itself after every epoch
        pass


class DaliLoader:
    """(uint8 N x 3 x H x W images with NHWC memory, int64 labels), both on the GPU, `steps` batches."""

    def __init__(self, iterator, split, steps: int):
        self.iterator, self.steps, self.sampler = iterator, steps, _Epochs()
        self.dataset = split.samples  # len(): the log line's image count

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step, out in enumerate(self.iterator):
            if step >= self.steps:
                self.iterator.reset()
                return
            images, labels = out[0]["images"], out[0]["labels"]
            yield images.permute(0, 3, 1, 2), labels.reshape(-1).long()


def make_dali_loaders(cfg, ctx, need_train: bool, log=print) -> tuple:
    if ctx.device.type != "cuda":
        raise UserError("--loader dali decodes on a CUDA GPU; this run's device is "
                        f"{ctx.device.type} (use --loader tv)")
    try:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError:
        raise UserError("--loader dali needs NVIDIA DALI: pip install -e \".[dali]\" (nvidia-dali-cuda130)")
    from .data import scan_dataset, split_workers

    train_split, val_split = scan_dataset(cfg.data_path, need_train=need_train)
    per_rank = cfg.batch_size // ctx.world_size
    threads = max(1, split_workers(cfg.workers, ctx.local_world_size))
    device_id = ctx.device.index or 0

    def loader(split, train):
        pipeline = build_pipeline(split, cfg, train, per_rank, ctx.rank, ctx.world_size, device_id, threads)
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator([pipeline], ["images", "labels"], reader_name=READER,
                                       last_batch_policy=policy, auto_reset=True)
        n = len(split.samples)
        if train:  # the smallest rank shard (floor(n / world)) decides: every rank runs the same steps
            steps = (n // ctx.world_size) // per_rank
            if steps < 1:
                raise UserError(f"--data_path {cfg.data_path}: {n} training images are fewer than one batch "
                                f"of {per_rank} per process")
        else:
            shard = n * (ctx.rank + 1) // ctx.world_size - n * ctx.rank // ctx.world_size  # DALI's split
            steps = math.ceil(shard / per_rank)
        return DaliLoader(iterator, split, steps)

    train_loader = loader(train_split, True) if need_train else None
    log(f"--loader dali: GPU decoding with {threads} CPU thread(s) per process")
    return val_split.classes, train_loader, loader(val_split, False)
