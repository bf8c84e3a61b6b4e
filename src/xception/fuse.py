"""Fold every BatchNorm into the convolution before it, for inference and export.

In eval mode BN is an affine map per channel, so conv -> BN equals one conv with scaled weights and a
bias. In Xception every BN follows a convolution (a separable convolution's pointwise half, a stem conv
or a shortcut's 1x1), so the folded model has no BN left and computes the same logits.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import SeparableConv2d, Xception


def _last_conv(module: nn.Module) -> tuple:
    """(parent, attribute name) of the convolution whose output a following BN normalises."""
    if isinstance(module, SeparableConv2d):
        return module, "pointwise"
    return None, None


def fold_batchnorm(model: Xception) -> Xception:
    """A copy of `model` in eval mode with every conv -> BN pair merged into one conv."""
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
    if left:
        raise RuntimeError(f"BatchNorm layers not folded: {left[:3]}")
    return model


def compile_frozen(model: nn.Module) -> nn.Module:
    """torch.compile for inference with the weights as constants (inductor's "freezing"): it folds
    BatchNorm and fuses the ReLUs into oneDNN convolutions on CPU. Only for weights that no longer change."""
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model)
