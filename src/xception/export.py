"""`xception export`: a deployable graph (ONNX or TorchScript) with BatchNorm folded into the convolutions,
verified against PyTorch before it is put in place; and `OnnxModel`, which runs an exported .onnx file
for `xception predict` and `xception eval`.

Tolerance: the exported file's logits may differ from the PyTorch model's (unfolded, eval mode) by at most
ATOL + RTOL * max|logit| on random inputs at batch 1 and 3. Folding BN changes the order of float32
operations, so differences of ~1e-6 relative are normal; anything near the tolerance means a wrong graph.
"""

from __future__ import annotations

import json
import os

from .config import UserError

ATOL = 1e-4
RTOL = 1e-4
DEFAULT_OPSET = 17
META_KEY = "xception"  # ONNX metadata_props key / TorchScript extra file holding the JSON below
VERIFY_BATCHES = (1, 3)


def add_arguments(p) -> None:
    p.add_argument("--weights", required=True, metavar="CKPT",
                   help="weights to export: our checkpoint, or a timm/Cadene/Keras weights file")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="graph format")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the graph")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="ONNX: the batch dimension is dynamic (default: fixed at 1); TorchScript always is")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset version (default {DEFAULT_OPSET})")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="input resolution of the graph (default: the checkpoint's training size, else 299)")


def metadata(model, image_size: int, crop_pct: float) -> dict:
    info = getattr(model, "weights_info", {}) or {}
    return {"image_size": image_size, "crop_pct": crop_pct, "num_classes": model.num_classes,
            "class_names": info.get("class_names"), "keras_exact": bool(model.keras_exact),
            "source_format": info.get("format"), "mean": 0.5, "std": 0.5, "input": "NCHW RGB float32"}


def eval_settings(model, image_size: int | None = None, crop_pct: float | None = None) -> tuple:
    """(image_size, crop_pct) the weights were trained and evaluated with, unless overridden."""
    from .config import DEFAULT_CROP_PCT

    args = (getattr(model, "weights_info", {}) or {}).get("args") or {}
    size = image_size or int(args.get("image_size") or 299)
    pct = crop_pct or float(args.get("crop_pct") or DEFAULT_CROP_PCT)
    return size, pct


def export(weights: str, fmt: str, out: str, dynamic_batch: bool = False, opset: int = DEFAULT_OPSET,
           image_size: int | None = None, log=print) -> float:
    """Write the graph to `out` (via a temporary file, renamed once verified). Returns the max error."""
    import torch

    from .fuse import fold_batchnorm
    from .model import MIN_INPUT_SIZE
    from .weights import create_model

    model = create_model(weights=weights, log=log).eval()
    size, crop_pct = eval_settings(model, image_size)
    if size < MIN_INPUT_SIZE:
        raise UserError(f"--image-size must be at least {MIN_INPUT_SIZE}, got {size}")
    folded = fold_batchnorm(model)
    meta = metadata(model, size, crop_pct)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"--out {out}: folder {folder} does not exist")
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(out)}")
    try:
        example = torch.zeros(1, 3, size, size)
        if fmt == "onnx":
            _write_onnx(folded, example, tmp, dynamic_batch, opset, meta)
        else:
            _write_torchscript(folded, example, tmp, meta)
        error, scale = verify(model, tmp, fmt, size)
        limit = ATOL + RTOL * scale
        log(f"verified {fmt} against PyTorch on random inputs at batch {' and '.join(map(str, VERIFY_BATCHES))}: "
            f"max |difference| {error:.3g} (tolerance {limit:.3g} = {ATOL:g} + {RTOL:g} x max|logit| {scale:.3g})")
        if not error <= limit:
            raise UserError(f"export to {fmt} FAILED verification: max logit difference {error:.3g} exceeds "
                            f"{limit:.3g}; {out} was not written", exit_code=1)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log(f"wrote {out} ({fmt}, BatchNorm folded, input {'N' if fmt == 'torchscript' or dynamic_batch else 1}x3x"
        f"{size}x{size} in [-1, 1], {model.num_classes} classes)")
    return error


def _write_onnx(model, example, path: str, dynamic_batch: bool, opset: int, meta: dict) -> None:
    import warnings

    import torch
    try:
        import onnx
    except ImportError:
        raise UserError("--format onnx needs the onnx package (pip install onnx onnxruntime)")
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notices about the TorchScript-based exporter
        try:
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset)
        except (ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"--opset {opset}: the ONNX export failed ({first}); try --opset {DEFAULT_OPSET}")
    graph = onnx.load(path)
    entry = graph.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.checker.check_model(graph)
    onnx.save(graph, path)


def _write_torchscript(model, example, path: str, meta: dict) -> None:
    import warnings

    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the input-size check is traced as a constant, which is what we want
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, path, _extra_files={META_KEY: json.dumps(meta)})


def verify(model, path: str, fmt: str, size: int) -> tuple:
    """Max |exported - PyTorch| over random inputs at batch 1 and 3, and the largest reference logit."""
    import torch

    runner = OnnxModel(path) if fmt == "onnx" else load_torchscript(path)[0]
    gen = torch.Generator().manual_seed(0)
    error = scale = 0.0
    for batch in VERIFY_BATCHES:
        x = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = model(x)
            got = runner(x)
        error = max(error, (got.float() - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return error, scale


def load_torchscript(path: str) -> tuple:
    import torch
    import warnings

    extra = {META_KEY: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    meta = json.loads(extra[META_KEY]) if extra[META_KEY] else {}
    return module.eval(), meta


class OnnxModel:
    """An exported .onnx file run by onnxruntime, called like a model on normalised NCHW float tensors."""

    def __init__(self, path: str, flag: str = "--weights"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"{flag} {path}: running ONNX files needs onnxruntime (pip install onnxruntime)")
        try:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for an unreadable graph
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{flag} {path}: onnxruntime cannot load it ({first})")
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = json.loads(props[META_KEY]) if META_KEY in props else {}
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.image_size = inp.shape[-1] if isinstance(inp.shape[-1], int) else self.meta.get("image_size")
        self.num_classes = self.meta.get("num_classes")

    def __call__(self, x):
        import numpy as np
        import torch

        array = x.detach().float().cpu().contiguous().numpy()
        if self.fixed_batch and array.shape[0] != self.fixed_batch:
            parts = [self.session.run(None, {self.input_name: array[i:i + self.fixed_batch]})[0]
                     for i in range(0, array.shape[0], self.fixed_batch)]
            out = np.concatenate(parts)
        else:
            out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)

    def eval(self):
        return self


def run(args) -> int:
    if args.opset < 7:
        raise UserError(f"--opset must be 7 or more, got {args.opset}")
    if args.format == "torchscript" and args.dynamic_batch:
        print("note: --dynamic-batch is implied for TorchScript")
    export(args.weights, args.format, args.out, args.dynamic_batch, args.opset, args.image_size)
    return 0
