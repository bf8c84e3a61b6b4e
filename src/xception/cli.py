"""Command line: ONE command table (name, help, flags from flags.py, what it runs), argparse -> Config (or
a tool's options) -> the function that does the work, and the one-line error and exit code for whatever
goes wrong. No training logic here. A command's module is imported only when it runs, so `xception --help`
starts at once."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from .config import EXIT_FAILED_RANK, EXIT_INTERRUPTED, RESUMED_SETTINGS, Config, ShardSettings, UserError
from .flags import Parser, add_data_flags, add_eval_flags, add_recipe_flags, add_run_flags, add_train_flags
from .toolflags import (add_average_flags, add_bench_flags, add_check_flags, add_demo_flags, add_explain_flags,
                        add_export_flags, add_models_flags, add_plot_flags, add_predict_flags, add_prepare_flags,
                        add_split_flags)
from .toolflags import add_push_flags, add_serve_flags
from .recipes import apply_recipe


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's Config: the flags given, then the --recipe's values, then Config's defaults. An explicit
    off (`--auto-augment none`, like `--mixup 0` or `--no-ema`) wins over the recipe; `none` is then
    Config's own "no policy", None. It records which settings were given (by a flag or the recipe), so that
    a resume can take the others from its checkpoint."""
    fields = Config.__dataclass_fields__
    values = apply_recipe({k: v for k, v in vars(args).items() if k in fields})
    values["explicit"] = tuple(sorted(k for k in RESUMED_SETTINGS if k in values))
    if values.get("auto_augment") == "none":
        del values["auto_augment"]
    if "crop_scale" in values:
        values["crop_scale"] = tuple(values["crop_scale"])
    return Config(**values)


# What each command runs. The imports sit inside these functions on purpose (lazy dispatch): a command
# pays only for the libraries it uses.

def run_train(args) -> int:
    if args.evaluate:
        return run_eval(args)
    from .engine import train
    train(config_from_args(args))
    return 0


def run_eval(args) -> int:
    from .engine import evaluate_weights
    evaluate_weights(config_from_args(args))
    return 0


def run_demo(args) -> int:
    from .tools.demo import run_demo as demo
    demo(args.output_dir, epochs=args.epochs, device=args.device, workers=args.workers)
    return 0


def run_predict(args) -> int:
    from .tools import predict
    return predict.run(args)


def run_explain(args) -> int:
    from .tools import explain
    return explain.run(args)


def run_serve(args) -> int:
    from .tools import serve
    return serve.run(args)


def run_export(args) -> int:
    if args.format == "hf":
        from .tools import hubfolder
        return hubfolder.run_export(args, train_flag_names())
    if args.int8:
        from .tools import quantize
        return quantize.run(args)
    from .tools import export
    return export.run(args)


def run_push(args) -> int:
    from .tools import hubfolder
    return hubfolder.run_push(args)


def train_flag_names() -> dict:
    """{Config field: the long spellings of the train flag that sets it}, for a model card's training command."""
    p = Parser()
    for add in COMMANDS["train"].flags:
        add(p)
    return {a.dest: [o for o in a.option_strings if o.startswith("--")] for a in p._actions if a.option_strings}


def run_models(args) -> int:
    from .tools import models
    return models.run(args)


def run_average(args) -> int:
    from .tools import average
    return average.run(args)


def run_bench(args) -> int:
    from .tools import bench
    return bench.run(args)


def run_check(args) -> int:
    from .data.check import check_folder
    from .runtime import DistContext
    return check_folder(args.data_path, args.workers, args.skip_bad_images, DistContext(device=None))


def run_prepare(args) -> int:
    from .tools.prepare import prepare
    settings = ShardSettings(args.max_size, args.quality, args.shard_size, args.min_shards)
    prepare(args.data_path, args.out, settings, args.workers, args.skip_bad_images)
    return 0


def run_split(args) -> int:
    from .tools.split import write_folds
    write_folds(args.data, args.folds, args.out, args.seed, args.val_split)
    return 0


def run_plot(args) -> int:
    try:
        import matplotlib  # noqa: F401  (optional: the `interop` extra)
    except ImportError:
        raise UserError("xception plot needs matplotlib (pip install matplotlib)")
    from .report import curves
    print(f"wrote {curves(args.output_dir, args.out)}")
    return 0


@dataclass
class Command:
    help: str
    flags: tuple  # functions that add the command's flags to its parser
    run: Callable  # args -> exit code


COMMANDS = {
    "train": Command("train on DATA/train, evaluate on DATA/val every epoch",
                     (add_data_flags, add_run_flags, add_train_flags, add_recipe_flags), run_train),
    "eval": Command("evaluate a checkpoint or an exported .onnx on DATA/val", (add_eval_flags,), run_eval),
    "demo": Command("train and evaluate on scikit-learn's bundled digits (no download)", (add_demo_flags,), run_demo),
    "predict": Command("class names and probabilities for images or folders of images", (add_predict_flags,),
                       run_predict),
    "explain": Command("Grad-CAM heatmaps: where in each image the network saw its top (or a given) class",
                       (add_explain_flags,), run_explain),
    "export": Command("write an ONNX or TorchScript graph (BatchNorm folded), verified against PyTorch",
                      (add_export_flags,), run_export),
    "average": Command("write the mean of several checkpoints' weights and BatchNorm buffers as one checkpoint",
                       (add_average_flags,), run_average),
    "models": Command("the Xception family: parameters, GFLOPs, published ImageNet accuracy, CPU img/s",
                      (add_models_flags,), run_models),
    "bench": Command("time a training or inference step (ours vs timm), or the input pipeline", (add_bench_flags,),
                     run_bench),
    "check-data": Command("decode-check every image of DATA/train and DATA/val in parallel; list bad files",
                          (add_check_flags,), run_check),
    "prepare": Command("convert an image folder into WebDataset tar shards (resumable) for streamed loading",
                       (add_prepare_flags,), run_prepare),
    "plot": Command("draw OUTPUT_DIR/curves.png (loss, accuracy, lr, img/s) from a run's metrics.csv",
                    (add_plot_flags,), run_plot),
    "split": Command("write K stratified cross-validation folds of an image folder or list file as CSV lists",
                     (add_split_flags,), run_split),
    "push": Command("upload a folder written by export --format hf to the Hugging Face Hub", (add_push_flags,),
                    run_push),
    "serve": Command("an HTTP server classifying uploaded images (dynamic batching; a page at /)",
                     (add_serve_flags,), run_serve),
}
MULTI_PROCESS = ("train", "eval")  # the commands --nproc / --multiprocessing-distributed start N times


def build_parser() -> Parser:
    parser = Parser(prog="xception", allow_abbrev=False,
                    description="Train, evaluate and benchmark Xception (Chollet 2017) in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, allow_abbrev=False)
        for add in command.flags:
            add(p)
    return parser


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
    """How many processes to start here, or 0 when this process is already one of them (torchrun's, or an
    srun task's once main has adopted its variables; --nproc is then not used)."""
    if args.command not in MULTI_PROCESS or os.environ.get("WORLD_SIZE") is not None:
        return 0
    if args.nproc is not None:
        if args.nproc < 1:
            raise UserError(f"--nproc must be a positive number, got {args.nproc}")
        return args.nproc if args.nproc > 1 else 0
    if args.multiprocessing_distributed:
        from .runtime import visible_accelerators
        count = visible_accelerators()
        return count if count > 1 else 0
    return 0


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command in MULTI_PROCESS:
            from .launcher import adopt_launcher
            adopt_launcher()  # an srun task's SLURM variables become torchrun's (WORLD_SIZE, RANK, ...)
        nproc = wants_launch(args)
        if nproc:
            config_from_args(args).validate(world_size=nproc)  # refuse bad flags once, before spawning
            from .launcher import launch_local
            return launch_local(nproc, strip_launch_flags(argv))
        return COMMANDS[args.command].run(args)
    except UserError as e:
        rank = int(os.environ.get("RANK", "0"))  # read here: an srun task's number becomes RANK above
        if rank == 0:  # every rank meets the same mistake; one line is enough
            print(f"xception: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("xception: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as e:  # torch.distributed's errors derive from RuntimeError
        from .launcher import peer_lost
        if os.environ.get("WORLD_SIZE", "1") == "1" or not peer_lost(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        rank = os.environ.get("RANK", "0")
        print(f"xception: error: rank {rank} lost contact with another process of the job ({first}); "
              f"the launcher's last line names the process that failed", file=sys.stderr)
        return EXIT_FAILED_RANK


if __name__ == "__main__":
    sys.exit(main())
