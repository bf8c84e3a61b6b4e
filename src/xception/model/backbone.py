"""Any arch of the family as a feature extractor: `Backbone` returns the feature maps at strides 2, 4, 8, 16
and 32 (or those chosen by `out_indices`), without the classifier, for a detection or segmentation head.

`output_stride` 16 or 8 trades the last strides for dilation, as DeepLab v3+ does, with the same weights
(the networks' `set_output_stride`): the maps past that stride keep its resolution. With 32, the deepest map
is the classifier's `forward_features`. Weights go through the usual loader first (weights.create_model with
features_only=True): a classifier of any class count loads, then its head is dropped.

A segmentation head on top (DeepLab-style: the stride-16 map upsampled onto the stride-4 one):

    backbone = create_model("xception65", pretrained="imagenet", features_only=True,
                            out_indices=(1, 4), output_stride=16)
    low, high = (info["num_chs"] for info in backbone.feature_info)  # 128 channels at 4, 2048 at 16
    head = nn.Conv2d(low + high, num_classes, 1)
    f4, f16 = backbone(images)
    logits = head(torch.cat([f4, F.interpolate(f16, size=f4.shape[-2:], mode="bilinear")], 1))
    logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear")
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import UserError
from .xception import OUTPUT_STRIDES, run_unit

HEAD_MODULES = ("fc", "global_pool", "dropout")  # the classifier's modules, dropped from a backbone


def check_backbone_args(out_indices, output_stride: int) -> tuple:
    """The feature indices to return (default all five), after refusing bad ones in one line."""
    if output_stride not in OUTPUT_STRIDES:
        raise UserError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    if out_indices is None:
        return (0, 1, 2, 3, 4)
    indices = tuple(out_indices)
    valid = all(isinstance(i, int) and 0 <= i <= 4 for i in indices)
    if not indices or not valid or len(set(indices)) < len(indices):
        raise UserError(f"out_indices must be distinct feature indices 0..4 (strides 2, 4, 8, 16, 32), "
                        f"got {out_indices!r}")
    return tuple(sorted(indices))


class Backbone(nn.Module):
    """The body of `net` (an Xception or XceptionAligned, its weights kept), returning a list of feature
    maps, shallowest first. `feature_info[k]` gives the k-th map's channels ("num_chs"), its reduction
    against the input ("reduction") and the module whose output it is ("module").

    The body's modules keep the classifier's names (entry_flow.*, or stem.* and blocks.*), so the
    backbone's state dict is the classifier's without fc.*. Modules past the deepest map asked for are
    dropped, so that every parameter left gets a gradient."""

    def __init__(self, net: nn.Module, out_indices=None, output_stride: int = 32):
        super().__init__()
        self.out_indices = check_backbone_args(out_indices, output_stride)
        if net.output_stride != output_stride:
            net.set_output_stride(output_stride)
        self.arch = getattr(net, "arch", "xception")
        self.keras_exact, self.output_stride = net.keras_exact, output_stride
        self.min_input_size, self.grad_checkpointing = net.min_input_size, net.grad_checkpointing
        info = net.feature_info
        self.feature_info = [info[i] for i in self.out_indices]
        chain = [(name, checkpointed) for name, _, checkpointed in net.feature_chain()]
        taps = {f["module"] for f in self.feature_info}
        deepest = max(i for i, (name, _) in enumerate(chain) if name in taps)
        # Names, not modules: forward looks each one up, so a module swapped in later (sync BN) is the one run.
        self._chain, self._taps = tuple(chain[:deepest + 1]), taps
        for name, child in net.named_children():
            if name not in HEAD_MODULES:
                self.add_module(name, child)
        for name, _ in reversed(chain[deepest + 1:]):
            self._drop(name)

    def _drop(self, name: str) -> None:
        """Remove an unused unit of the chain. Units go from the end, so no kept unit is renumbered."""
        parent_name, _, child = name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        delattr(parent, child)
        if parent_name and len(parent) == 0:
            delattr(self, parent_name)

    def forward(self, x: torch.Tensor) -> list:
        if x.dim() != 4 or min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"{self.arch} needs an input of shape (N, C, H, W) with H and W at least "
                             f"{self.min_input_size}, got {tuple(x.shape)}")
        maps = []
        for name, checkpointed in self._chain:
            x = run_unit(self.get_submodule(name), x, checkpointed and self.grad_checkpointing)
            if name in self._taps:
                maps.append(x)
        return maps

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the units' activations in backward instead of keeping them (training only), as the
        network's own set_grad_checkpointing does."""
        self.grad_checkpointing = enable
