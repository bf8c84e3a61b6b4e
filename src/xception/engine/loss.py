"""The training loss: cross-entropy with --label-smoothing and, with --class-weights, per-class weights
(`balanced`: scikit-learn's inverse-frequency weights of the training split; or a file of them)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..config import UserError
from ..runtime import on_main


def build_criterion(run) -> nn.Module:
    """The training loss: cross-entropy with --label-smoothing and, with --class-weights, per-class weights
    (they weigh soft mixup/CutMix targets too). The evaluation loss stays unweighted (loop.TopK)."""
    cfg = run.cfg
    if cfg.class_weights in (None, "none"):
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cfg.class_weights == "balanced":
        weights = _balanced_weights(run.train_loader.class_counts, run.classes)
    else:
        weights = on_main(run.ctx, read_class_weights, cfg.class_weights, list(run.classes))
    run.log(f"--class-weights {cfg.class_weights}: "
            + ", ".join(f"{name} {w:.4g}" for name, w in list(zip(run.classes, weights))[:CLASS_WEIGHTS_SHOWN])
            + (f" ... and {len(weights) - CLASS_WEIGHTS_SHOWN} more (min {min(weights):.4g}, max {max(weights):.4g})"
               if len(weights) > CLASS_WEIGHTS_SHOWN else ""))
    weight = torch.tensor(weights, dtype=torch.float32, device=run.ctx.device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


CLASS_WEIGHTS_SHOWN = 20  # classes named in the start line of --class-weights


def _balanced_weights(counts, classes) -> list:
    """n_samples / (n_classes * count_c) for every class, by scikit-learn's compute_class_weight."""
    from sklearn.utils.class_weight import compute_class_weight
    if counts is None:
        raise UserError("--class-weights balanced needs the training split's labels: an image folder, a list "
                        "file or a shard set (with --loader dali give --class-weights FILE)")
    if len(counts) != len(classes) or min(counts) == 0:
        missing = [str(c) for c, n in zip(classes, counts) if n == 0]
        raise UserError(f"--class-weights balanced: no training images of class(es) {', '.join(missing[:5])}; "
                        f"give --class-weights FILE instead")
    labels = np.repeat(np.arange(len(classes)), counts)
    return compute_class_weight("balanced", classes=np.arange(len(classes)), y=labels).tolist()


def read_class_weights(path: str, classes: list) -> list:
    """--class-weights FILE: one `class weight` line per class (the class name, then whitespace, then a
    positive number; blank lines and # comments allowed), in any order -> the weights in class order."""
    flag = f"--class-weights {path}"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag}: cannot read it ({getattr(e, 'strerror', None) or e}); give balanced, none or "
                        f"a text file of `class weight` lines") from None
    found = {}
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.rsplit(None, 1)
        weight = _number(parts[-1]) if len(parts) == 2 else None
        if weight is None:
            raise UserError(f"{flag}: line {number}: expected `class weight`, got {text!r}")
        if not (weight > 0 and math.isfinite(weight)):
            raise UserError(f"{flag}: line {number}: the weight of {parts[0]} must be a positive number, "
                            f"got {parts[1]}")
        if parts[0] not in classes or parts[0] in found:
            what = "a second line for" if parts[0] in found else "no such class in the data:"
            raise UserError(f"{flag}: line {number}: {what} {parts[0]}")
        found[parts[0]] = weight
    missing = [str(c) for c in classes if c not in found]
    if missing:
        raise UserError(f"{flag}: no weight for class(es) {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + "; give every class a line")
    return [found[c] for c in classes]


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None
