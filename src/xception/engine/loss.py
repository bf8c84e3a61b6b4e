"""The training loss. Single-label: cross-entropy with --label-smoothing and, with --class-weights,
per-class weights (`balanced`: scikit-learn's inverse-frequency weights of the training split; or a file of
them). Multi-label: a sigmoid per class, with binary cross-entropy (`bce`) or the asymmetric loss (`asl`).

Label smoothing for a multi-label target moves each class's 0/1 towards 1/2: t' = t (1 - e) + e / 2, the
binary form of what it means for softmax (each of the two outcomes gets e/2), so a positive is trained
towards 1 - e/2 and a negative towards e/2."""

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
    loss = cfg.loss or ("bce" if cfg.multi_label else "ce")
    if (loss == "ce") == cfg.multi_label:
        raise UserError(f"--loss {loss} is for {'single' if loss == 'ce' else 'multi'}-label data; this data is "
                        f"{'multi' if cfg.multi_label else 'single'}-label: use "
                        + ("--loss bce or asl" if cfg.multi_label else "--loss ce (or leave it out)"))
    if cfg.multi_label:
        if cfg.class_weights not in (None, "none"):
            raise UserError("--class-weights weighs the classes of a single-label run; for a skewed "
                            "multi-label list use --loss asl")
        return MultiLabelLoss(cfg.label_smoothing, asymmetric=loss == "asl")
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


class MultiLabelLoss(nn.Module):
    """A sigmoid per class, the mean over images and classes. `asymmetric`: the asymmetric loss (Ridnik et
    al., ICCV 2021) with the paper's defaults: positives log p, negatives p_m^4 log(1 - p_m) where p_m =
    max(p - 0.05, 0), which keeps the many easy negatives of a multi-label image from drowning its few
    positives. Targets may be soft (label smoothing, mixup/CutMix): each class's loss is t L+ + (1 - t) L-."""

    def __init__(self, label_smoothing: float = 0.0, asymmetric: bool = False, gamma_neg: float = 4.0,
                 gamma_pos: float = 0.0, clip: float = 0.05):
        super().__init__()
        self.smoothing, self.asymmetric = label_smoothing, asymmetric
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        if self.smoothing:
            targets = targets * (1 - self.smoothing) + self.smoothing / 2
        if not self.asymmetric:
            return nn.functional.binary_cross_entropy_with_logits(logits, targets)
        p = torch.sigmoid(logits)
        shifted = (p - self.clip).clamp(min=0)  # probability shifting: very easy negatives count nothing
        positive = (1 - p).pow(self.gamma_pos) * nn.functional.logsigmoid(logits)
        negative = shifted.pow(self.gamma_neg) * torch.log((1 - shifted).clamp(min=1e-8))
        return -(targets * positive + (1 - targets) * negative).mean()


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
