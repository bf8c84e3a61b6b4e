"""Every flag of every command, one function per group; cli.py puts them together into the parsers."""

from __future__ import annotations

import argparse

from .config import (ARCHS, AUTO_AUGMENT, DEFAULT_CROP_PCT, DEFAULT_IMAGE_SIZE, DEFAULT_OPSET, LOADERS, LOSSES,
                     MIN_INPUT_SIZE, OPTIMIZERS, SAMPLERS, SCHEDULES, Config, ShardSettings)
from .recipes import RECIPES

# A setting a recipe may fill defaults to None here ("not given"); Config holds its real default.
D = Config()


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
    g.add_argument("--data_path", "--data-path", dest="data_path", default="", metavar="DIR",
                   help="dataset root holding train/<class>/<image> and val/<class>/<image>, or a CSV list "
                        "file (columns path, label, split, optionally group); or a Hugging Face dataset: a "
                        "folder written by save_to_disk, a folder of Parquet files (train-*.parquet, "
                        "validation-*.parquet) or hf:ORG/NAME from the Hub; required unless "
                        "--train-list/--val-list are given")
    g.add_argument("--image-column", default="image", metavar="NAME",
                   help="Hugging Face dataset: the column holding the images (default image)")
    g.add_argument("--label-column", default="label", metavar="NAME",
                   help="Hugging Face dataset: the column holding the labels: a ClassLabel, strings or "
                        "integers (default label)")
    g.add_argument("--train-list", default=None, metavar="FILE",
                   help="text list of training images, one 'path label' a line, paths relative to the list's "
                        "folder (or to --data_path when given); needs --val-list")
    g.add_argument("--val-list", default=None, metavar="FILE", help="text list of validation images, as --train-list")
    g.add_argument("--classes", dest="classes_file", default=None, metavar="FILE",
                   help="list files: the class names in the model's output order, one a line (default: the "
                        "sorted distinct train labels)")
    g.add_argument("--multi-label", action="store_true", default=None,
                   help="list files: several labels per image (label cells like cat;dog, an empty cell = no "
                        "label); implied when any label cell holds a ';'. Sigmoid outputs, metrics mAP and F1")
    g.add_argument("--threshold", type=float, default=None,
                   help="multi-label: a label counts as predicted when its probability exceeds this, for F1 "
                        "(default 0.5; eval: the checkpoint's own)")
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
    g.add_argument("-b", "--batch-size", type=_int, default=None,
                   help=f"global batch size, split over the processes as in the seed (default {D.batch_size})")
    g.add_argument("--device", default="auto", help="auto (cuda, then npu, then mps, then cpu), cpu, cuda, "
                                                    "cuda:N, npu, mps")
    g.add_argument("--output-dir", default=".", help="where checkpoints, metrics.csv and logs go (default .)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (torch.amp autocast; default off)")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"],
                   help="autocast dtype with --amp (default float16, with loss scaling)")
    g.add_argument("--loss-scale", default=None, help="fp16 loss scale: a number (static) or 'dynamic' (default)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: the measured best for the device)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (default off, see docs/performance.md); its compile time is "
                        "logged on its own and kept out of img/s")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="training: keep only the inputs of the network's blocks (stem included) and recompute "
                        "their activations in backward (torch.utils.checkpoint): at 299 px, batch 16, 42%% less "
                        "peak memory for about 30%% more time per step")
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible runs on GPU: cuDNN autotuning off and deterministic kernels "
                        "only (slower; default: cuDNN picks the fastest kernels for the fixed shapes)")
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
    g.add_argument("-a", "--arch", default=None, choices=ARCHS,
                   help="network: xception (2017, the default), the aligned xception41/65/71, or the "
                        "pre-activation xception41p/65p (default: the --pretrained/--resume weights' own)")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="fill the defaults of the settings below from a named recipe (docs/recipes.md); "
                        "flags given explicitly win")
    g.add_argument("--epochs", type=_int, default=None, help=f"epochs to train (default {D.epochs})")
    g.add_argument("--steps-per-epoch", type=_int, default=None, metavar="N",
                   help="end each epoch after N steps (short performance runs; default: the whole epoch)")
    g.add_argument("--stop-after-epochs", type=_int, default=None, metavar="K",
                   help="stop this run after epoch K (the LR schedule still spans --epochs); continue later "
                        "with --resume, e.g. under a job time limit")
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=None,
                   help=f"peak learning rate (default {D.lr})")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD/RMSprop momentum (default {D.momentum})")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=None,
                   help=f"weight decay (default {D.weight_decay})")
    g.add_argument("--label-smoothing", type=float, default=None, help="label smoothing (default 0)")
    g.add_argument("--loss", choices=LOSSES, default=None,
                   help="training loss: ce = softmax cross-entropy (single-label, the default there); bce = "
                        "sigmoid binary cross-entropy per class (multi-label, the default there); asl = the "
                        "asymmetric loss of Ridnik et al. 2021 (multi-label; gamma- 4, gamma+ 0, clip 0.05)")
    g.add_argument("--class-weights", default=None, metavar="balanced|none|FILE",
                   help="weigh each class's training loss: balanced = n_images / (n_classes x the class's "
                        "images), from the training split; FILE = one `class weight` line per class (blank lines "
                        "and # comments allowed); none = equal (the default). The validation loss stays unweighted")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="training order: shuffle = every image once per epoch (the default); balanced = each "
                        "class equally often, drawn with replacement, as many draws as the split has images "
                        "(image folders and list files)")
    g.add_argument("--warmup-epochs", "--warm_up_epochs", dest="warmup_epochs", type=float, default=None,
                   help="linear warm-up epochs before the schedule (default 0)")
    g.add_argument("--drop-rate", type=float, default=None, help="dropout before the classifier (paper: 0.5)")
    g.add_argument("--resume", default=None, metavar="PATH", help="continue from this checkpoint; 'auto': from "
                                                                  "OUTPUT_DIR/checkpoint.pth.tar if it exists")
    g.add_argument("--max-nonfinite-steps", type=_int, default=10, metavar="K",
                   help="with fp16 loss scaling, stop after K non-finite losses in a row (default 10); "
                        "without loss scaling the first one stops the run")
    g.add_argument("--pretrained", default=None, metavar="NAME|PATH",
                   help="start from these weights: our checkpoint, timm/Cadene legacy_xception .pth or "
                        ".safetensors, or a Keras .h5 (format detected), or published weights by name: imagenet "
                        "(the --arch's, from the Hugging Face Hub), keras, hf-hub:ORG/REPO[@REV]; a classifier "
                        "of another class count is replaced")
    g.add_argument("--freeze-epochs", type=_int, default=0, metavar="K",
                   help="train only the classifier for the first K epochs (backbone and its BatchNorm "
                        "statistics frozen), then the whole network (default 0)")
    g.add_argument("--tensorboard", action="store_true",
                   help="log scalars to OUTPUT_DIR/tensorboard every print interval and every epoch")
    g.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the --resume checkpoint on val/")


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """The ingredients of the recipes: optimizer, schedule, EMA, augmentation, batch mixing."""
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", choices=OPTIMIZERS, default=None, help=f"optimizer (default {D.opt})")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="SGD: Nesterov momentum")
    g.add_argument("--opt-eps", type=float, default=None, help=f"RMSprop/AdamW epsilon (default {D.opt_eps})")
    g.add_argument("--wd-norm-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="weight decay on BatchNorm weights and biases too (default on; --no-wd-norm-bias "
                        "decays only conv and linear weights)")
    g.add_argument("--clip-grad-norm", type=float, default=None, metavar="X",
                   help="clip the gradients' global L2 norm to X (after fp16 unscaling; default off)")
    g.add_argument("--grad-accum-steps", type=_int, default=None, metavar="K",
                   help="accumulate K micro-batches per optimizer step: effective global batch = -b x K")
    g.add_argument("--sched", choices=SCHEDULES, default=None,
                   help=f"LR schedule after the warm-up (default {D.sched}); step and exponential are "
                        "staircases: x --decay-rate every --decay-epochs")
    g.add_argument("--decay-epochs", type=float, default=None, help=f"default {D.decay_epochs}")
    g.add_argument("--decay-rate", type=float, default=None, help=f"default {D.decay_rate}")
    g.add_argument("--keep-checkpoints", type=_int, default=0, metavar="N",
                   help="also keep the N best epochs' checkpoints as checkpoint-epochE.pth.tar (default 0)")
    g = p.add_argument_group("weight averaging (EMA)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="keep an exponential moving average of the weights, evaluated every epoch next to them")
    g.add_argument("--ema-decay", type=float, default=None, help=f"per update (default {D.ema_decay})")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="ramp the decay up over the first updates, in the shape of --ema-warmup-shape")
    g.add_argument("--ema-warmup-shape", choices=("ratio", "power"), default=None,
                   help="with --ema-warmup, the decay at the update after n earlier ones: ratio min(decay, "
                        "(1 + n) / (10 + n)); power min(decay, 1 - (1 + n) ** (-2/3)), the form of timm's "
                        f"--model-ema-warmup, higher early (a longer window) (default {D.ema_warmup_shape})")
    g.add_argument("--ema-every", type=_int, default=None, metavar="K",
                   help="update the average every K optimizer steps (default 1)")
    g = p.add_argument_group("augmentation")
    g.add_argument("--auto-augment", choices=(*AUTO_AUGMENT, "none"), default=None,
                   help="ra: RandAugment, ta: TrivialAugmentWide, aa: AutoAugment (ImageNet policy), augmix; "
                        "none: no policy (the default; switches a --recipe's off)")
    g.add_argument("--ra-magnitude", type=_int, default=None, metavar="M",
                   help="RandAugment strength, torchvision's scale: 0..30, each op at M/30 of its largest "
                        "change (31 bins). timm's rand-mM is M/10 of it: timm's m9 is our 27 "
                        f"(default {D.ra_magnitude}, i.e. 0.3 of the range)")
    g.add_argument("--ra-num-ops", type=_int, default=None, help=f"RandAugment ops per image (default {D.ra_num_ops})")
    g.add_argument("--random-erase", type=float, default=None, metavar="P",
                   help="erase a random rectangle of a training image with probability P (default 0)")
    g.add_argument("--mixup", type=float, default=None, metavar="ALPHA", help="mixup alpha (default 0: off)")
    g.add_argument("--cutmix", type=float, default=None, metavar="ALPHA", help="CutMix alpha (default 0: off)")
    g.add_argument("--mix-prob", type=float, default=None, metavar="P",
                   help="probability that a batch is mixed (default 1)")
    g.add_argument("--mix-switch-prob", type=float, default=None, metavar="P",
                   help="with both mixup and CutMix: probability of CutMix (default 0.5)")


def add_weights_choice(p: argparse.ArgumentParser, what: str = "use") -> None:
    """Which weights of a checkpoint that holds an EMA next to the trained ones."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--raw-weights", action="store_true",
                   help=f"{what} the trained weights of a checkpoint that also holds an EMA (default: whichever "
                        "of the two its run's evaluation ranked higher, the ones its best_acc1 measured; a line "
                        "says which)")
    g.add_argument("--ema-weights", action="store_true", help=f"{what} the EMA of such a checkpoint")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    add_data_flags(p)
    add_run_flags(p)
    p.add_argument("--resume", "--weights", dest="resume", required=True, metavar="PATH",
                   help="checkpoint (or weights file) to evaluate, an .onnx file from xception export, or a NAME "
                        "as for train --pretrained (imagenet, keras, hf-hub:ORG/REPO[@REV])")
    p.add_argument("--split", dest="eval_split", choices=("val", "test", "calib"), default="val",
                   help="a CSV list file: evaluate the rows of this split (default val)")
    p.add_argument("--report", dest="eval_report", action="store_true",
                   help="also write per_class.csv, confusion.csv and confusion.png to --output-dir")
    p.add_argument("--tta", choices=["flip"], default=None,
                   help="test-time augmentation: flip averages the logits of each image and its mirror")
    add_weights_choice(p)


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="xception-demo", help="where data, checkpoint and metrics go "
                                                                "(default ./xception-demo)")
    p.add_argument("--epochs", type=_int, default=None, help="override the demo's epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("-j", "--workers", type=_int, default=None, help="override the demo's workers")


def add_predict_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="our checkpoint, a timm/Cadene .pth/.safetensors, a Keras .h5, or an exported .onnx "
                        "(or a NAME as for --pretrained)")
    p.add_argument("--pretrained", default=None, metavar="NAME|PATH",
                   help="another spelling of --weights that also takes published weights by name, downloaded "
                        "once and then cached: imagenet (timm's legacy_xception.tf_in1k from the Hugging Face Hub; "
                        "HF_HUB_OFFLINE, HF_ENDPOINT and HF_HOME apply), keras (the author's Keras .h5; cached under "
                        "TORCH_HOME), or hf-hub:ORG/REPO[@REV] (a timm-style repo of one of our architectures); "
                        "give --weights or --pretrained, not both")
    p.add_argument("--topk", type=_int, default=5, metavar="K", help="classes shown per image (default 5)")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="multi-label weights: print the labels whose sigmoid probability exceeds P, in (0, 1) "
                        "(default: the threshold the run saved, else 0.5); single-label weights ignore it")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("-b", "--batch-size", type=_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("-j", "--workers", type=_int, default=0, help="image-decoding worker processes (default 0)")
    p.add_argument("--image-size", type=_int, default=None, help="override the weights' input resolution")
    p.add_argument("--crop-pct", type=float, default=None, help="override the weights' eval crop fraction")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    add_weights_choice(p)


def add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, metavar="CKPT",
                   help="weights to export: our checkpoint, a timm/Cadene/Keras weights file, or a NAME as for "
                        "train --pretrained (imagenet, keras, hf-hub:ORG/REPO[@REV])")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="graph format")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the graph")
    p.add_argument("--static-batch", type=_int, default=None, metavar="N",
                   help="ONNX: fix the batch dimension at N, for runtimes that want fixed shapes (default: any "
                        "batch size, as TorchScript too)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="accepted for older scripts: the batch is dynamic by default now")
    p.add_argument("--opset", type=_int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset version (default {DEFAULT_OPSET})")
    p.add_argument("--image-size", type=_int, default=None, metavar="N",
                   help=f"input resolution of the graph (default: the checkpoint's, else {DEFAULT_IMAGE_SIZE})")
    add_weights_choice(p)


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["train", "infer", "data"], default="train",
                   help="train: forward+backward+SGD step; infer: forward; data: the input pipeline")
    p.add_argument("-a", "--arch", choices=ARCHS, default="xception",
                   help="network to time (default xception), against the same network in timm")
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
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="--mode train: gradient checkpointing for our model (and timm's where it has it); "
                        "compare peak memory and img/s with a run without it")
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
    p.add_argument("--sync-debug", action="store_true",
                   help="--mode train: instead of timing, run our real training loop (the engine's step, guard, "
                        "optimizer: fused SGD on CUDA; --dtype float16 with the loss scaler) for max(20, steps x "
                        "repeats) steps, printing every 10, and count per step the host reads of tensor values "
                        "(item, tolist, bool, float, int) and, on CUDA, the syncs that "
                        "torch.cuda.set_sync_debug_mode('warn') reports. No img/s and no timm: the counters slow "
                        "the host. The goal: 0 outside print steps")
    p.add_argument("--ema", action="store_true",
                   help="--mode train: also time the EMA update (engine/ema.py) and report it as a share of our step")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="--mode train: mixup in the step")
    p.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="--mode train: CutMix in the step")
    p.add_argument("--deterministic", action="store_true",
                   help="no cuDNN autotuning and deterministic algorithms (default: cudnn.benchmark on CUDA, as "
                        "training sets it; the JSON's cudnn_benchmark says which)")
    p.add_argument("--auto-augment", choices=AUTO_AUGMENT, default=None,
                   help="--mode data: also time our pipeline with this policy (RandAugment at its default "
                        "magnitude and op count) next to the plain one, in the same run")


def add_check_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_path", metavar="DIR", help="dataset root holding train/<class>/ and val/<class>/, or a "
                                                   "CSV list file")
    p.add_argument("-j", "--workers", type=_int, default=None,
                   help="parallel checking threads (default: the CPUs available, at most 32)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="report bad files but exit 0, as training with --skip-bad-images would skip them")


def add_prepare_flags(p: argparse.ArgumentParser) -> None:
    d = ShardSettings()
    p.add_argument("--data_path", "--data-path", dest="data_path", required=True, metavar="DIR",
                   help="image folder with train/<class>/<image> and val/<class>/<image>, or a CSV list file")
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


def add_average_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="our checkpoints of one network and class list (e.g. a run's kept epochs); one alone "
                        "is written back unchanged")
    p.add_argument("-o", "--out", required=True, metavar="FILE",
                   help="where to write the averaged checkpoint (must not exist yet)")
    add_weights_choice(p, "average")


def add_models_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--measure", action="store_true",
                   help="also time CPU inference of each arch here (a minute or two at 299 px)")
    p.add_argument("--image-size", type=_int, default=None, help="input size (default: each arch's own, 299)")
    p.add_argument("-b", "--batch-size", type=_int, default=4, help="--measure: images per forward (default 4)")
    p.add_argument("--repeats", type=_int, default=3, help="--measure: timed repeats, median reported (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")


def add_split_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="an image folder (train/ and val/ pooled) or a CSV list file "
                                               "(its train and val rows pooled; test rows stay test)")
    p.add_argument("--folds", type=_int, required=True, metavar="K", help="number of folds (at least 2)")
    p.add_argument("--out", required=True, metavar="DIR", help="where fold-1.csv ... fold-K.csv go (must not "
                                                              "hold fold files yet)")
    p.add_argument("--seed", type=_int, default=0, help="seed of the shuffle before splitting (default 0)")
    p.add_argument("--val-split", choices=("val", "test"), default="val", metavar="NAME",
                   help="split value written on each fold's held-out rows: val (default; what training "
                        "evaluates on) or test")
