"""Image folders -> uint8 batches -> normalised device tensors.

Workers decode, crop, resize and flip images as uint8 (four times less memory traffic than float);
conversion to float, scaling to [-1, 1] and the memory layout happen on the device, in `to_device`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

from .config import Config, UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Split:
    root: str
    classes: list
    samples: list  # (path, class index)


def scan_split(root: str) -> Split:
    """List `root/<class>/<image>`; refuse a missing split, an empty class or a split without images."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: no such folder; the data path must hold train/ and val/, "
                        f"each with one sub-folder per class")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"{root}: no class folders; put each class's images in {root}/<class>/")
    samples, empty = [], []
    for index, name in enumerate(classes):
        files = []
        for folder, _, names in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
        if not files:
            empty.append(name)
        samples += [(path, index) for path in files]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise UserError(f"{root}: class folder(s) without images: {shown}; add images or remove them")
    return Split(root, classes, samples)


def scan_dataset(data_path: str, need_train: bool = True) -> tuple:
    """The seed's layout, DATA/train/<class>/ and DATA/val/<class>/, with identical class lists."""
    if not os.path.exists(data_path):
        raise UserError(f"--data_path {data_path}: no such folder")
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path}: is a file; give the folder that holds train/ and val/")
    missing = [s for s in (("train", "val") if need_train else ("val",))
               if not os.path.isdir(os.path.join(data_path, s))]
    if missing:
        raise UserError(f"--data_path {data_path}: no {' or '.join(s + '/' for s in missing)} folder; "
                        f"expected {data_path}/train/<class>/<image> and {data_path}/val/<class>/<image>")
    val = scan_split(os.path.join(data_path, "val"))
    if not need_train:
        return None, val
    train = scan_split(os.path.join(data_path, "train"))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(f"--data_path {data_path}: train/ and val/ must hold the same classes; "
                        f"only in train: {only_train or 'none'}; only in val: {only_val or 'none'}")
    if len(train.classes) < 2:
        raise UserError(f"--data_path {data_path}: only one class ({train.classes[0]}); a classifier needs at "
                        f"least two class folders in train/ and val/")
    return train, val


def load_rgb(path: str) -> Image.Image:
    """Open any supported image as RGB, honouring the EXIF orientation (as a camera shows the photo)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            img = img.point(lambda v: v * (1 / 256)).convert("L")  # 16-bit -> 8-bit, not clipped
        elif img.mode == "P":
            img = img.convert("RGBA")  # palette transparency is resolved through RGBA
        return img.convert("RGB")


def train_transform(cfg: Config) -> v2.Compose:
    steps = [v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.crop_scale), antialias=True)]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + [v2.PILToTensor()])


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    return int(image_size / crop_pct)


def eval_transform(image_size: int, crop_pct: float) -> v2.Compose:
    return v2.Compose([
        v2.Resize(eval_resize_size(image_size, crop_pct), interpolation=v2.InterpolationMode.BICUBIC,
                  antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
    ])


class FolderDataset(Dataset):
    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.samples)

    def __getitem__(self, index: int):
        path, target = self.split.samples[index]
        return self.transform(load_rgb(path)), target


class ShardSampler(Sampler):
    """Rank r takes samples r, r+W, r+2W, ...: every sample exactly once, no padding, no dropped tail."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW batch -> float on `device`, scaled to [-1, 1] (mean = std = 0.5), in the model's layout."""
    images = images.to(device, non_blocking=True).float().mul_(1 / 127.5).sub_(1.0)
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def split_workers(total: int, world_size: int) -> int:
    """--workers is the job's total per node, as in the seed; each process gets its share, capped at the
    CPUs this process may use (more workers than cores only adds contention)."""
    if not total:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(total // world_size, cpus)


def make_loader(dataset: Dataset, cfg: Config, dist, train: bool, generator: torch.Generator) -> DataLoader:
    per_rank = cfg.batch_size // dist.world_size
    if train:
        # DistributedSampler also with one process: the data order then depends on the seed and epoch
        # only, so the union of the ranks' batches equals the one-process batch at every step.
        # (preempt.ResumableSampler is torch's DistributedSampler that can also start mid-epoch.)
        from .preempt import ResumableSampler
        sampler = ResumableSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed or 0)
    else:
        sampler = ShardSampler(len(dataset), dist.rank, dist.world_size)
    workers = split_workers(cfg.workers, dist.local_world_size)
    return DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=workers,
        pin_memory=dist.device.type == "cuda", drop_last=train and len(dataset) >= cfg.batch_size,
        persistent_workers=workers > 0, generator=generator,
        collate_fn=getattr(dataset, "collate_fn", None),  # decode.FastFolderDataset: NHWC uint8 batches
    )
