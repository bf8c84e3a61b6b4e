"""`xception bench`: time our training or inference step against timm's legacy_xception, or the input
pipeline (--mode data, in databench.py)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["train", "infer", "data"], default="train",
                   help="train: forward+backward+SGD step; infer: forward; data: the input pipeline")
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median, min and max are reported)")
    p.add_argument("--data_path", "--data-path", dest="data_path", default=None,
                   help="--mode data: an image folder (DATA/train/<class>/<image>) to read")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="--mode data: generate N ImageNet-like 500x375 JPEGs instead of --data_path")
    p.add_argument("-j", "--workers", type=int, default=1, help="--mode data: loader workers")


def run(args: argparse.Namespace) -> int:
    if args.mode == "data":
        from .databench import run_data_bench
        return run_data_bench(args)
    raise NotImplementedError  # filled in by the compute benchmark
