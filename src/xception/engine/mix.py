"""Batch mixing for training (--mixup, --cutmix): torchvision.transforms.v2's MixUp and CutMix on the
device batch. A mixed batch's targets are class probabilities (each row sums to 1), which the
cross-entropy takes as they are, with its label smoothing applied on top."""

from __future__ import annotations

from torchvision.transforms import v2


def build_mix(cfg, num_classes: int):
    """None without mixing; else a callable (images, int targets) -> (images, targets) that mixes a batch
    with probability --mix-prob, by CutMix with probability --mix-switch-prob when both are on. The random
    draws come from torch's CPU generator (seeded per rank and epoch, restored at a resume)."""
    ops = []
    if cfg.mixup > 0:
        ops.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        ops.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not ops:
        return None
    mix = ops[0] if len(ops) == 1 else v2.RandomChoice(ops, p=[1 - cfg.mix_switch_prob, cfg.mix_switch_prob])
    if cfg.mix_prob < 1:
        mix = v2.RandomApply([mix], p=cfg.mix_prob)
    return lambda images, targets: mix(images, targets)
