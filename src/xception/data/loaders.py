"""What the engine may rely on from an input pipeline (`Loader`), and the image-folder pipeline that
implements it with a torch DataLoader. The shard-set and DALI pipelines implement the same class.

Workers decode, crop, resize and flip images as uint8 (four times less memory traffic than float);
conversion to float, scaling to [-1, 1] and the memory layout happen on the device, in `to_device`. On
CUDA and NPU the next batch's host-to-device copy runs on a side stream while the current step computes.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from ..config import PIXEL_MEAN, PIXEL_STD, derive_seed
from ..files import show
from ..runtime import accelerator_module, cpu_count
from .check import BadImageError, failed_sample
from .folder import Split
from .transforms import FileTransform, collate

MAX_SKIPS_IN_A_ROW = 32  # a loader that meets this many bad files in a row is looking at a broken dataset
COUNTER_SLOTS = 257  # one slot per loader worker (and the main process), so no two writers share one


class Loader:
    """An epoch's batches on one process, as the engine sees them:

    * iterating yields (images, targets): images uint8, N x 3 x H x W (NHWC memory on the fast paths), on
      the CPU or already on the device (DALI); targets int64 class indices, or in a multi-label run float32
      multi-hot rows (N x classes);
    * `len()` is the number of batches this process yields in an epoch (every process the same in training);
    * `batch_size` is the per-process batch, `num_samples` the images of the split over all processes;
    * `set_epoch(epoch, start_step)` before each training epoch: the epoch's order, starting after
      `start_step` batches (a resumed epoch); iterating right after it skips them before returning (DALI
      cannot continue an epoch part-way: it raises UserError for start_step > 0);
    * `skipped()` counts the bad images this process has skipped so far (--skip-bad-images);
    * `class_counts`: the split's images per class, or None where the pipeline does not know them.
    """

    batch_size: int
    num_samples: int
    class_counts: list | None = None  # images per class in the split, where the pipeline knows them

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple]:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        raise NotImplementedError

    def skipped(self) -> int:
        return 0

    def sample_names(self) -> list | None:
        """Each sample's name (its path, or what names a dataset row) in the split's order, where the pipeline
        lists its samples (image folders, list files, datasets); None where it streams them (shards, DALI)."""
        return None

    def sample_groups(self) -> list | None:
        """Each sample's group (a list file's group column), in the split's order; None without one."""
        return None


def per_process(cfg, ctx) -> tuple:
    """(batch per process, loader workers per process). -b is the global batch and --workers the node's
    total, as in the seed; a process's workers are capped at the CPUs it may use (more only contend)."""
    workers = min(cfg.workers // ctx.local_world_size, cpu_count()) if cfg.workers else 0
    return cfg.batch_size // ctx.world_size, workers


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW batch -> float on `device`, normalised to [-1, 1], in the model's memory layout."""
    images = images.to(device, non_blocking=True).float().mul_(1 / (255 * PIXEL_STD)).sub_(PIXEL_MEAN / PIXEL_STD)
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def pinned(device: torch.device) -> bool:
    """Collate into pinned host memory on CUDA and NPU (torch pins for the current accelerator), so that
    the copy to the device can overlap the step."""
    return accelerator_module(device) is not None


def prefetch(batches, device: torch.device):
    """Yield `batches` with their tensors on `device`; on CUDA and NPU the next one is copied on a side
    stream (from the pinned memory the loader collated it into) while the current step runs."""
    module = accelerator_module(device)  # torch.cuda or torch.npu: the same stream API
    if module is None:
        yield from batches
        return
    stream = module.Stream(device)

    def start(batch):
        with module.stream(stream):
            return tuple(x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x for x in batch)

    ahead = None
    for batch in batches:
        queued = start(batch)  # runs during the step on `ahead`
        if ahead is not None:
            yield ahead
        current = module.current_stream(device)
        current.wait_stream(stream)  # the copy has landed before the step reads it
        for x in queued:
            if isinstance(x, torch.Tensor):
                x.record_stream(current)  # its memory is not reused while the step still reads it
        ahead = queued
    if ahead is not None:
        yield ahead


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler that can start part-way through an epoch: `skip` samples of this rank's
    share are left out of the next pass (set after set_epoch), without loading them."""

    skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


class BalancedSampler(Sampler):
    """--sampler balanced: every class equally likely at every draw (each sample weighs 1 / its class's
    count), drawn with replacement; an epoch has as many draws as the split has samples, rounded up to a
    multiple of the ranks. All ranks make the same global draw from a generator seeded by (seed, epoch), and
    rank r takes draws r, r+W, r+2W, ...: disjoint shares of equal length, whose batches together are the
    one-process batches. `skip` draws of this rank's share are left out of the next pass (set after set_epoch),
    as in ResumableSampler."""

    skip = 0

    def __init__(self, targets, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if targets.numel() == 0:
            raise ValueError("BalancedSampler needs at least one sample")
        self.weights = 1.0 / torch.bincount(targets).double()[targets]
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = -(-targets.numel() // num_replicas)  # per rank
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skip = epoch, 0

    def global_draw(self) -> torch.Tensor:
        """The epoch's draws over all ranks (sample indices)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)

    def __iter__(self):
        share = self.global_draw()[self.rank::self.num_replicas]
        return iter(share[self.skip:].tolist())

    def __len__(self) -> int:
        return self.num_samples


class EvalSampler(Sampler):
    """Rank r takes samples r, r+W, r+2W, ...: every sample exactly once, no padding, no dropped tail."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def multi_hot(indices: tuple, num_classes: int) -> torch.Tensor:
    """A multi-label sample's target: 1.0 at its classes, 0.0 elsewhere (no class: all zero)."""
    row = torch.zeros(num_classes, dtype=torch.float32)
    row[list(indices)] = 1.0
    return row


def class_counts(split: Split) -> list:
    """Images per class (multi-label: images holding the class)."""
    targets = [target for _, target in split.samples]
    if split.multi_label:
        targets = [i for labels in targets for i in labels]
    return torch.bincount(torch.tensor(targets, dtype=torch.int64), minlength=len(split.classes)).tolist()


class FolderDataset(Dataset):
    """(uint8 image, class) for each sample of an image-folder split (multi-label: a multi-hot row). A file
    that fails to load stops the run with one line naming it or, with `skip_bad`, is logged, counted and
    replaced by the next sample (so batches keep their size and the run its data order)."""

    def __init__(self, split: Split, transform: FileTransform, skip_bad: bool = False):
        self.split, self.transform, self.skip_bad = split, transform, skip_bad
        self.counts = torch.zeros(COUNTER_SLOTS, dtype=torch.int64).share_memory_()
        self.num_classes = len(split.classes) if split.multi_label else None

    def __len__(self) -> int:
        return len(self.split.samples)

    def __getitem__(self, index: int):
        for _ in range(MAX_SKIPS_IN_A_ROW):
            path, target = self.split.samples[index]
            try:
                image = self.load(path)
                return image, (target if self.num_classes is None else multi_hot(target, self.num_classes))
            except Exception as e:  # any decoder failure; failed decides what it means
                self.failed(path, e)
                info = get_worker_info()
                self.counts[0 if info is None else 1 + info.id % (COUNTER_SLOTS - 1)] += 1
                index = (index + 1) % len(self)
        raise BadImageError(f"{self.name(self.split.samples[index][0])}: {MAX_SKIPS_IN_A_ROW} unreadable files in a "
                            f"row; run `xception check-data` on the dataset and fix it")

    # How a sample's key (a file path here) is read, judged when it fails, and named: a dataset whose
    # samples are not files (data/hfds.py) overrides these three.
    def load(self, path) -> torch.Tensor:
        return self.transform.load(path)

    def failed(self, path, exc: Exception) -> None:
        failed_sample(path, exc, self.skip_bad)

    def name(self, path) -> str:
        return show(path)


class FolderLoader(Loader):
    """An image-folder split through a torch DataLoader. Training: DistributedSampler order (also with one
    process, so the data order depends on the seed and epoch only, and the ranks' batches together are the
    one-process batch), or with --sampler balanced BalancedSampler's, full batches; evaluation: each rank
    its EvalSampler share, the last batch partial."""

    def __init__(self, dataset: FolderDataset, cfg, ctx, train: bool, generator: torch.Generator):
        self.dataset, self.device, self.train = dataset, ctx.device, train
        self.batch_size, workers = per_process(cfg, ctx)
        self.num_samples = len(dataset)
        self.class_counts = class_counts(dataset.split)
        if train and getattr(cfg, "sampler", "shuffle") == "balanced":
            targets = [target for _, target in dataset.split.samples]
            self.sampler = BalancedSampler(targets, ctx.world_size, ctx.rank, seed=cfg.seed or 0)
        elif train:
            self.sampler = ResumableSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed or 0)
        else:
            self.sampler = EvalSampler(len(dataset), ctx.rank, ctx.world_size)
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=pinned(ctx.device),
                                 drop_last=train and len(dataset) >= cfg.batch_size,
                                 persistent_workers=workers > 0, generator=generator, collate_fn=collate)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.sampler.skip = start_step * self.batch_size  # left out unread

    def __iter__(self):
        return prefetch(iter(self.loader), self.device)

    def skipped(self) -> int:
        return int(self.dataset.counts.sum())

    def sample_names(self) -> list:
        return [self.dataset.name(key) for key, _ in self.dataset.split.samples]

    def sample_groups(self) -> list | None:
        return self.dataset.split.groups


def skip_batches(batches: Iterator, steps: int) -> Iterator:
    """For pipelines that cannot leave samples out unread: read and drop the first `steps` batches now."""
    for _ in range(steps):
        next(batches, None)
    return batches
