"""`xception models`: the Xception family in one table: parameters, GFLOPs at the default input (torch's
flop counter), the ImageNet top-1 published for each arch's weights (not reproduced here), and with
--measure the CPU inference img/s of this machine (BatchNorm folded, channels_last, fp32)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from ..model.deploy import fold_batchnorm
from ..model.family import ARCH_NAMES, arch_info, build_arch
from .bench import _time_model, forward_gflop


def parameters(arch: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_arch(arch).parameters())


def measure(arch: str, image_size: int, batch: int, repeats: int) -> float:
    """Median inference img/s of `arch` on this CPU, timed as `xception bench --mode infer` does."""
    torch.manual_seed(0)
    model = fold_batchnorm(build_arch(arch).eval())
    args = SimpleNamespace(batch_size=batch, image_size=image_size, dtype="float32", optimizer_impl="foreach",
                           warmup=1, repeats=repeats, steps=1, mixup=0.0, cutmix=0.0)
    return _time_model(model, args, torch.device("cpu"), channels_last=True, train=False)["median"]


def table(image_size: int | None, do_measure: bool, batch: int, repeats: int) -> list:
    rows = []
    for arch in ARCH_NAMES:
        info = arch_info(arch)
        size = image_size or info.image_size
        row = {"arch": arch, "params": parameters(arch), "image_size": size,
               "gflops": forward_gflop(size, arch), "top1": info.top1, "top5": info.top5,
               "published": info.published, "timm_name": info.timm_name}
        if do_measure:
            row["cpu_img_s"] = measure(arch, size, batch, repeats)
        rows.append(row)
    return rows


def run(args) -> int:
    rows = table(args.image_size, args.measure, args.batch_size, args.repeats)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'arch':12s} {'params':>11s} {'GFLOPs':>7s} {'px':>4s} "
          + (f"{'CPU img/s':>9s} " if args.measure else "") + "published ImageNet top-1/top-5 (not reproduced here)")
    for r in rows:
        print(f"{r['arch']:12s} {r['params']:>11,d} {r['gflops']:7.2f} {r['image_size']:>4d} "
              + (f"{r['cpu_img_s']:9.2f} " if args.measure else "")
              + f"{r['top1']:.3f} / {r['top5']:.3f} ({r['published']})")
    if args.measure:
        print(f"CPU img/s: inference, batch {args.batch_size}, fp32, BatchNorm folded, channels_last, "
              f"{torch.get_num_threads()} threads, median of {args.repeats}")
    return 0
