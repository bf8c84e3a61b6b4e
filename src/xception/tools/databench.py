"""`xception bench --mode data`: images per second of our input pipeline and, in the same run and over the
same files, of the PIL + torchvision transforms v1 ImageFolder baseline (float tensors normalised on the
worker, the seed's loader). Timed passes alternate between the two, so a busy machine slows both alike."""

from __future__ import annotations

import json
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
from ..data.transforms import Uint8Train, collate
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


def _loaders(root: str, args):
    size = args.image_size
    baseline = datasets.ImageFolder(root, v1.Compose([
        v1.RandomResizedCrop(size), v1.RandomHorizontalFlip(), v1.ToTensor(),
        v1.Normalize([PIXEL_MEAN] * 3, [PIXEL_STD] * 3)]))
    ours = FolderDataset(scan_split(root), Uint8Train(size))
    common = dict(batch_size=args.batch_size, num_workers=args.workers, shuffle=True,
                  persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))
    return (DataLoader(ours, collate_fn=_Stamped(collate), **common),
            DataLoader(baseline, collate_fn=_Stamped(default_collate), **common), len(ours))


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
    ours, baseline, files = _loaders(root, args)
    workers = max(1, args.workers)
    if files < 2 * args.batch_size * workers:
        raise UserError(f"{root}: {files} images; the data benchmark needs at least two batches per worker "
                        f"(2 x -b {args.batch_size} x {workers})")
    wall = {"ours": [], "baseline": []}
    cpu = {"ours": [], "baseline": []}
    for loader in (ours, baseline):  # warm the page cache and start the workers
        _timed_pass(loader)
    for _ in range(max(1, args.repeats)):
        for name, loader in (("ours", ours), ("baseline", baseline)):
            n, seconds, per_cpu = _timed_pass(loader)
            wall[name].append(n / seconds)
            cpu[name].append(per_cpu)
    med = {k: statistics.median(v) for k, v in wall.items()}
    core = {k: statistics.median(v) for k, v in cpu.items()}
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
        "cpus_available": cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def run_data_bench(args) -> int:
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
    if args.json:
        print(json.dumps(result))
    else:
        print(f"input pipeline, train transform at {result['image_size']} px, {result['files']} files, "
              f"-j {result['workers']}, -b {result['batch_size']}, median of {result['repeats']}")
        print(f"  ours      {result['ours_img_s']:8.1f} img/s  ({result['per_worker_img_s']:.1f} per worker)")
        print(f"  baseline  {result['baseline_img_s']:8.1f} img/s  "
              f"({result['baseline_per_worker_img_s']:.1f} per worker)")
        print(f"  ratio     {result['ratio']:8.2f}x per core ({result['ours_img_per_cpu_s']:.1f} vs "
              f"{result['baseline_img_per_cpu_s']:.1f} img per worker CPU-second); {result['ratio_wall']:.2f}x "
              f"in img/s (load average {result['load_average_1min']})")
    return 0
