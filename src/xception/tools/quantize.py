"""`xception export --int8`: an INT8 ONNX graph by post-training static quantization (onnxruntime's
quantization tools), kept only when it holds its accuracy.

1. The fp32 graph is exported as `xception export` does (BatchNorm folded, verified against PyTorch).
2. onnxruntime's shape inference and graph optimisation prepare it (quant_pre_process).
3. Calibration: --calibration-images N images of --calibration DATA's train split (an image folder or a list
   file; chosen with a fixed seed), through the same eval transform as `xception eval`, are run through the
   graph to record each activation's range (--calibration-method: minmax, entropy or percentile).
4. quantize_static writes the QDQ graph: weights int8 per output channel (per tensor with --per-tensor), and
   activations int8, except the layers --int8-exclude names (default first,last: the stem's first
   convolution, which sees the raw image, and the classifier, which writes the logits) that stay fp32: on the
   demo that is what brought the drop from 0.833 to 0 points, at a negligible share of the FLOPs.
5. Both graphs are evaluated on DATA's val split through `xception eval`'s loop; both top-1s and the drop
   are printed, and a drop over --max-drop points refuses to write the INT8 file (one line saying what to try).
The metadata of the fp32 export travels along, with "precision": "int8".
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch

from ..config import Config, UserError
from ..data import build_loaders, calibration_images
from ..engine.loop import evaluate
from ..engine.precision import Precision
from ..files import WriteError
from ..model.deploy import META_KEY, OnnxModel
from ..model.weights import weights_choice
from ..runtime import DistContext
from .export import export

METHODS = ("minmax", "entropy", "percentile")
EXCLUDABLE = ("first", "last")  # the first convolution, the classifier (the last Gemm or MatMul)
DEFAULT_EXCLUDE = "first,last"


@dataclass
class Int8Options:
    calibration: str  # DATA: its train split calibrates, its val split checks
    calibration_images: int = 200
    calibration_method: str = "minmax"  # one of METHODS
    per_channel: bool = True  # int8 weights per output channel (else per tensor)
    max_drop: float = 1.0  # refuse a graph whose val top-1 is more than this many points below fp32's
    image_size: int | None = None  # None: the weights' own
    exclude: str = DEFAULT_EXCLUDE  # layers kept fp32: "none" or a comma list of EXCLUDABLE
    choice: str = "best"  # of a checkpoint holding an EMA too (weights.from_checkpoint)


def _quantization():
    try:
        import onnxruntime.quantization as q
    except ImportError:
        raise UserError("--int8 needs onnxruntime and onnx (pip install onnx onnxruntime)") from None
    return q


class _Batches:
    """onnxruntime's CalibrationDataReader over our calibration images, in batches of 8. `set_range` lets
    quantize_static feed the calibrator one batch at a time (its CalibStridedMinMax option), which the
    histogram methods need: they otherwise keep every activation of every image in memory until the end
    (about 22 GB for 200 images at 299 px, killed here)."""

    def __init__(self, images: torch.Tensor, input_name: str):
        self.batches = [{input_name: images[i:i + 8].numpy()} for i in range(0, len(images), 8)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.parts = iter(self.batches[start_index:end_index])

    def get_next(self):
        return next(self.parts, None)


def exclusions(text: str) -> tuple:
    """--int8-exclude's value as a tuple of EXCLUDABLE names ("none": empty)."""
    if text.strip() == "none":
        return ()
    parts = tuple(p.strip() for p in text.split(","))
    if set(parts) <= set(EXCLUDABLE) and len(set(parts)) == len(parts):
        return parts
    raise UserError(f"--int8-exclude must be none or a comma list of {', '.join(EXCLUDABLE)} (layers kept "
                    f"fp32), got {text!r}")


def excluded_nodes(graph, which: tuple) -> list:
    """The node names of `graph` (an onnx GraphProto) that `which` (from exclusions) keeps fp32."""
    names = []
    if "first" in which:
        names += [n.name for n in graph.node if n.op_type == "Conv"][:1]
    if "last" in which:
        names += [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1:]
    return names


def quantize(fp32: str, out: str, images: torch.Tensor, method: str = "minmax", per_channel: bool = True,
             exclude: str = DEFAULT_EXCLUDE) -> None:
    """Write the INT8 QDQ graph of the fp32 graph `fp32` to `out`, calibrated on `images` (N x 3 x H x W,
    normalised floats), with the fp32 graph's metadata; the layers `exclude` names stay fp32."""
    import onnx

    q = _quantization()
    prepared = fp32 + ".prep.onnx"
    try:
        q.quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
        kept = excluded_nodes(onnx.load(prepared).graph, exclusions(exclude))
        reader = _Batches(images, "input")
        method_enum = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
                       "percentile": q.CalibrationMethod.Percentile}[method]
        q.quantize_static(prepared, out, reader, quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                          activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=method_enum, nodes_to_exclude=kept,
                          extra_options={"ActivationSymmetric": False,
                                         # histograms are merged batch by batch; minmax keeps only its ranges
                                         "CalibStridedMinMax": 1 if method != "minmax" else None})
    finally:
        if os.path.exists(prepared):
            os.unlink(prepared)
    meta = json.loads({p.key: p.value for p in onnx.load(fp32).metadata_props}[META_KEY])
    graph = onnx.load(out)
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta | {"precision": "int8", "calibration_method": method,
                                                          "per_channel": per_channel, "fp32_layers": kept})
    onnx.save(graph, out)


def top1(path: str, cfg: Config) -> tuple:
    """(top-1 in percent, images) of an ONNX graph on cfg.data_path's val split, by `xception eval`'s loop."""
    ctx = DistContext(torch.device("cpu"))
    loaders = build_loaders(cfg, ctx, need_train=False, log=lambda *a: None)
    val = evaluate(OnnxModel(path), loaders.val, ctx, Precision("cpu"), False)
    return val["top1"], val["count"]


def export_int8(weights: str, out: str, opts: Int8Options, log=print) -> dict:
    """Write the INT8 graph of `weights` to `out` if it keeps its accuracy. Returns {"fp32": top-1, "int8":
    top-1, "drop": points}."""
    if opts.calibration_method not in METHODS:
        raise UserError(f"--calibration-method must be one of {', '.join(METHODS)}, got {opts.calibration_method}")
    exclusions(opts.exclude)
    if os.path.exists(out):
        raise UserError(f"--out {out}: exists; --int8 never writes over a file: remove it or choose another name")
    folder = os.path.dirname(os.path.abspath(out))
    with tempfile.TemporaryDirectory(dir=folder if os.path.isdir(folder) else None, prefix=".int8-") as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        export(weights, "onnx", fp32, image_size=opts.image_size, log=log, choice=opts.choice)
        meta = OnnxModel(fp32).meta
        cfg = Config(data_path=opts.calibration, image_size=meta["image_size"], crop_pct=meta["crop_pct"],
                     workers=0, batch_size=16, check_data=False, output_dir=tmp)
        images = calibration_images(cfg, opts.calibration_images, seed=0)
        log(f"int8: calibrating on {len(images)} train images of {opts.calibration} ({opts.calibration_method}, "
            f"weights per {'channel' if opts.per_channel else 'tensor'}, kept fp32: {opts.exclude})")
        int8 = os.path.join(tmp, "int8.onnx")
        quantize(fp32, int8, images, opts.calibration_method, opts.per_channel, opts.exclude)
        (a, n), (b, _) = top1(fp32, cfg), top1(int8, cfg)
        drop = a - b
        log(f"int8: top-1 on {n} val images: fp32 {a:.3f}, int8 {b:.3f}, drop {drop:.3f} points "
            f"(--max-drop {opts.max_drop:g})")
        if drop > opts.max_drop:
            raise UserError(f"--int8: top-1 dropped {drop:.3f} points (fp32 {a:.3f} -> int8 {b:.3f}), more than "
                            f"--max-drop {opts.max_drop:g}; {out} was not written: try more --calibration-images, "
                            f"another --calibration-method ({', '.join(m for m in METHODS if m != opts.calibration_method)})"
                            + (", --per-tensor" if opts.per_channel else ", per-channel weights (without --per-tensor)")
                            + (f", --int8-exclude {DEFAULT_EXCLUDE}" if opts.exclude != DEFAULT_EXCLUDE else "")
                            + " or a higher --max-drop", exit_code=1)
        try:
            os.replace(int8, out)
        except OSError as e:
            raise WriteError(out, e) from None
    log(f"wrote {out} (int8 QDQ ONNX, {os.path.getsize(out) / 2 ** 20:.1f} MiB)")
    return {"fp32": a, "int8": b, "drop": drop}


def run(args) -> int:
    """`xception export --int8 ...` (cli.py sends --int8 here, the rest to export.run)."""
    if args.format != "onnx" or args.static_batch or not args.calibration:
        raise UserError("--int8 writes ONNX: give --format onnx and --calibration DATA (images to calibrate and "
                        "check on), without --static-batch")
    opts = Int8Options(args.calibration, args.calibration_images, args.calibration_method, args.per_channel,
                       args.max_drop, args.image_size, exclude=args.int8_exclude,
                       choice=weights_choice(args.raw_weights, args.ema_weights))
    export_int8(args.weights, args.out, opts)
    return 0
