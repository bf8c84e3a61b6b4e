"""Command line: argparse -> Config -> the function that does the work. No training logic here."""

from __future__ import annotations

import argparse
import os
import sys

from .config import DEFAULT_CROP_PCT, LOADERS, Config, UserError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: what is wrong, and where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return value


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data_path", "--data-path", dest="data_path", required=True, metavar="DIR",
                   help="dataset root holding train/<class>/<image> and val/<class>/<image>")
    g.add_argument("-j", "--workers", type=_int, default=4,
                   help="data-loading worker processes in total, split over the processes (default 4)")
    g.add_argument("--image-size", type=_int, default=299, help="input resolution (default 299, min 71)")
    g.add_argument("--crop-pct", type=float, default=DEFAULT_CROP_PCT,
                   help=f"eval: resize the short side to image-size/crop-pct, then centre-crop "
                        f"(default {DEFAULT_CROP_PCT}; the seed used 299/342 = 0.874)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="train: RandomResizedCrop area range (default 0.08 1)")
    g.add_argument("--no-hflip", dest="hflip", action="store_false", help="train: no horizontal flips")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="log, count and skip images that fail to decode (default: stop at the first, naming it)")
    g.add_argument("--loader", choices=LOADERS, default="auto",
                   help="input pipeline: tv = torchvision decode_jpeg + uint8 transforms (auto, the fastest "
                        "CPU path); pil = Pillow + transforms; dali = NVIDIA DALI, decoding on the GPU. "
                        "--data_path may also be a shard set from xception prepare (folder or URL)")
    g.add_argument("--no-check-data", dest="check_data", action="store_false",
                   help="skip the decode check of every image before the first epoch (as xception check-data)")


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
    g.add_argument("--case-name", default=None, help="name of the seed-style ${CaseName}.log summary file; {bs} and {np} stand for the "
                        "global batch and the process count (default Xception_bs{bs}_{np}p_acc, or _eval)")
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


def build_parser() -> Parser:
    parser = Parser(prog="xception", allow_abbrev=False,
                    description="Train, evaluate and benchmark Xception (Chollet 2017) in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("train", help="train on DATA/train, evaluate on DATA/val every epoch", allow_abbrev=False)
    add_data_flags(p)
    add_run_flags(p)
    add_train_flags(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on DATA/val", allow_abbrev=False)
    add_data_flags(p)
    add_run_flags(p)
    p.add_argument("--resume", "--weights", dest="resume", required=True, metavar="PATH",
                   help="checkpoint to evaluate, or an .onnx file from xception export (run by onnxruntime)")
    p.add_argument("--report", dest="eval_report", action="store_true",
                   help="also write per_class.csv, confusion.csv and confusion.png to --output-dir")

    p = sub.add_parser("demo", help="train and evaluate on scikit-learn's bundled digits (no download)",
                       allow_abbrev=False)
    p.add_argument("--output-dir", default="xception-demo", help="where data, checkpoint and metrics go "
                                                                "(default ./xception-demo)")
    p.add_argument("--epochs", type=_int, default=None, help="override the demo's epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("-j", "--workers", type=_int, default=None, help="override the demo's workers")

    for name, (module, text) in TOOLS.items():
        p = sub.add_parser(name, help=text, allow_abbrev=False)
        tool(name).add_arguments(p)
    return parser


# Subcommands whose flags and work live in a module of their own: name -> (module, help).
# Each module has add_arguments(parser) and run(args) -> exit code, and imports heavy libraries lazily.
TOOLS = {
    "bench": ("bench", "time a training or inference step (ours vs timm), or the input pipeline"),
    "check-data": ("datacheck", "decode-check every image of DATA/train and DATA/val in parallel; list bad files"),
    "predict": ("predict", "class names and probabilities for images or folders of images"),
    "export": ("export", "write an ONNX or TorchScript graph (BatchNorm folded), verified against PyTorch"),
    "plot": ("plots", "draw OUTPUT_DIR/curves.png (loss, accuracy, lr, img/s) from a run's metrics.csv"),
    "prepare": ("shards", "convert an image folder into WebDataset tar shards (resumable) for streamed loading"),
}


def tool(name: str):
    import importlib
    return importlib.import_module(f".{TOOLS[name][0]}", __package__)


def config_from_args(args: argparse.Namespace) -> Config:
    fields = Config.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    if "crop_scale" in values:
        values["crop_scale"] = tuple(values["crop_scale"])
    return Config(**values)


def strip_launch_flags(argv: list) -> list:
    """The started processes must not start processes again (and torchrun must not read our flags)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not (arg.startswith("--nproc=") or arg == "--multiprocessing-distributed"):
            out.append(arg)
    return out


def wants_launch(args: argparse.Namespace) -> int:
    """How many processes to start here, or 0 when this process is already one of them (torchrun)."""
    if os.environ.get("WORLD_SIZE") is not None or args.command not in ("train", "eval"):
        return 0
    if args.nproc is not None:
        if args.nproc < 1:
            raise UserError(f"--nproc must be a positive number, got {args.nproc}")
        return args.nproc if args.nproc > 1 else 0
    if args.multiprocessing_distributed:
        from .distributed import visible_accelerators
        count = visible_accelerators()
        return count if count > 1 else 0
    return 0


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        nproc = wants_launch(args)
        if nproc:
            config_from_args(args).validate(world_size=nproc)  # refuse bad flags once, before spawning
            from .distributed import launch_local
            return launch_local(nproc, strip_launch_flags(argv))
        if args.command in TOOLS:
            return tool(args.command).run(args)
        if args.command == "demo":
            from .demo import run_demo
            run_demo(args.output_dir, epochs=args.epochs, device=args.device, workers=args.workers)
        elif args.command == "eval" or getattr(args, "evaluate", False):
            from .trainer import evaluate_checkpoint
            evaluate_checkpoint(config_from_args(args))
        else:
            from .trainer import train
            train(config_from_args(args))
    except UserError as e:
        if rank == 0:  # every rank meets the same mistake; one line is enough
            print(f"xception: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("xception: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # torch.distributed's errors derive from RuntimeError
        from .preempt import peer_lost
        if os.environ.get("WORLD_SIZE", "1") == "1" or not peer_lost(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"xception: error: rank {rank} lost contact with another process of the job ({first}); "
              f"the launcher's last line names the process that failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
