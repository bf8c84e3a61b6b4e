"""Xception (Chollet 2017), laid out as the paper's Figure 5: entry flow, middle flow, exit flow.

Every convolution is followed by BatchNorm, so no convolution has a bias. A "separable
convolution" is a depthwise 3x3 followed directly by a pointwise 1x1, with nothing in between.

Two numeric conventions exist for the same weights:

* PyTorch/timm (default): BatchNorm eps 1e-5, max-pools padded by 1 on both sides. Weights ported by
  timm/Cadene compute exactly what timm computes.
* Keras (``keras_exact=True``): BatchNorm eps 1e-3, max-pools padded like TensorFlow's "same" (on an
  even-sized map, 0 before and 1 after). The author's Keras weights compute exactly what Keras computes.

Initialisation (see README): convolutions are Kaiming-normal with fan-in and ReLU gain, which keeps the
signal's variance through the ReLUs and counts a depthwise kernel's real 9 inputs (a fan-out rule would
count every channel and start those weights ~30x too small: BatchNorm then turns them into huge effective
learning rates). Every BatchNorm starts at identity (gamma 1, beta 0), as in Keras. We measured and
rejected zero-initialised residual gammas (Goyal et al. 2017): in Xception they cut the whole residual
path at the start, and on the digits demo (2 epochs, one-cycle lr 0.05) val top-1 fell from 97.5% to
72%. The classifier starts at N(0, 0.01) with zero bias, so the first logits are near zero and the first
loss is near ln(classes).

Both networks of the family (this one and aligned.py) also serve as backbones (backbone.py), through four
methods: `feature_chain` lists the body's units in order, `feature_info` names the unit that ends each of
the strides 2 to 32, `set_output_stride` trades the last strides for dilation, and `set_grad_checkpointing`
has training recompute the units' activations in backward instead of keeping them (`run_unit`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MIN_INPUT_SIZE

BN_EPS = {False: 1e-5, True: 1e-3}  # keras_exact -> BatchNorm epsilon (PyTorch/timm, Keras)
OUTPUT_STRIDES = (8, 16, 32)  # 32: the classifier's own; 16 and 8: the last strides traded for dilation


class SamePadMaxPool(nn.Module):
    """3x3/2 max-pool with TensorFlow "same" padding: the extra pixel goes after, not before. A dilated
    backbone (`Xception.set_output_stride`) runs it at stride 1 with a dilated window instead."""

    def __init__(self, kernel_size: int = 3, stride: int = 2, dilation: int = 1):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        span = self.dilation * (self.kernel_size - 1) + 1  # the window's extent on the input
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((-(-size // self.stride) - 1) * self.stride + span - size, 0)
            pads += [total // 2, total - total // 2]
        # -inf padding: a padded pixel must never win the max.
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), self.kernel_size, self.stride,
                            dilation=self.dilation)


def max_pool(keras_exact: bool, stride: int = 2, dilation: int = 1) -> nn.Module:
    """The blocks' 3x3 max-pool. A dilated one pads by hand: nn.MaxPool2d refuses a padding over half the
    (undilated) kernel. At stride 1 "same" padding is symmetric, Keras's or not, and keeps the size."""
    if keras_exact or dilation > 1:
        return SamePadMaxPool(3, stride, dilation)
    return nn.MaxPool2d(3, stride=stride, padding=1)


def restride(conv: nn.Conv2d, stride: int, dilation: int) -> None:
    """Set a convolution's stride and dilation in place, padded so that a 3x3 keeps its centre where it was
    (padding = dilation) and a 1x1 stays unpadded. The weights do not change."""
    conv.stride, conv.dilation = (stride, stride), (dilation, dilation)
    conv.padding = (dilation * (conv.kernel_size[0] // 2),) * 2


def dilate_depthwise(module: nn.Module, dilation: int) -> None:
    """Give every depthwise 3x3 inside `module` this dilation (their stride stays)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.kernel_size == (3, 3):
            restride(m, m.stride[0], dilation)


@contextlib.contextmanager
def running_stats_kept(module: nn.Module):
    """Inside, `module`'s training-mode BatchNorms normalise with the batch's statistics, as always, but
    their running statistics and step counters come out unchanged: momentum 0 makes the running update
    `0 * batch + 1 * running` (exact), and the counters are put back. Used while a checkpointed block is
    recomputed. (Turning track_running_stats off instead would save fewer tensors for backward than the
    first pass did, which the checkpoint refuses.)"""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    kept = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
            for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in kept:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _recompute_contexts(unit: nn.Module) -> tuple:
    # (around the forward pass, around the recomputation in backward)
    return contextlib.nullcontext(), running_stats_kept(unit)


def run_unit(unit: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """unit(x); when `checkpointed` (and training with gradients), without keeping the unit's inner
    activations: backward recomputes them (torch.utils.checkpoint, non-reentrant). The recomputation runs
    the unit's BatchNorms again in training mode, which would update their running statistics a second time
    per step; `running_stats_kept` keeps it from doing so, so the statistics match an unchecked step's.
    Under torch.compile the compiler recomputes from its own graph, where those updates are not replayed."""
    if not (checkpointed and unit.training and torch.is_grad_enabled()):
        return unit(x)
    if torch.compiler.is_compiling():
        return checkpoint(unit, x, use_reentrant=False)
    return checkpoint(unit, x, use_reentrant=False, context_fn=functools.partial(_recompute_contexts, unit))


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1, no bias, no normalisation or activation in between."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)


class SepConvBN(nn.Sequential):
    """[ReLU] -> SeparableConv -> BN: the unit every residual block repeats."""

    def __init__(self, in_channels: int, out_channels: int, relu_first: bool, bn_eps: float,
                 inplace: bool = True):
        super().__init__()
        if relu_first:
            # A block's first ReLU must not work in place: the shortcut still needs its input.
            self.relu = nn.ReLU(inplace=inplace)
        self.conv = SeparableConv2d(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)


class DownBlock(nn.Module):
    """Entry/exit-flow block: two SepConvBN units and a 3x3/2 max-pool, with a strided 1x1 conv+BN shortcut."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, first_relu: bool,
                 bn_eps: float, keras_exact: bool):
        super().__init__()
        self.sep1 = SepConvBN(in_channels, mid_channels, relu_first=first_relu, bn_eps=bn_eps,
                              inplace=False)
        self.sep2 = SepConvBN(mid_channels, out_channels, relu_first=True, bn_eps=bn_eps)
        self.keras_exact, self.stride, self.dilation = keras_exact, 2, 1
        self.pool = max_pool(keras_exact)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
            nn.BatchNorm2d(out_channels, eps=bn_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.sep2(self.sep1(x))) + self.shortcut(x)

    def set_stride(self, stride: int, dilation: int) -> None:
        """Down-sample by `stride` (2, or 1 in a dilated backbone), with every 3x3 window of the block,
        the pool's included, dilated by `dilation`: the rate the block's input already runs at."""
        self.stride, self.dilation = stride, dilation
        dilate_depthwise(self, dilation)
        self.pool = max_pool(self.keras_exact, stride, dilation)
        restride(self.shortcut[0], stride, 1)

    def set_keras_exact(self, exact: bool) -> None:
        self.keras_exact = exact
        self.pool = max_pool(exact, self.stride, self.dilation)


class MiddleBlock(nn.Module):
    """Middle-flow block: three ReLU-SepConv728-BN units with an identity shortcut."""

    def __init__(self, channels: int, bn_eps: float):
        super().__init__()
        self.body = nn.Sequential(*(SepConvBN(channels, channels, relu_first=True, bn_eps=bn_eps,
                                              inplace=i > 0) for i in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


def conv_bn_relu(in_channels: int, out_channels: int, stride: int, bn_eps: float) -> nn.Sequential:
    """The stem's plain 3x3 convolutions: no padding, as in the paper."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels, eps=bn_eps),
        nn.ReLU(inplace=True),
    )


def sep_bn_relu(in_channels: int, out_channels: int, bn_eps: float) -> nn.Sequential:
    """The exit flow's last two separable convolutions, each followed by BN and ReLU."""
    return nn.Sequential(
        SeparableConv2d(in_channels, out_channels),
        nn.BatchNorm2d(out_channels, eps=bn_eps),
        nn.ReLU(inplace=True),
    )


def check_head_settings(num_classes: int, drop_rate: float) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")


class Network(nn.Module):
    """What every network of the family shares around its own body (`body`, `check_input`,
    `feature_chain`): the head (global pool, dropout, a top-level `fc`: the names the weight loader and the
    head-only freezing rely on) and gradient checkpointing over the chain of body units."""

    grad_checkpointing = False

    def check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def feature_chain(self) -> list:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map, before pooling."""
        self.check_input(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for _, unit, checkpointed in self.feature_chain():
                x = run_unit(unit, x, checkpointed)
            return x
        return self.body(x)

    def add_head(self, drop_rate: float) -> None:
        """Global pool, dropout and a `num_classes`-way `fc` after the body (registered last, so the
        state dict lists them last), then every weight initialised."""
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, self.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal fan-in convolutions, identity BatchNorms, a near-zero classifier. A net on the meta
        device (built for its shapes, see family.py) has nothing to draw, and drawing there would import
        torch's compiler."""
        if self.fc.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_classifier(self.num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one for ``num_classes`` (fine-tuning)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, device=self.fc.weight.device)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.global_pool(features), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the checkpointed units' activations (feature_chain) in backward instead of keeping them
        (training only): much less memory for some more time per step."""
        self.grad_checkpointing = enable


class Xception(Network):
    """Xception for ``num_classes`` classes; input at least 71x71, scaled to [-1, 1]."""

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0, in_chans: int = 3,
                 keras_exact: bool = False):
        super().__init__()
        check_head_settings(num_classes, drop_rate)
        self.num_classes, self.drop_rate, self.keras_exact = num_classes, drop_rate, keras_exact
        eps = BN_EPS[keras_exact]
        self.num_features = 2048
        self.output_stride, self.grad_checkpointing = 32, False
        self.min_input_size = MIN_INPUT_SIZE

        self.entry_flow = nn.Sequential(
            conv_bn_relu(in_chans, 32, stride=2, bn_eps=eps),
            conv_bn_relu(32, 64, stride=1, bn_eps=eps),
            DownBlock(64, 128, 128, first_relu=False, bn_eps=eps, keras_exact=keras_exact),
            DownBlock(128, 256, 256, first_relu=True, bn_eps=eps, keras_exact=keras_exact),
            DownBlock(256, 728, 728, first_relu=True, bn_eps=eps, keras_exact=keras_exact),
        )
        self.middle_flow = nn.Sequential(*(MiddleBlock(728, bn_eps=eps) for _ in range(8)))
        self.exit_flow = nn.Sequential(
            DownBlock(728, 728, 1024, first_relu=True, bn_eps=eps, keras_exact=keras_exact),
            sep_bn_relu(1024, 1536, bn_eps=eps),
            sep_bn_relu(1536, 2048, bn_eps=eps),
        )
        self.add_head(drop_rate)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"Xception needs an input of shape (N, C, H, W) with H and W at least "
                             f"{MIN_INPUT_SIZE}, got {tuple(x.shape)}")

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit_flow(self.middle_flow(self.entry_flow(x)))

    def set_keras_exact(self, exact: bool) -> None:
        """Switch the numerics in place (BatchNorm eps, max-pool padding); no weight changes."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = BN_EPS[exact]
            if isinstance(m, DownBlock):
                m.set_keras_exact(exact)
        self.keras_exact = exact

    def feature_chain(self) -> list:
        """The body as one chain of (name, unit, checkpointed): applied in order, the units compute
        forward_features. `checkpointed` marks the units that gradient checkpointing recomputes: all but the
        exit flow's last two convolutions, whose maps are small (1/64 of the stem's pixels) for much
        arithmetic. Measured training at 299 px, batch 16, on CPU: peak RSS 5.3 -> 3.1 GiB (-42%); the
        entry flow alone (most activations, at high resolution) gave only -21%, since the middle flow's
        activations are all alive at the end of the forward pass."""
        chain = [(f"entry_flow.{i}", m, True) for i, m in enumerate(self.entry_flow)]
        chain += [(f"middle_flow.{i}", m, True) for i, m in enumerate(self.middle_flow)]
        chain += [(f"exit_flow.{i}", m, isinstance(m, DownBlock)) for i, m in enumerate(self.exit_flow)]
        return chain

    @property
    def feature_info(self) -> list:
        """For strides 2, 4, 8, 16, 32: the unit whose output is the deepest map at that stride, its
        channels, and its reduction (capped by the output stride). The stride-2 map is the stem's; the
        last one is forward_features. (The stem's convolutions are unpadded, so a map's size is only
        about the input's / reduction: 299 px gives 147, 74, 37, 19, 10.)"""
        taps = (("entry_flow.1", 64, 2), ("entry_flow.2", 128, 4), ("entry_flow.3", 256, 8),
                (f"middle_flow.{len(self.middle_flow) - 1}", 728, 16), ("exit_flow.2", 2048, 32))
        return [{"module": name, "num_chs": chs, "reduction": min(r, self.output_stride)} for name, chs, r in taps]

    def set_output_stride(self, output_stride: int) -> None:
        """Stop down-sampling at `output_stride` (8, 16 or 32) and dilate what follows instead, as DeepLab's
        atrous convolution does: a block whose stride would pass it runs at stride 1 (its pool too, and its
        1x1 shortcut), and every later 3x3 window is dilated by the stride given up, so it sees what it saw
        before. Same weights; on the even positions of the denser map the values are the stride-32
        network's (exactly so with PyTorch's symmetric pool padding, not Keras's)."""
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        stride, dilation = 2, 1  # after the stem's stride-2 convolution, which always stays
        for _, unit, _ in self.feature_chain()[2:]:
            if isinstance(unit, DownBlock):
                keep = stride * 2 <= output_stride
                unit.set_stride(2 if keep else 1, dilation)
                stride, dilation = (stride * 2, dilation) if keep else (stride, dilation * 2)
            else:
                dilate_depthwise(unit, dilation)
        self.output_stride = output_stride
