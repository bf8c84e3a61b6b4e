"""Aligned Xception (DeepLab v3+, Chen et al. 2018): Xception-41, -65, -71 and their pre-activation
("p") variants, as timm names them.

They differ from the original Xception (xception.py) in three ways:

* the entry and exit flows down-sample with stride-2 separable convolutions, not max-pools, and every
  3x3 convolution pads by 1 (the stem too), so a map of size H becomes ceil(H / 2) at each stride;
* the middle flow repeats its 728-channel block 8 (-41) or 16 (-65, -71) times, and -71 has a deeper
  entry flow (five blocks, alternately keeping and halving the resolution);
* a separable convolution has BatchNorm after its depthwise half as well as after its pointwise half
  (and, in the last block, a ReLU after each of the two).

Every block has three separable convolutions; the last one of a block carries the block's stride.

The pre-activation variants move BN+ReLU in front of each convolution (He et al. 2016): a block first
normalises its input, feeds that to both its convolutions and its shortcut, and the shortcut is a bare
1x1 convolution. Their stem's second convolution has no BN of its own (the first block normalises it),
and the network ends with a ReLU, since the last block's output is not normalised.

Module names follow timm's (stem.*, blocks.N.stack.convK.conv_dw/bn_dw/conv_pw/bn_pw, blocks.N.shortcut,
blocks.N.norm), so that a timm state dict loads by renaming only the classifier: timm's head.fc is our
top-level `fc`, next to `global_pool` and `dropout`, as in our original Xception (the classifier rules
in weights.py and the head-only fine-tuning in the engine look for those top-level names).

BatchNorm layers are plain nn.BatchNorm2d and every ReLU is applied by the module that owns the BN, so
that the sync-BN conversion (which swaps nn.BatchNorm2d for its own class) never drops an activation.

As backbones and under gradient checkpointing they offer what the original offers (xception.py's
docstring: feature_chain, feature_info, set_output_stride, set_grad_checkpointing), with the same helpers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .xception import OUTPUT_STRIDES, Network, check_head_settings, dilate_depthwise, restride

MIDDLE_CHANNELS = 728


@dataclass(frozen=True)
class AlignedSpec:
    """One aligned Xception. The network is: stem (3x3/2 conv to 32, 3x3 conv to 64), then the blocks
    `entry`, `middle` x 728, `exit`, `final`, in that order (timm's blocks.0, blocks.1, ...)."""

    name: str
    entry: tuple  # ((out_channels, stride), ...): the entry-flow blocks, three separable convs each
    middle: int  # how many 728-channel, stride-1, identity-shortcut blocks
    preact: bool  # pre-activation ("p") variant
    bn_eps: float  # BatchNorm epsilon the published weights were trained with
    exit: tuple = ((728, 1024, 1024), 2)  # the residual exit block: its three widths, and its stride
    final: tuple = (1536, 1536, 2048)  # the last block: no shortcut, and its output is the features

    def blocks(self) -> list:
        """[(in_channels, (three widths), stride, residual)] for every block, in order."""
        out, channels = [], 64  # the stem's output
        for width, stride in self.entry:
            out.append((channels, (width,) * 3, stride, True))
            channels = width
        for _ in range(self.middle):
            out.append((channels, (MIDDLE_CHANNELS,) * 3, 1, True))
            channels = MIDDLE_CHANNELS
        widths, stride = self.exit
        out.append((channels, widths, stride, True))
        out.append((widths[-1], self.final, 1, False))
        return out


def named(**modules: nn.Module) -> nn.Sequential:
    """A Sequential whose children carry the given names (and therefore the state-dict keys)."""
    return nn.Sequential(OrderedDict(modules))


def depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)


def pointwise(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int, eps: float) -> nn.Sequential:
    """A stem convolution: 3x3, padded by 1, then BN and ReLU."""
    return named(conv=nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                 bn=nn.BatchNorm2d(out_channels, eps=eps), act=nn.ReLU(inplace=True))


def separable_bn(in_channels: int, out_channels: int, stride: int, eps: float, relu: bool) -> nn.Sequential:
    """Post-activation separable conv: depthwise -> BN [-> ReLU] -> pointwise -> BN [-> ReLU]. The ReLUs
    are there only in a block that does not begin its convolutions with a ReLU (the last block)."""
    layers = OrderedDict(conv_dw=depthwise(in_channels, stride), bn_dw=nn.BatchNorm2d(in_channels, eps=eps))
    if relu:
        layers["act_dw"] = nn.ReLU(inplace=True)
    layers.update(conv_pw=pointwise(in_channels, out_channels), bn_pw=nn.BatchNorm2d(out_channels, eps=eps))
    if relu:
        layers["act_pw"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


class _Residual(nn.Module):
    """What both block kinds end with: the separable stack on `x`, plus the shortcut (identity where None)
    in a residual block."""

    def stack_and_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stack(x)
        if not self.residual:
            return out
        return out + (x if self.shortcut is None else self.shortcut(x))


class Block(_Residual):
    """Post-activation block: three (ReLU -> separable conv+BN), plus a shortcut: identity where the
    shape is kept, else a strided 1x1 conv + BN. The last block of the network has no shortcut, puts its
    ReLUs inside the separable convolutions instead, and so ends on a ReLU."""

    def __init__(self, in_channels: int, widths: tuple, stride: int, residual: bool, eps: float):
        super().__init__()
        self.residual = residual
        reshapes = in_channels != widths[-1] or stride != 1
        self.shortcut = (named(conv=pointwise(in_channels, widths[-1], stride),
                               bn=nn.BatchNorm2d(widths[-1], eps=eps)) if residual and reshapes else None)
        stack, channels = OrderedDict(), in_channels
        for i, width in enumerate(widths):
            if residual:
                # The first ReLU must not work in place: the shortcut still reads the block's input.
                stack[f"act{i + 1}"] = nn.ReLU(inplace=i > 0)
            stack[f"conv{i + 1}"] = separable_bn(channels, width, stride if i == 2 else 1, eps,
                                                 relu=not residual)
            channels = width
        self.stack = nn.Sequential(stack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack_and_shortcut(x)

    def set_stride(self, stride: int, dilation: int) -> None:
        set_block_stride(self, self.shortcut.conv if self.shortcut is not None else None, stride, dilation)


def set_block_stride(block: nn.Module, shortcut, stride: int, dilation: int) -> None:
    """A block's stride (carried by its third depthwise conv and its 1x1 shortcut) and the dilation of its
    three depthwise convs: the rate its input runs at (a dilated backbone, XceptionAligned.set_output_stride)."""
    dilate_depthwise(block.stack, dilation)
    restride(block.stack.conv3.conv_dw, stride, dilation)
    if shortcut is not None:
        restride(shortcut, stride, 1)


class PreSeparable(nn.Module):
    """Pre-activation separable conv: [BN -> ReLU ->] depthwise -> pointwise, nothing in between. The
    first of a block's three has no BN of its own: the block has already normalised its input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, eps: float, norm: bool):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels, eps=eps) if norm else None
        self.act = nn.ReLU(inplace=True) if norm else None
        self.conv_dw = depthwise(in_channels, stride)
        self.conv_pw = pointwise(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.act(self.norm(x))
        return self.conv_pw(self.conv_dw(x))


class PreBlock(_Residual):
    """Pre-activation block: BN -> ReLU on the input, which then feeds both the three separable convs and
    the shortcut (identity, or a bare strided 1x1 conv where the shape changes; none in the last block)."""

    def __init__(self, in_channels: int, widths: tuple, stride: int, residual: bool, eps: float):
        super().__init__()
        self.residual = residual
        # The BN is registered before the shortcut conv on purpose: BN folding (deploy.py) merges a BN into
        # the conv registered just before it, and this BN comes before, not after, that conv.
        self.norm = nn.BatchNorm2d(in_channels, eps=eps)
        self.act = nn.ReLU(inplace=True)  # on the BN's fresh output: in place is safe
        reshapes = in_channels != widths[-1] or stride != 1
        self.shortcut = pointwise(in_channels, widths[-1], stride) if residual and reshapes else None
        stack, channels = OrderedDict(), in_channels
        for i, width in enumerate(widths):
            stack[f"conv{i + 1}"] = PreSeparable(channels, width, stride if i == 2 else 1, eps, norm=i > 0)
            channels = width
        self.stack = nn.Sequential(stack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack_and_shortcut(self.act(self.norm(x)))

    def set_stride(self, stride: int, dilation: int) -> None:
        set_block_stride(self, self.shortcut, stride, dilation)


class XceptionAligned(Network):
    """An aligned Xception after `spec`, for `num_classes` classes; input scaled to [-1, 1], any size
    (every strided layer pads, so a map never vanishes; from 32 px down the final map is 1x1)."""

    keras_exact = False  # no Keras numerics to switch to: the engine and exporter read this

    def __init__(self, spec: AlignedSpec, num_classes: int = 1000, drop_rate: float = 0.0, in_chans: int = 3):
        super().__init__()
        check_head_settings(num_classes, drop_rate)
        self.spec, self.arch = spec, spec.name
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.output_stride, self.grad_checkpointing, self.min_input_size = 32, False, 1
        eps = spec.bn_eps
        # The pre-activation stem leaves its second conv bare: the first block's own BN+ReLU follows it.
        second = (nn.Conv2d(32, 64, 3, padding=1, bias=False) if spec.preact else conv_bn_relu(32, 64, 1, eps))
        self.stem = nn.Sequential(conv_bn_relu(in_chans, 32, 2, eps), second)
        block = PreBlock if spec.preact else Block
        self.blocks = nn.Sequential(*(block(c, w, s, r, eps) for c, w, s, r in spec.blocks()))
        self.num_features = spec.final[-1]
        # The post-activation last block ends on a ReLU already; the pre-activation one ends on a conv.
        self.act = nn.ReLU(inplace=True) if spec.preact else nn.Identity()
        self.add_head(drop_rate)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{self.arch} needs an input of shape (N, C, H, W), got {tuple(x.shape)}")

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2048, ceil(H/32), ceil(W/32)): the final feature map, before pooling."""
        return self.act(self.blocks(self.stem(x)))

    def feature_chain(self) -> list:
        """The body as one chain of (name, unit, checkpointed): applied in order, the units compute
        forward_features. Gradient checkpointing recomputes every unit (`checkpointed`) but the final ReLU:
        the stem at half resolution holds much of the activations, the blocks the rest."""
        return ([(f"stem.{i}", m, True) for i, m in enumerate(self.stem)]
                + [(f"blocks.{i}", m, True) for i, m in enumerate(self.blocks)] + [("act", self.act, False)])

    @property
    def feature_info(self) -> list:
        """For strides 2, 4, 8, 16, 32: the unit whose output is the deepest map at that stride (the stem,
        then the last block at each stride; the last one is forward_features, after the final ReLU of the
        pre-activation nets), its channels, and its reduction, capped by the output stride. A map is
        ceil(input / reduction) pixels on a side."""
        last, stride = {2: ("stem.1", 64)}, 2  # stride -> (the last unit at it, its channels)
        for i, (_, widths, block_stride, _) in enumerate(self.spec.blocks()):
            stride *= block_stride
            last[stride] = (f"blocks.{i}", widths[-1])
        last[32] = ("act", self.num_features)
        taps = [(*last[r], r) for r in (2, 4, 8, 16, 32)]
        return [{"module": m, "num_chs": c, "reduction": min(r, self.output_stride)} for m, c, r in taps]

    def set_output_stride(self, output_stride: int) -> None:
        """Stop down-sampling at `output_stride` (8, 16 or 32) and dilate what follows instead (DeepLab's
        atrous convolution): a block whose stride would pass it runs at stride 1, and every later depthwise
        3x3 is dilated by the stride given up, so it sees what it saw before. Same weights; on every
        (32 / output_stride)-th position of the denser final map the values are the stride-32 network's."""
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        stride, dilation = 2, 1  # after the stem's stride-2 convolution, which always stays
        for block, (_, _, block_stride, _) in zip(self.blocks, self.spec.blocks()):
            keep = stride * block_stride <= output_stride
            # A block that gives its stride up still runs at its input's rate; the blocks after it, at twice that.
            block.set_stride(block_stride if keep else 1, dilation)
            stride, dilation = (stride * block_stride, dilation) if keep else (stride, dilation * block_stride)
        self.output_stride = output_stride


# The published aligned Xceptions, as timm defines them. Xception-71's entry flow alternates a
# resolution-keeping block with a halving one; -65p keeps TensorFlow's BN epsilon, -41p PyTorch's.
ENTRY = ((128, 2), (256, 2), (728, 2))
ENTRY_71 = ((128, 2), (256, 1), (256, 2), (728, 1), (728, 2))
SPECS = {spec.name: spec for spec in (
    AlignedSpec("xception41", ENTRY, middle=8, preact=False, bn_eps=1e-3),
    AlignedSpec("xception65", ENTRY, middle=16, preact=False, bn_eps=1e-3),
    AlignedSpec("xception71", ENTRY_71, middle=16, preact=False, bn_eps=1e-3),
    AlignedSpec("xception41p", ENTRY, middle=8, preact=True, bn_eps=1e-5),
    AlignedSpec("xception65p", ENTRY, middle=16, preact=True, bn_eps=1e-3),
)}
