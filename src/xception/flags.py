"""Every flag of every command, one function per group; cli.py puts them together into the parsers."""

from __future__ import annotations

import argparse

from .config import (DEFAULT_CROP_PCT, DEFAULT_IMAGE_SIZE, DEFAULT_OPSET, LOADERS, MIN_INPUT_SIZE,
                     ShardSettings)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: what is wrong, and where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data_path", "--data-path", dest="data_path", required=True, metavar="DIR",
                   help="dataset root holding train/<class>/<image> and val/<class>/<image>")
    g.add_argument("-j", "--workers", type=_int, default=4,
                   help="data-loading worker processes in total, split over the processes (default 4)")
    g.add_argument("--image-size", type=_int, default=None,
                   help=f"input resolution (default {DEFAULT_IMAGE_SIZE}; eval: the weights' own; min {MIN_INPUT_SIZE})")
    g.add_argument("--crop-pct", type=float, default=None,
                   help=f"eval: resize the short side to image-size/crop-pct, then centre-crop (default "
                        f"{DEFAULT_CROP_PCT}; eval: the weights' own; the seed used 299/342 = 0.874)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="train: RandomResizedCrop area range (default 0.08 1)")
    g.add_argument("--no-hflip", dest="hflip", action="store_false", help="train: no horizontal flips")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="log, count and skip images that fail to decode (default: stop at the first, naming it)")
    g.add_argument("--loader", choices=LOADERS, default="auto",
                   help="input pipeline: tv = TorchCodec decoding + uint8 transforms (auto, the fastest CPU "
                        "path); pil = Pillow + transforms; dali = NVIDIA DALI, decoding on the GPU. "
                        "--data_path may also be a shard set from xception prepare (folder or URL)")
    g.add_argument("--no-check-data", dest="check_data", action="store_false",
                   help="skip the decode check of new and changed images before the first epoch")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("-b", "--batch-size", type=_int, default=256,
                   help="global batch size, split over the processes as in the seed (default 256)")
    g.add_argument("--device", default="auto", help="auto (cuda, then npu, then mps, then cpu), cpu, cuda, "
                                                    "cuda:N, npu, mps")
    g.add_argument("--output-dir", default=".", help="where checkpoints, metrics.csv and logs go (default .)")
    g.add_argument("--amp", action="store_true", help="mixed precision (torch.amp autocast)")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"],
                   help="autocast dtype with --amp (default float16, with loss scaling)")
    g.add_argument("--loss-scale", default=None, help="fp16 loss scale: a number (static) or 'dynamic' (default)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: the measured best for the device)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (default off, see docs/performance.md); its compile time is "
                        "logged on its own and kept out of img/s")
    g.add_argument("--dist-backend", default=None, help="process-group backend (default by device: nccl, hccl, gloo)")
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes")
    g.add_argument("--multiprocessing-distributed", action="store_true",
                   help="start one process per visible GPU/NPU on this node (or --nproc on CPU), via torchrun")
    g.add_argument("--nproc", type=_int, default=None, metavar="N",
                   help="start N processes on this node (implies --multiprocessing-distributed)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, saved in the checkpoint)")
    g.add_argument("-p", "--print-freq", type=_int, default=10, help="log every N iterations (default 10)")
    g.add_argument("--case-name", default=None, help="name of the seed-style ${CaseName}.log summary file; {bs} and "
                   "{np} stand for the global batch and the process count (default Xception_bs{bs}_{np}p_acc, or _eval)")
    g.add_argument("-a", "--arch", default="xception", choices=["xception"], help=argparse.SUPPRESS)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_int, default=90, help="epochs to train (default 90)")
    g.add_argument("--steps-per-epoch", type=_int, default=None, metavar="N",
                   help="end each epoch after N steps (short performance runs; default: the whole epoch)")
    g.add_argument("--stop-after-epochs", type=_int, default=None, metavar="K",
                   help="stop this run after epoch K (the LR schedule still spans --epochs); continue later "
                        "with --resume, e.g. under a job time limit")
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4,
                   help="weight decay (default 1e-4)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default 0)")
    g.add_argument("--warmup-epochs", "--warm_up_epochs", dest="warmup_epochs", type=float, default=0.0,
                   help="linear warm-up epochs before the cosine decay (default 0)")
    g.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the classifier (paper: 0.5)")
    g.add_argument("--resume", default=None, metavar="PATH", help="continue from this checkpoint; 'auto': from "
                                                                  "OUTPUT_DIR/checkpoint.pth.tar if it exists")
    g.add_argument("--max-nonfinite-steps", type=_int, default=10, metavar="K",
                   help="with fp16 loss scaling, stop after K non-finite losses in a row (default 10); "
                        "without loss scaling the first one stops the run")
    g.add_argument("--pretrained", default=None, metavar="PATH",
                   help="start from these weights: our checkpoint, timm/Cadene legacy_xception .pth or "
                        ".safetensors, or a Keras .h5 (format detected); a classifier of another class "
                        "count is replaced")
    g.add_argument("--freeze-epochs", type=_int, default=0, metavar="K",
                   help="train only the classifier for the first K epochs (backbone and its BatchNorm "
                        "statistics frozen), then the whole network (default 0)")
    g.add_argument("--tensorboard", action="store_true",
                   help="log scalars to OUTPUT_DIR/tensorboard every print interval and every epoch")
    g.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the --resume checkpoint on val/")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    add_data_flags(p)
    add_run_flags(p)
    p.add_argument("--resume", "--weights", dest="resume", required=True, metavar="PATH",
                   help="checkpoint (or weights file) to evaluate, or an .onnx file from xception export")
    p.add_argument("--report", dest="eval_report", action="store_true",
                   help="also write per_class.csv, confusion.csv and confusion.png to --output-dir")


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="xception-demo", help="where data, checkpoint and metrics go "
                                                                "(default ./xception-demo)")
    p.add_argument("--epochs", type=_int, default=None, help="override the demo's epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("-j", "--workers", type=_int, default=None, help="override the demo's workers")


def add_predict_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--weights", required=True, metavar="PATH",
                   help="our checkpoint, a timm/Cadene .pth/.safetensors, a Keras .h5, or an exported .onnx")
    p.add_argument("--topk", type=_int, default=5, metavar="K", help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("-b", "--batch-size", type=_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("-j", "--workers", type=_int, default=0, help="image-decoding worker processes (default 0)")
    p.add_argument("--image-size", type=_int, default=None, help="override the weights' input resolution")
    p.add_argument("--crop-pct", type=float, default=None, help="override the weights' eval crop fraction")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")


def add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, metavar="CKPT",
                   help="weights to export: our checkpoint, or a timm/Cadene/Keras weights file")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="graph format")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the graph")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="ONNX: the batch dimension is dynamic (default: fixed at 1); TorchScript always is")
    p.add_argument("--opset", type=_int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset version (default {DEFAULT_OPSET})")
    p.add_argument("--image-size", type=_int, default=None, metavar="N",
                   help=f"input resolution of the graph (default: the checkpoint's, else {DEFAULT_IMAGE_SIZE})")


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["train", "infer", "data"], default="train",
                   help="train: forward+backward+SGD step; infer: forward; data: the input pipeline")
    p.add_argument("--image-size", type=_int, default=DEFAULT_IMAGE_SIZE)
    p.add_argument("-b", "--batch-size", type=_int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--repeats", type=_int, default=5, help="timed repeats (median, min and max are reported)")
    p.add_argument("--data_path", "--data-path", dest="data_path", default=None,
                   help="--mode data: an image folder (DATA/train/<class>/<image>) to read")
    p.add_argument("--synthetic", type=_int, default=None, metavar="N",
                   help="--mode data: generate N ImageNet-like 500x375 JPEGs instead of --data_path")
    p.add_argument("-j", "--workers", type=_int, default=1, help="--mode data: loader workers")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, npu or mps (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="float32, or autocast to float16/bfloat16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="our model in NHWC (default on)")
    p.add_argument("--timm-channels-last", action="store_true", help="timm's model in NHWC too (its best CPU layout)")
    p.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="--mode infer: fold BatchNorm into the convolutions for our model (default on)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile our model (default off); compile time is reported on its own")
    p.add_argument("--timm-compile", action="store_true", help="torch.compile timm's model too")
    p.add_argument("--optimizer-impl", choices=["foreach", "fused", "for-loop"], default="foreach",
                   help="SGD implementation, the same on both sides (default foreach)")
    p.add_argument("--threads", type=_int, default=None,
                   help="intra-op threads for both models (default: torch's, one per core)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile two of our steps with torch.profiler and print the top ops")
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="the device's fp32 peak, for the fraction-of-peak figure (default: estimated on an x86 "
                        "Linux CPU as threads x clock x FLOP/cycle; none elsewhere)")
    p.add_argument("--warmup", type=_int, default=2,
                   help="untimed steps before timing (at least 1 is run; the first compiles)")
    p.add_argument("--steps", type=_int, default=3, help="steps per timed repeat")


def add_check_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_path", metavar="DIR", help="dataset root holding train/<class>/ and val/<class>/")
    p.add_argument("-j", "--workers", type=_int, default=None,
                   help="parallel checking threads (default: the CPUs available, at most 32)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="report bad files but exit 0, as training with --skip-bad-images would skip them")


def add_prepare_flags(p: argparse.ArgumentParser) -> None:
    d = ShardSettings()
    p.add_argument("--data_path", "--data-path", dest="data_path", required=True, metavar="DIR",
                   help="image folder with train/<class>/<image> and val/<class>/<image>")
    p.add_argument("--out", required=True, metavar="SHARDS_DIR", help="where the shards and index.json go")
    p.add_argument("--max-size", type=_int, default=d.max_size,
                   help=f"re-encode with the short side at most this many pixels (default {d.max_size}; 0 keeps the size)")
    p.add_argument("--quality", type=_int, default=d.quality, help=f"JPEG quality (default {d.quality})")
    p.add_argument("--shard-size", type=_int, default=d.shard_size,
                   help=f"samples per shard at most (default {d.shard_size})")
    p.add_argument("--min-shards", type=_int, default=d.min_shards,
                   help=f"at least this many shards per split (default {d.min_shards}), so that every rank x "
                        f"worker slot gets one")
    p.add_argument("-j", "--workers", type=_int, default=None, help="encoding threads (default: the CPUs)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out images that fail to decode")


def add_plot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a training run's --output-dir (holds metrics.csv)")
    p.add_argument("--out", default=None, metavar="FILE", help="where to write the PNG (default OUTPUT_DIR/curves.png)")
