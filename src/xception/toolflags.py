"""The flags of the tool commands (demo, predict, export, bench, check-data, prepare, plot, average, models,
split, explain); flags.py holds the parser and the flags of train and eval, which these build on."""

from __future__ import annotations

import argparse

from .config import ARCHS, AUTO_AUGMENT, DEFAULT_IMAGE_SIZE, DEFAULT_OPSET, ShardSettings
from .flags import _int, add_weights_choice


def _add_images(p: argparse.ArgumentParser) -> None:
    """predict's and explain's positional images."""
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")


def _add_input_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=_int, default=None, help="override the weights' input resolution")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="xception-demo", help="where data, checkpoint and metrics go "
                                                                "(default ./xception-demo)")
    p.add_argument("--epochs", type=_int, default=None, help="override the demo's epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("-j", "--workers", type=_int, default=None, help="override the demo's workers")


def add_predict_flags(p: argparse.ArgumentParser) -> None:
    _add_images(p)
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="our checkpoint, a timm/Cadene .pth/.safetensors, a Keras .h5, or an exported .onnx "
                        "(or a NAME as for --pretrained)")
    p.add_argument("--pretrained", default=None, metavar="NAME|PATH",
                   help="another spelling of --weights that also takes published weights by name, downloaded "
                        "once and then cached: imagenet (timm's legacy_xception.tf_in1k from the Hugging Face Hub; "
                        "HF_HUB_OFFLINE, HF_ENDPOINT and HF_HOME apply), keras (the author's Keras .h5; cached under "
                        "TORCH_HOME), or hf-hub:ORG/REPO[@REV] (a timm-style repo of one of our architectures); "
                        "give --weights or --pretrained, not both")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("-b", "--batch-size", type=_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("-j", "--workers", type=_int, default=0, help="image-decoding worker processes (default 0)")
    _add_answer_flags(p, topk_help="classes shown per image (default 5)")


def _add_answer_flags(p: argparse.ArgumentParser, topk_help: str) -> None:
    """What predict and serve share: how an image is read and its answer cut, where the model runs."""
    p.add_argument("--topk", type=_int, default=5, metavar="K", help=topk_help)
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="multi-label weights: the labels whose sigmoid probability exceeds P, in (0, 1) (default: "
                        "the threshold the run saved, else 0.5); single-label weights ignore it")
    _add_input_size(p)
    p.add_argument("--crop-pct", type=float, default=None, help="override the weights' eval crop fraction")
    _add_device(p)
    add_weights_choice(p)


def add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, metavar="CKPT",
                   help="weights to export: our checkpoint, a timm/Cadene/Keras weights file, or a NAME as for "
                        "train --pretrained (imagenet, keras, hf-hub:ORG/REPO[@REV])")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "hf"],
                   help="onnx or torchscript: a graph; hf: a folder in timm's Hugging Face Hub layout (config.json, "
                        "model.safetensors, a README.md model card), for xception push")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the graph (hf: a new folder)")
    p.add_argument("--license", default="other", metavar="ID",
                   help="hf: the model card's license field, a Hub license id such as apache-2.0 (default other)")
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
    g = p.add_argument_group("int8 (ONNX)")
    g.add_argument("--int8", action="store_true",
                   help="write an INT8 graph (onnxruntime post-training static quantization, QDQ), calibrated on "
                        "--calibration's train images; kept only if its val top-1 drops at most --max-drop")
    g.add_argument("--calibration", default=None, metavar="DATA",
                   help="--int8: an image folder or CSV list file: its train split calibrates, its val split checks")
    g.add_argument("--calibration-images", type=_int, default=200, metavar="N",
                   help="--int8: train images to calibrate on (default 200, drawn with a fixed seed)")
    g.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="--int8: how activation ranges are chosen (default minmax)")
    g.add_argument("--per-tensor", dest="per_channel", action="store_false",
                   help="--int8: one weight scale per tensor instead of per output channel")
    g.add_argument("--max-drop", type=float, default=1.0, metavar="P",
                   help="--int8: refuse a graph whose val top-1 is more than P points below fp32's (default 1)")
    g.add_argument("--int8-exclude", default="first,last", metavar="LAYERS",
                   help="--int8: layers kept fp32, 'none' or a comma list of first (the first convolution) and "
                        "last (the classifier) (default first,last: on the demo digits they hold the drop at 0 "
                        "against 0.833 points with none)")


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["train", "infer", "data", "serve"], default="train",
                   help="train: forward+backward+SGD step; infer: forward; data: the input pipeline; serve: a "
                        "load test of xception serve (batching on, off, and in-process predict)")
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
    p.add_argument("--onnx", nargs="+", default=None, metavar="FILE",
                   help="--mode infer: also time these .onnx graphs (e.g. an fp32 and an --int8 export) with "
                        "onnxruntime on the CPU, on the same batch shape and threads as ours; each row gets its "
                        "ratio to ours and to the first fp32 graph")
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
    g = p.add_argument_group("--mode serve")
    g.add_argument("--weights", default=None, metavar="W",
                   help="the checkpoint or exported .onnx to serve, at its own input size")
    g.add_argument("--clients", type=_int, default=8, metavar="N",
                   help="concurrent clients, each POSTing images in a loop on a keep-alive connection (default 8)")
    g.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds of load per row (default 20)")
    g.add_argument("--images", default=None, metavar="DIR",
                   help="images to send, up to 32 (default: 8 made-up JPEGs at the served size)")
    g.add_argument("--max-batch", type=_int, default=16, metavar="N",
                   help="the batching row's server --max-batch (default 16, as serve's); the other row uses 1")
    g.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="the servers' --max-wait-ms (default 5, as serve's)")
    g.add_argument("--serve-image-size", type=_int, default=None, metavar="N",
                   help="serve (and run the in-process row) at N px instead of the weights' own size")


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


def add_explain_flags(p: argparse.ArgumentParser) -> None:
    _add_images(p)
    p.add_argument("--weights", required=True, metavar="PATH",
                   help="our checkpoint, a timm/Cadene .pth/.safetensors or a Keras .h5 (not an exported .onnx: "
                        "Grad-CAM needs gradients), or a published NAME: imagenet, keras, hf-hub:ORG/REPO[@REV]")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where DIR/<image>-gradcam.png (and the raw map, .npy) go; created if needed; existing "
                        "files are kept: a new one gets a -1, -2 ... suffix")
    p.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                   help="explain this class for every image (default: each image's top predicted class)")
    _add_input_size(p)
    _add_device(p)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", metavar="WEIGHTS",
                   help="our checkpoint, a timm/Cadene .pth/.safetensors, a Keras .h5, an exported .onnx (INT8 "
                        "too), or a published NAME: imagenet, keras, hf-hub:ORG/REPO[@REV]")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=_int, default=8000, help="port to listen on (default 8000; 0: any free one)")
    p.add_argument("--max-batch", type=_int, default=16, metavar="N",
                   help="images run together in one forward pass at most (default 16; 1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long the first waiting image waits for others to join its batch (default 5)")
    p.add_argument("--max-body-mb", type=float, default=20.0, metavar="MB",
                   help="largest request body accepted; larger ones get 413 (default 20)")
    p.add_argument("--threads", type=_int, default=None, metavar="N",
                   help="intra-op threads of the model, torch's or onnxruntime's (default: torch's, one per core)")
    _add_answer_flags(p, topk_help="classes per answer unless ?topk=K (default 5)")


def add_push_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="DIR", help="a folder written by xception export --format hf")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub model repository (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="the branch to commit to (default main)")
