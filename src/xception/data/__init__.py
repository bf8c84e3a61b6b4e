"""The input pipelines, behind one door: `build_loaders(cfg, ctx, need_train)`.

    folder.py      the DATA/train|val/<class>/<image> layout
    transforms.py  decoders and the two transform families (uint8 fast path, Pillow reference)
    check.py       decode check before training (with its cache), bad-file policy in the loaders
    loaders.py     the Loader contract the engine relies on; the image-folder pipeline; to_device
    shards.py      WebDataset shard sets from `xception prepare`, local or streamed
    dali.py        NVIDIA DALI, decoding on the GPU (--loader dali)
    hfds.py        Hugging Face datasets: save_to_disk folders, Parquet folders, hf:ORG/NAME
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import UserError
from .check import screen
from .dali import dali_loaders
from .folder import scan_dataset
from .hfds import hf_loaders, is_hf_source
from .listfile import read_list_splits
from .loaders import FolderDataset, FolderLoader, Loader, to_device
from .shards import is_shard_source, read_index, shard_loader
from .transforms import build_transform, collate

__all__ = ["Loaders", "Loader", "build_loaders", "calibration_images", "to_device"]


@dataclass
class Loaders:
    classes: list
    train: Loader | None  # None for an evaluation
    val: Loader
    skipped: int = 0  # bad files the decode check left out before the first epoch (--skip-bad-images)
    multi_label: bool = False  # targets are multi-hot rows (a list file with several labels per image)


def build_loaders(cfg, ctx, need_train: bool, generator: torch.Generator | None = None, log=print) -> Loaders:
    """The run's loaders for cfg.data_path: an image folder (--loader tv|pil, or dali) or a shard set.
    `generator` drives the training order and the workers' seeds (the engine reseeds it every epoch)."""
    listed = read_list_splits(cfg, need_train)  # a CSV --data_path or --train-list/--val-list, else None
    if listed is not None and listed[1].multi_label and need_train and cfg.sampler == "balanced":
        raise UserError("--sampler balanced draws each class equally often, which needs one label per image; "
                        "for a multi-label list use --sampler shuffle (and --loss asl against skew)")
    shard_set = bool(cfg.data_path) and is_shard_source(cfg.data_path)
    if need_train and cfg.sampler == "balanced" and (shard_set or cfg.loader == "dali"):
        raise UserError("--sampler balanced needs an image folder or a list file")
    hf_source = listed is None and bool(cfg.data_path) and is_hf_source(cfg.data_path)
    if hf_source and cfg.loader == "dali":
        raise UserError("--loader dali reads image folders; for a Hugging Face dataset use --loader tv (or auto)")
    if hf_source:
        return Loaders(*hf_loaders(cfg, ctx, need_train, generator or torch.Generator(), log))
    if cfg.loader == "dali":
        if shard_set:
            raise UserError("--loader dali reads image folders; for a shard set use --loader tv (or auto)")
        return Loaders(*dali_loaders(cfg, ctx, need_train, log))
    if shard_set:
        index, base = read_index(cfg.data_path)
        train = shard_loader(index, base, True, cfg, ctx, log) if need_train else None
        if train is not None:
            train.class_counts = index["splits"]["train"].get("class_counts")
        return Loaders(index["classes"], train, shard_loader(index, base, False, cfg, ctx, log))
    train_split, val_split = listed or scan_dataset(cfg.data_path, need_train=need_train)
    skipped = 0
    if cfg.check_data:
        (train_split, val_split), skipped = screen([train_split, val_split], cfg, ctx, log)

    def folder_loader(split, train: bool, gen: torch.Generator) -> FolderLoader:
        return FolderLoader(FolderDataset(split, build_transform(cfg, train), cfg.skip_bad_images), cfg, ctx, train, gen)

    train = folder_loader(train_split, True, generator or torch.Generator()) if need_train else None
    return Loaders(val_split.classes, train, folder_loader(val_split, False, torch.Generator()), skipped,
                   val_split.multi_label)


def calibration_images(cfg, n: int, seed: int = 0) -> torch.Tensor:
    """`n` images of the training split of an image folder or a list file (drawn with `seed`), through the
    eval transform, as the normalised float batch the model takes (INT8 calibration, tools/quantize.py)."""
    if n < 1:
        raise UserError(f"--calibration-images must be at least 1, got {n}")
    listed = read_list_splits(cfg, need_train=True)
    if listed is None and (is_shard_source(cfg.data_path) or is_hf_source(cfg.data_path)):
        raise UserError(f"--calibration {cfg.data_path}: give an image folder or a CSV list file")
    train, _ = listed or scan_dataset(cfg.data_path, need_train=True)
    chosen = torch.randperm(len(train.samples), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    dataset = FolderDataset(train, build_transform(cfg, False))
    images, _ = collate([dataset[i] for i in sorted(chosen)])
    return to_device(images, torch.device("cpu"), channels_last=False)
