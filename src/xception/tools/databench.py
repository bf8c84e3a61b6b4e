"""`xception bench --mode data`: images per second of our input pipeline and, in the same run and over the
same files, of the PIL + torchvision transforms v1 ImageFolder baseline (float tensors normalised on the
worker, the seed's loader). With --auto-augment, also of our pipeline with that policy added (default
RandAugment settings), next to the plain one. Timed passes alternate between the pipelines, so a busy
machine slows them all alike."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate, get_worker_info
from torchvision import datasets
from torchvision import transforms as v1

from ..config import PIXEL_MEAN, PIXEL_STD, UserError
from ..data.folder import scan_split
from ..data.loaders import FolderDataset
from ..data.transforms import Uint8Train, auto_augment_op, collate
from ..runtime import cpu_count

SYNTHETIC_SIZE = (500, 375)  # ImageNet's most common photo size
SYNTHETIC_QUALITY = 90
SYNTHETIC_CLASSES = 4


def make_synthetic(root: str, count: int, seed: int = 0) -> str:
    """`count` photo-like JPEGs (smooth colour fields, mid-scale texture and sensor-like noise, ~70 KB each
    at quality 90, which decodes like a typical ImageNet photo) as root/train/<class>/<n>.jpg."""
    rng = np.random.default_rng(seed)
    w, h = SYNTHETIC_SIZE
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        texture = Image.fromarray(rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        pixels = (0.7 * np.asarray(coarse, np.float32) + 0.3 * np.asarray(texture, np.float32)
                  + rng.normal(0, 9, (h, w, 3)))
        folder = os.path.join(root, "train", f"class{i % SYNTHETIC_CLASSES}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"),
                                                                       quality=SYNTHETIC_QUALITY)
    return root


def _image_root(data_path: str) -> str:
    """DATA/train if there is one (the training layout), else DATA itself as an ImageFolder."""
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path}: no such folder")
    train = os.path.join(data_path, "train")
    return train if os.path.isdir(train) else data_path


class _Stamped:
    """A collate function that also returns (worker id, that worker's CPU seconds so far): the CPU time a
    pipeline costs, which a busy shared machine does not distort as it does wall time."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, batch):
        info = get_worker_info()
        return (*self.collate(batch), (-1 if info is None else info.id, time.process_time()))


def _loaders(root: str, args) -> tuple:
    """({name: DataLoader}, files): ours, the baseline and, with --auto-augment, ours augmented."""
    size = args.image_size
    baseline = datasets.ImageFolder(root, v1.Compose([
        v1.RandomResizedCrop(size), v1.RandomHorizontalFlip(), v1.ToTensor(),
        v1.Normalize([PIXEL_MEAN] * 3, [PIXEL_STD] * 3)]))
    split = scan_split(root)
    common = dict(batch_size=args.batch_size, num_workers=args.workers, shuffle=True,
                  persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))
    loaders = {"ours": DataLoader(FolderDataset(split, Uint8Train(size)), collate_fn=_Stamped(collate), **common),
               "baseline": DataLoader(baseline, collate_fn=_Stamped(default_collate), **common)}
    policy = getattr(args, "auto_augment", None)
    if policy:
        augmented = FolderDataset(split, Uint8Train(size, augment=auto_augment_op(policy)))
        loaders["augmented"] = DataLoader(augmented, collate_fn=_Stamped(collate), **common)
    return loaders, len(split.samples)


def _timed_pass(loader) -> tuple:
    """(images, wall seconds, images per CPU second of the workers) of one pass. Each worker's first
    batch is left out (start-up, first file reads): wall time runs from the first batch received, CPU
    time from each worker's first batch on."""
    batches = iter(loader)
    first = {}
    images = cpu_images = 0
    t0 = None
    for x, _, (worker, cpu) in batches:
        if t0 is None:
            t0 = time.perf_counter()
        else:
            images += x.shape[0]
        if worker not in first:
            first[worker] = [cpu, cpu]
        else:
            first[worker][1] = cpu
            cpu_images += x.shape[0]
    seconds = time.perf_counter() - t0
    cpu_seconds = sum(last - start for start, last in first.values())
    return images, seconds, cpu_images / max(cpu_seconds, 1e-9)


def measure(root: str, args) -> dict:
    torch.set_num_threads(1)  # one core per worker, as the loader runs them
    loaders, files = _loaders(root, args)
    workers = max(1, args.workers)
    if files < 2 * args.batch_size * workers:
        raise UserError(f"{root}: {files} images; the data benchmark needs at least two batches per worker "
                        f"(2 x -b {args.batch_size} x {workers})")
    wall = {name: [] for name in loaders}
    cpu = {name: [] for name in loaders}
    for loader in loaders.values():  # warm the page cache and start the workers
        _timed_pass(loader)
    for _ in range(max(1, args.repeats)):
        for name, loader in loaders.items():
            n, seconds, per_cpu = _timed_pass(loader)
            wall[name].append(n / seconds)
            cpu[name].append(per_cpu)
    result = _summary(wall, cpu, files, args)
    if "augmented" in loaders:
        result.update(_augmented_summary(wall, cpu, workers))
    return result


def _summary(wall: dict, cpu: dict, files: int, args) -> dict:
    med = {k: statistics.median(v) for k, v in wall.items()}
    core = {k: statistics.median(v) for k, v in cpu.items()}
    workers = max(1, args.workers)
    return {
        "mode": "data", "image_size": args.image_size, "batch_size": args.batch_size,
        "workers": args.workers, "files": files, "repeats": len(wall["ours"]),
        "ours_img_s": round(med["ours"], 1), "baseline_img_s": round(med["baseline"], 1),
        "ratio": round(core["ours"] / core["baseline"], 3),
        "ratio_wall": round(med["ours"] / med["baseline"], 3),
        "per_worker_img_s": round(med["ours"] / workers, 1),
        "baseline_per_worker_img_s": round(med["baseline"] / workers, 1),
        "ours_img_per_cpu_s": round(core["ours"], 1), "baseline_img_per_cpu_s": round(core["baseline"], 1),
        "ours_img_s_all": [round(r, 1) for r in wall["ours"]],
        "baseline_img_s_all": [round(r, 1) for r in wall["baseline"]],
        "pipeline": "decode_jpeg (Pillow draft for >=2x reductions, Pillow for other formats) + uint8 "
                    "RandomResizedCrop/flip, NHWC uint8 batches",
        "baseline": "ImageFolder + PIL + transforms v1 RandomResizedCrop/flip/ToTensor/Normalize",
        "ratio_is": "per core: images per worker CPU-second, ours / baseline (ratio_wall: img/s ours / baseline)",
        "auto_augment": getattr(args, "auto_augment", None),
        "cpus_available": cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _augmented_summary(wall: dict, cpu: dict, workers: int) -> dict:
    """Our pipeline with and without the auto-augment policy, from the same alternating passes."""
    plain, augmented = statistics.median(wall["ours"]), statistics.median(wall["augmented"])
    plain_core, augmented_core = statistics.median(cpu["ours"]), statistics.median(cpu["augmented"])
    return {
        "plain_img_s": round(plain, 1), "augmented_img_s": round(augmented, 1),
        "augmented_per_worker_img_s": round(augmented / workers, 1),
        "plain_img_per_cpu_s": round(plain_core, 1), "augmented_img_per_cpu_s": round(augmented_core, 1),
        "augmented_img_s_all": [round(r, 1) for r in wall["augmented"]],
        # per core, as `ratio`: what the policy costs, without a busy machine's noise in wall time
        "augment_cost": round(plain_core / augmented_core, 3),
    }


def run_data_bench(args) -> dict:
    if args.synthetic is None and not args.data_path:
        raise UserError("bench --mode data needs --data_path DIR or --synthetic N")
    if args.synthetic is not None and args.synthetic < 1:
        raise UserError(f"--synthetic must be a positive number, got {args.synthetic}")
    if args.batch_size < 1 or args.workers < 0:
        raise UserError("-b must be positive and -j 0 or more")
    with tempfile.TemporaryDirectory(prefix="xception-databench-") as tmp:
        if args.synthetic is not None:
            root = os.path.join(make_synthetic(tmp, args.synthetic), "train")
        else:
            root = _image_root(args.data_path)
        result = measure(root, args)
    return result


def print_data_bench(result: dict) -> None:
    print(f"input pipeline, train transform at {result['image_size']} px, {result['files']} files, "
          f"-j {result['workers']}, -b {result['batch_size']}, median of {result['repeats']}")
    print(f"  ours      {result['ours_img_s']:8.1f} img/s  ({result['per_worker_img_s']:.1f} per worker)")
    print(f"  baseline  {result['baseline_img_s']:8.1f} img/s  "
          f"({result['baseline_per_worker_img_s']:.1f} per worker)")
    print(f"  ratio     {result['ratio']:8.2f}x per core ({result['ours_img_per_cpu_s']:.1f} vs "
          f"{result['baseline_img_per_cpu_s']:.1f} img per worker CPU-second); {result['ratio_wall']:.2f}x "
          f"in img/s (load average {result['load_average_1min']})")
    if "augmented_img_s" in result:
        print(f"  ours + {result['auto_augment']:<6}{result['augmented_img_s']:6.1f} img/s  "
              f"({result['augmented_per_worker_img_s']:.1f} per worker; plain {result['plain_img_s']:.1f}: "
              f"{result['augment_cost']:.2f}x the CPU time per image)")
