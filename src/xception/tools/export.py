"""`xception export`: a deployable graph (ONNX or TorchScript) with BatchNorm folded into the convolutions,
verified against PyTorch before it is put in place (model/deploy.py holds the writers and the check). A
checkpoint holding an EMA is exported with the weights its run ranked higher (--raw-weights, --ema-weights
choose). --weights also takes a published name (model/hub.py: imagenet, keras, hf-hub:ORG/REPO[@REV]),
downloaded or found in the cache; an hf-hub repository's input size and crop (its pretrained_cfg) become the
graph's, as a checkpoint's own do.

The graph returns logits whatever the run trained for; its metadata (model/deploy.py `metadata`) says how to
read them: a multi-label run's checkpoint gives "multi_label": true and its "threshold" (a sigmoid per class,
a label when its probability exceeds the threshold), anything else a softmax over the classes."""

from __future__ import annotations

import os

import torch

from ..config import DEFAULT_OPSET, MIN_INPUT_SIZE, UserError
from ..files import WriteError
from ..model.deploy import (ATOL, RTOL, VERIFY_BATCHES, fold_batchnorm, metadata, verify,
                            write_onnx, write_torchscript)
from ..model.weights import build_model, eval_settings, read_weights, weights_choice


def export(weights: str, fmt: str, out: str, static_batch: int | None = None, opset: int = DEFAULT_OPSET,
           image_size: int | None = None, log=print, choice: str = "best") -> float:
    """Write the graph to `out` (via a temporary file, renamed once verified). Returns the max error.
    ONNX takes any batch size unless `static_batch` fixes it (for runtimes that want fixed shapes).
    `choice`: which weights of a checkpoint that holds an EMA too (weights.from_checkpoint)."""
    loaded = read_weights(weights, choice=choice)
    if loaded.choice_note:
        log(loaded.choice_note)
    model = build_model(loaded, log=log).eval()
    size, crop_pct = eval_settings(loaded.args, image_size, None, weights, log, loaded.arch)
    if size < MIN_INPUT_SIZE:
        raise UserError(f"--image-size must be at least {MIN_INPUT_SIZE}, got {size}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"--out {out}: folder {folder} does not exist")
    meta = metadata(model, size, crop_pct, loaded.class_names, loaded.fmt, loaded.args)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(out)}")
    try:
        example = torch.zeros(static_batch or 1, 3, size, size)
        folded = fold_batchnorm(model)
        if fmt == "onnx":
            write_onnx(folded, example, tmp, static_batch is None, opset, meta)
        else:
            write_torchscript(folded, example, tmp, meta)
        batches = (static_batch,) if static_batch else VERIFY_BATCHES  # in onnxruntime, each size as it is
        error, scale = verify(model, tmp, fmt, size, batches)
        limit = ATOL + RTOL * scale
        log(f"verified {fmt} against PyTorch on random inputs at batch {' and '.join(map(str, batches))}: "
            f"max |difference| {error:.3g} (tolerance {limit:.3g} = {ATOL:g} + {RTOL:g} x max|logit| {scale:.3g})")
        if not error <= limit:
            raise UserError(f"export to {fmt} FAILED verification: max logit difference {error:.3g} exceeds "
                            f"{limit:.3g}; {out} was not written", exit_code=1)
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a read-only folder: name the file
        raise WriteError(out, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log(f"wrote {out} ({fmt}, BatchNorm folded, input {static_batch or 'N'}x3x"
        f"{size}x{size} in [-1, 1], {model.num_classes} classes{_label_note(meta)})")
    return error


def _label_note(meta: dict) -> str:
    """What the summary line adds for a multi-label graph (nothing for a single-label one)."""
    if not meta["multi_label"]:
        return ""
    return f", multi-label: a sigmoid per class, threshold {meta['threshold']:g}"


def run(args) -> int:
    if args.opset < 7:
        raise UserError(f"--opset must be 7 or more, got {args.opset}")
    if args.static_batch is not None and (args.static_batch < 1 or args.format != "onnx"):
        raise UserError(f"--static-batch {args.static_batch}: a positive batch size, for --format onnx only")
    export(args.weights, args.format, args.out, args.static_batch, args.opset, args.image_size,
           choice=weights_choice(args.raw_weights, args.ema_weights))
    return 0
