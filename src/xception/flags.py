"""The parser and the flags of train and eval, one function per group (toolflags.py: the other commands');
cli.py puts them together into the parsers."""

from __future__ import annotations

import argparse

from .config import (ARCHS, AUTO_AUGMENT, DEFAULT_CROP_PCT, DEFAULT_IMAGE_SIZE, LOADERS, LOSSES, MIN_INPUT_SIZE,
                     MLFLOW_IN_OUTPUT, OPTIMIZERS, SAMPLERS, SCHEDULES, Config)
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
    g = p.add_argument_group("experiment trackers (optional extras; rank 0 only)")
    g.add_argument("--mlflow", nargs="?", const=MLFLOW_IN_OUTPUT, default=None, metavar="URI",
                   help="log the settings and every epoch's metrics.csv row to MLflow: URI a tracking URI "
                        "(http://..., sqlite:///..., a folder); without one sqlite:///OUTPUT_DIR/mlflow.db "
                        "(pip install 'xception[mlflow]')")
    g.add_argument("--log-wandb", action="store_true",
                   help="the same to Weights & Biases; its WANDB_* variables apply (WANDB_MODE=offline: local "
                        "files only, `wandb sync` later) (pip install 'xception[wandb]')")
    g.add_argument("--tracker-project", default=None, metavar="NAME",
                   help="the MLflow experiment and W&B project (default: the output folder's name, also the "
                        "run's name)")
    g.add_argument("--log-checkpoint", action="store_true",
                   help="at the end, send model_best.pth.tar to the trackers as an artefact")


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
                   help="also write summary.json, per_class.csv, predictions.csv, confusion.csv/png, "
                        "reliability.png, roc_pr.png (binary), mistakes.png to --output-dir")
    p.add_argument("--positive", default=None, metavar="CLASS",
                   help="--report: score this class against the rest (ROC-AUC, AP, operating points; default "
                        "with two classes: the second)")
    p.add_argument("--target-fpr", type=float, default=0.01, metavar="F",
                   help="--report: the operating point with the highest recall at false-positive rate <= F "
                        "(default 0.01)")
    p.add_argument("--group-by", default=None, metavar="group",
                   help="--report: also score groups (a list file's group column: video, patient ...), each "
                        "the mean of its images' probabilities")
    p.add_argument("--group-regex", default=None, metavar="PATTERN",
                   help="--report: an image's group is PATTERN's first capture group (else its match) on its "
                        "path, e.g. '([^/]+)/[^/]+$' for the folder")
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on the evaluated split (single-label; minimising NLL), report ECE "
                        "before and after, and write OUTPUT_DIR/<weights>-calibrated.pth.tar carrying it")
    p.add_argument("--tta", choices=["flip"], default=None,
                   help="test-time augmentation: flip averages the logits of each image and its mirror")
    add_weights_choice(p)
