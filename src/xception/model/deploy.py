"""Inference and deployment of a trained model: BatchNorm folded into the convolutions, torch.compile
with frozen weights, ONNX and TorchScript files with their metadata, their verification against PyTorch,
and `OnnxModel`, which runs an exported .onnx file like a model (for `xception predict` and `eval`).

Metadata: an exported graph always returns logits. Its JSON metadata says how to read them: "multi_label"
(a run trained with several labels per image: a sigmoid per class, a label predicted when its probability
exceeds "threshold") or not (a softmax over the classes), as the checkpoint's run settings say; foreign
weights are single-label. `open_weights` hands that metadata back in `Opened.saved`, as it hands back a
checkpoint's run settings, so predict and eval ask both the same way.

Folding: in eval mode BN is an affine map per channel, so conv -> BN equals one conv with scaled weights
and a bias. In Xception every BN follows a convolution (a separable convolution's pointwise half, a stem
conv or a shortcut's 1x1), so the folded model has no BN left and computes the same logits.

Tolerance of the verification: the exported file's logits may differ from the PyTorch model's (unfolded,
eval mode) by at most ATOL + RTOL * max|logit| on random inputs at batch 1 and 3. Folding BN changes the
order of float32 operations, so differences of ~1e-6 relative are normal; anything near the tolerance
means a wrong graph.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..config import DEFAULT_OPSET, PIXEL_MEAN, PIXEL_STD, UserError
from .weights import Weights, locate, read_weights, sniff
from .xception import SeparableConv2d, Xception

ATOL = 1e-4
RTOL = 1e-4
META_KEY = "xception"  # ONNX metadata_props key / TorchScript extra file holding the JSON metadata
VERIFY_BATCHES = (1, 3)


def label_mode(saved: dict | None) -> tuple:
    """(multi_label, threshold) of weights whose run settings (a checkpoint's args, a graph's metadata) are
    `saved`: a multi-label run says so and keeps its threshold; anything else (old checkpoints, foreign
    weights) is single-label, with the default threshold 0.5."""
    saved = saved or {}
    threshold = saved.get("threshold")
    return bool(saved.get("multi_label", False)), float(0.5 if threshold is None else threshold)


def metadata(model: Xception, image_size: int, crop_pct: float, class_names, source_format: str,
             saved: dict | None = None) -> dict:
    """What travels with an exported graph: enough to preprocess its input and name and read its outputs.
    `saved`: the checkpoint's run settings (None for foreign weights), which say whether it is multi-label."""
    multi_label, threshold = label_mode(saved)
    outputs = ("logits; multi-label: apply a sigmoid per class, a label is predicted when its probability "
               "exceeds threshold") if multi_label else "logits; softmax over classes"
    return {"arch": getattr(model, "arch", "xception"), "image_size": image_size, "crop_pct": crop_pct,
            "num_classes": model.num_classes,
            "class_names": class_names, "keras_exact": bool(model.keras_exact), "source_format": source_format,
            "mean": PIXEL_MEAN, "std": PIXEL_STD, "input": "NCHW RGB float32",
            "multi_label": multi_label, "threshold": threshold, "outputs": outputs,
            "temperature": temperature_of(saved)}


def temperature_of(saved: dict | None) -> float:
    """The temperature `xception eval --calibrate` fitted (the logits are divided by it before the softmax;
    the graph itself returns the undivided logits); 1 for weights never calibrated."""
    return float((saved or {}).get("temperature") or 1.0)


def _last_conv(module: nn.Module) -> tuple:
    """(parent, attribute name) of the convolution whose output a following BN normalises."""
    if isinstance(module, SeparableConv2d):
        return module, "pointwise"
    return None, None


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every conv -> BN pair merged into one conv. A pre-activation
    net (xception41p/65p) keeps the BatchNorms that come before a ReLU and a conv: nothing to merge into."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        names = list(parent._modules)
        for prev, name in zip(names, names[1:]):
            bn, conv_holder = parent._modules[name], parent._modules[prev]
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            if isinstance(conv_holder, nn.Conv2d):
                owner, attr = parent, prev
            else:
                owner, attr = _last_conv(conv_holder)
            if owner is None:
                continue
            setattr(owner, attr, fuse_conv_bn_eval(getattr(owner, attr), bn))
            parent._modules[name] = nn.Identity()
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left and not getattr(getattr(model, "spec", None), "preact", False):
        raise RuntimeError(f"BatchNorm layers not folded: {left[:3]}")
    return model


def compile_frozen(model: nn.Module) -> nn.Module:
    """torch.compile for inference with the weights as constants (inductor's "freezing"): it folds
    BatchNorm and fuses the ReLUs into oneDNN convolutions on CPU. Only for weights that no longer change."""
    import torch._inductor.config as inductor_config  # torch's compiler, loaded only when compiling

    inductor_config.freezing = True
    return torch.compile(model)


def write_onnx(model, example, path: str, dynamic_batch: bool, opset: int, meta: dict) -> None:
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


def write_torchscript(model, example, path: str, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the input-size check is traced as a constant, which is what we want
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, path, _extra_files={META_KEY: json.dumps(meta)})


def verify(model, path: str, fmt: str, size: int, batches=VERIFY_BATCHES) -> tuple:
    """Max |exported - PyTorch| over random inputs at each of `batches`, and the largest reference logit."""
    runner = OnnxModel(path) if fmt == "onnx" else load_torchscript(path)[0]
    gen = torch.Generator().manual_seed(0)
    error = scale = 0.0
    for batch in batches:
        x = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = model(x)
            got = runner(x)
        error = max(error, (got.float() - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return error, scale


def load_torchscript(path: str) -> tuple:
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
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # as our model: serve --threads sets both
            self.session = ort.InferenceSession(path, options, providers=providers)
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
        array = x.detach().float().cpu().contiguous().numpy()
        n, fixed = array.shape[0], self.fixed_batch
        if fixed and n != fixed:  # a --static-batch graph: run it in chunks, the last padded with zeros
            padded = np.concatenate([array, np.zeros((-n % fixed, *array.shape[1:]), array.dtype)])
            parts = [self.session.run(None, {self.input_name: padded[i:i + fixed]})[0]
                     for i in range(0, len(padded), fixed)]
            out = np.concatenate(parts)[:n]
        else:
            out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)

    def eval(self):
        return self

    def num_outputs(self) -> int:
        return int(self.num_classes or self.session.get_outputs()[0].shape[-1])


@dataclass
class Opened:
    """Weights to run: read into our names (`weights`) or an exported graph (`graph`), with what they say
    about their own use: the input size and crop they were trained and evaluated at, and class names."""
    source: str
    weights: Weights | None
    graph: OnnxModel | None
    saved: dict  # our checkpoint's args, or the graph's metadata: image_size, crop_pct, multi_label, threshold
    class_names: list | None


def open_weights(path: str, image_size: int | None = None, flag: str = "--weights", choice: str = "best",
                 arch: str | None = None) -> Opened:
    """Any weights file, or an .onnx graph from `xception export`, for `eval` and `predict`. A graph's
    input size is fixed: another --image-size is refused. A checkpoint holding an EMA gives the weights of
    `choice` (weights.from_checkpoint; default the ones its run ranked higher); `weights.choice_note` says
    which. A graph holds the weights it was exported with. A published name (model/hub.py; "imagenet" of
    `arch`, default xception) is downloaded or found in the cache: `source` is then the local file."""
    path = locate(path, flag, arch)
    if sniff(path, flag) != "onnx":
        weights = read_weights(path, flag, choice)
        return Opened(path, weights, None, weights.args, weights.class_names)
    graph = OnnxModel(path, flag)
    if image_size and graph.image_size and image_size != graph.image_size:
        raise UserError(f"--image-size {image_size}: {path} was exported for {graph.image_size} px inputs")
    saved = {**graph.meta, "image_size": graph.image_size, "crop_pct": graph.meta.get("crop_pct")}
    return Opened(path, None, graph, saved, graph.meta.get("class_names"))
